#!/usr/bin/env python3
"""A client that is not ours: OpenAI's official Python SDK (`openai`) against a running
latentserve worker's OpenAI-compatible port.

Usage:
  test_openai_client.py --base-url http://HOST:PORT/v1 [--check answers|queue-full|draining]

`answers` (the default) expects the demo model (models/demo) with its chat template, served with
--block-size 4 (so that its short prompts fill cache blocks the prefix cache can share), and checks
completions and chat, whole and streamed, n > 1, stop strings, logprobs, usage, and the 400 and
404 errors. `queue-full` expects a worker started with --max-queue 0 (every request 429);
`draining` one that is draining (every request 503). Exits non-zero with a message naming the
failed check; prints "all checks passed" at the end.
"""

import argparse
import sys

import openai

QUESTION = "What is 37 plus 48?"
ANSWER = " 85"


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def expect_error(kind, status, call, what):
    try:
        call()
    except kind as error:
        check(error.status_code == status, f"{what}: status {error.status_code}, expected {status}")
        body = error.body if isinstance(error.body, dict) else {}
        check(bool(body.get("message")), f"{what}: no error message in {error.body!r}")
        return body
    except openai.APIError as error:
        check(False, f"{what}: raised {type(error).__name__} ({error}), expected {kind.__name__}")
    check(False, f"{what}: succeeded, expected {kind.__name__}")


