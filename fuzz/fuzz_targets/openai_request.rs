//! OpenAI request bodies as the HTTP handlers take them: any bytes parse into a request or a 400
//! naming the field, and a parsed request translates into engine requests or an error, never a
//! panic. The first byte picks the endpoint.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use latentserve_fuzz::{ByteCodec, LIMITS};
use latentserve_worker::model::ChatTemplate;
use latentserve_worker::server::openai::parse_json;
use latentserve_worker::server::openai::protocol::{ChatCompletionRequest, CompletionRequest};
use latentserve_worker::server::openai::translate::{self, Context};
use libfuzzer_sys::fuzz_target;

fn template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            "fuzz",
            vec![("bos_token".to_owned(), "<s>".to_owned())],
        )
        .expect("the fuzz template compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let context = Context {
        codec: &ByteCodec,
        limits: &LIMITS,
        model: "fuzz",
        chat_template: Some(template()),
        id: "cmpl-fuzz",
        arrival: Instant::now(),
    };
    if which % 2 == 0 {
        if let Ok(request) = parse_json::<CompletionRequest>(body) {
            let _ = translate::completion(request, &context);
        }
    } else if let Ok(request) = parse_json::<ChatCompletionRequest>(body) {
        let _ = translate::chat_completion(request, &context);
    }
});