def check_answers(client):
    models = client.models.list().data
    check([m.id for m in models] == ["demo"], f"models: {[m.id for m in models]}")
    model = models[0].id

    # Completions, whole: the demo model answers the sum, then ends the sequence.
    completion = client.completions.create(model=model, prompt=QUESTION, max_tokens=8, temperature=0)
    choice = completion.choices[0]
    check(choice.text == ANSWER, f"completion text {choice.text!r}, expected {ANSWER!r}")
    check(choice.finish_reason == "stop", f"completion finish_reason {choice.finish_reason}")
    usage = completion.usage
    check(usage.completion_tokens >= 3, f"completion usage {usage}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"usage {usage}")
    check(usage.prompt_tokens_details is not None, "usage has no prompt_tokens_details")
    check(completion.object == "text_completion" and completion.id.startswith("cmpl-"), "ids")

    # Streamed, with usage at the end: the same text.
    stream = client.completions.create(
        model=model, prompt=QUESTION, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, last_usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            last_usage = chunk.usage
    check(text == ANSWER, f"streamed completion {text!r}")
    check(finish == "stop", f"streamed finish_reason {finish}")
    check(last_usage is not None and last_usage.completion_tokens == usage.completion_tokens,
          f"streamed usage {last_usage}")
    check(last_usage.prompt_tokens_details.cached_tokens > 0,
          "the repeated prompt found no cached tokens")
    check(chunks >= 3, f"the completion was not streamed ({chunks} chunks)")

    # A list of prompts with n: prompts x n choices, indexed prompt-major.
    batch = client.completions.create(
        model=model, prompt=[QUESTION, "What is 64 minus 21?"], n=2, max_tokens=4, temperature=0)
    check(sorted(c.index for c in batch.choices) == [0, 1, 2, 3], "prompt list x n indices")
    by_index = {c.index: c.text for c in batch.choices}
    check(by_index[0] == by_index[1] == ANSWER, f"first prompt's choices {by_index}")
    check(by_index[2] == by_index[3] == " 43", f"second prompt's choices {by_index}")

    # Stop strings are cut, never emitted.
    stopped = client.completions.create(model=model, prompt=QUESTION, max_tokens=8, temperature=0,
                                        stop=["5"])
    check(stopped.choices[0].text == " 8", f"stop string: {stopped.choices[0].text!r}")
    check(stopped.choices[0].finish_reason == "stop", "stop string finish_reason")

    # Token ids as the prompt, echo and the length limit.
    ids_prompt = client.completions.create(model=model, prompt=[[0, 5, 6]], max_tokens=2,
                                           temperature=0, echo=True,
                                           extra_body={"ignore_eos": True})
    check(ids_prompt.choices[0].finish_reason == "length", "max_tokens finishes by length")
    check(ids_prompt.usage.completion_tokens == 2, f"ids prompt usage {ids_prompt.usage}")
    check(ids_prompt.usage.prompt_tokens == 3, f"ids prompt usage {ids_prompt.usage}")
    check(len(ids_prompt.choices[0].text) > 0, "echo returned no text")

    # Logprobs, legacy format: one entry per token, the alternatives asked for.
    with_logprobs = client.completions.create(model=model, prompt=QUESTION, max_tokens=8,
                                              temperature=0, logprobs=2)
    lp = with_logprobs.choices[0].logprobs
    count = with_logprobs.usage.completion_tokens
    check(len(lp.tokens) == count and len(lp.token_logprobs) == count, f"logprobs {lp}")
    check(all(len(top) <= 2 for top in lp.top_logprobs), "at most 2 alternatives")
    check(all(x <= 0.0 for x in lp.token_logprobs), "log-probabilities are <= 0")

    # Chat: the template renders the question; the answer is the same.
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=8, logprobs=True, top_logprobs=2)
    message = chat.choices[0].message
    check(message.role == "assistant", f"chat role {message.role}")
    check(message.content == ANSWER, f"chat content {message.content!r}")
    check(chat.choices[0].finish_reason == "stop", "chat finish_reason")
    check(chat.object == "chat.completion" and chat.id.startswith("chatcmpl-"), "chat ids")
    content = chat.choices[0].logprobs.content
    check(len(content) == chat.usage.completion_tokens, f"chat logprobs {content}")
    check(all(len(t.top_logprobs) == 2 for t in content), "chat top_logprobs")

    # Content as a list of text parts renders like the string.
    parts = client.chat.completions.create(
        model=model, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    check(parts.choices[0].message.content == ANSWER, "content parts")

    # Chat streamed: the role first, then content, then the finish and the usage.
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    roles, text, finish, final_usage = [], "", None, None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            final_usage = chunk.usage
    check(roles == ["assistant"], f"streamed roles {roles}")
    check(text == ANSWER, f"streamed chat {text!r}")
    check(finish == "stop" and final_usage is not None, "streamed chat finish and usage")

    # n > 1 with sampling: n choices, reproducible with a seed.
    sampled = dict(model=model, messages=messages, n=3, temperature=1.0, seed=11, max_tokens=6)
    first = client.chat.completions.create(**sampled)
    again = client.chat.completions.create(**sampled)
    check(sorted(c.index for c in first.choices) == [0, 1, 2], "n=3 indices")
    check([c.message.content for c in first.choices] == [c.message.content for c in again.choices],
          "a seeded request is reproducible")

    # Errors: OpenAI's shape and status codes.
    body = expect_error(openai.NotFoundError, 404,
                        lambda: client.completions.create(model="gpt-4", prompt="x"),
                        "unknown model")
    check(body.get("code") == "model_not_found", f"404 body {body}")
    body = expect_error(openai.BadRequestError, 400,
                        lambda: client.completions.create(model=model, prompt="x", temperature=-1),
                        "negative temperature")
    check(body.get("param") == "temperature", f"400 body {body}")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(
                     model=model, messages=[{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
                 "an image part")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.completions.create(model=model, prompt="x", max_tokens=100000),
                 "max_tokens past the context")
    expect_error(openai.BadRequestError, 400,
                 lambda: client.chat.completions.create(
                     model=model, messages=messages,
                     tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                 "tools")


def check_refused(client, kind, status):
    for what, call in [
        ("completion", lambda: client.completions.create(model="demo", prompt=QUESTION, max_tokens=2)),
        ("chat", lambda: client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=2)),
        ("streamed chat", lambda: list(client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=2,
            stream=True))),
    ]:
        expect_error(kind, status, call, what)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--check", choices=["answers", "queue-full", "draining"], default="answers")
    args = parser.parse_args()
    # No retries: the SDK retries 429 and 5xx by default, which would hide what the server said.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=60)
    if args.check == "answers":
        check_answers(client)
    elif args.check == "queue-full":
        check_refused(client, openai.RateLimitError, 429)
    else:
        check_refused(client, openai.InternalServerError, 503)
    print("all checks passed")


if __name__ == "__main__":
    main()
