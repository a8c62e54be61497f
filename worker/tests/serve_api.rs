//! The gRPC API against a real in-process server on 127.0.0.1 serving the fixture models.

mod serve_support;

use std::time::Duration;

use futures::future::join_all;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    FinishReason, GenerateRequest, GetModelInfoRequest, StoppingCriteria, generate_request,
};
use serve_support::*;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_through_the_server_equal_the_transformers_references() {
    for name in FIXTURES {
        let serving = serve(&args(name)).await;
        let mut client = client(&serving).await;
        let reference = reference(name);
        let (tokens, last) = generate(
            &mut client,
            greedy_request(&reference.prompt_ids, reference.greedy_ids.len() as u32),
        )
        .await
        .expect("generation succeeds");
        assert_eq!(tokens, reference.greedy_ids, "fixture {name}");
        assert_eq!(last.finish_reason(), FinishReason::Length);
        let usage = last.usage.expect("usage on the last message");
        assert_eq!(usage.prompt_tokens as usize, reference.prompt_ids.len());
        assert_eq!(usage.completion_tokens as usize, reference.greedy_ids.len());

        // The text prompt tokenizes to the reference ids and generates the same tokens.
        let mut by_text = greedy_request(&[], reference.greedy_ids.len() as u32);
        by_text.prompt = Some(generate_request::Prompt::Text(
            reference.prompt_text.clone(),
        ));
        let (tokens, _) = generate(&mut client, by_text).await.expect("text prompt");
        assert_eq!(tokens, reference.greedy_ids, "fixture {name} from text");
        drain(serving).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_describes_model_cache_and_shard() {
    let mut serve_args = args("v3-tiny-f32");
    serve_args.shard.shard_rank = 1;
    serve_args.shard.shard_count = 2;
    serve_args.shard.peers = vec!["peer-0:50051".into()];
    let serving = serve(&serve_args).await;
    let info = client(&serving)
        .await
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert_eq!(info.model, "v3-tiny-f32");
    assert_eq!(info.architecture, "deepseek_v3");
    assert_eq!(info.num_layers, 3);
    assert_eq!(info.vocab_size, 512);
    assert_eq!(info.num_routed_experts, 16);
    assert!(info.parameter_count > 0);
    // (kv_lora_rank 32 + rope 8) x 3 layers x 4 bytes
    assert_eq!(info.kv_cache_bytes_per_token, 480);
    assert_eq!(
        info.kv_cache_capacity_tokens,
        (64u64 << 20) / block_bytes("v3-tiny-f32", 16) * 16
    );
    assert_eq!((info.shard_rank, info.shard_count), (1, 2));
    assert_eq!(info.peers, vec!["peer-0:50051".to_owned()]);
    let (_, text) = http_get(&serving, "/metrics").await;
    assert_eq!(metric(&text, "kv_cache_bytes_per_token"), 480.0);
    assert!(metric(&text, "model_load_seconds") > 0.0);
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_all_complete() {
    let serving = serve(&args("v3-tiny-f32")).await;
    let client = client(&serving).await;
    let streams = (0..32u32).map(|i| {
        let mut client = client.clone();
        async move {
            let prompt: Vec<u32> = (0..8).map(|t| 3 + (i * 7 + t) % 500).collect();
            generate(&mut client, greedy_request(&prompt, 16)).await
        }
    });
    for result in join_all(streams).await {
        let (tokens, last) = result.expect("stream completes");
        assert_eq!(tokens.len(), 16);
        assert_eq!(last.finish_reason(), FinishReason::Length);
    }
    let (_, text) = http_get(&serving, "/metrics").await;
    assert_eq!(metric(&text, "generation_tokens_total"), 32.0 * 16.0);
    assert!(text.contains(
        r#"latentserve_request_success_total{finish_reason="length",model="v3-tiny-f32"} 32"#
    ));
    // Continuous batching: far fewer steps than one per token per request.
    let steps = metric(&text, "batch_size_count");
    assert!(steps < 32.0 * 16.0 / 2.0, "{steps} steps for 512 tokens");
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_16_gives_the_same_tokens_as_each_request_alone() {
    let serving = serve(&args("v2-lite-f16")).await;
    let mut client = client(&serving).await;
    let requests: Vec<GenerateRequest> = (0..16u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(6 + i)).map(|t| 3 + (i * 31 + t * 17) % 500).collect();
            if i % 2 == 0 {
                greedy_request(&prompt, 12)
            } else {
                seeded_request(&prompt, 12, u64::from(i))
            }
        })
        .collect();
    let mut alone = Vec::new();
    for request in &requests {
        alone.push(
            generate(&mut client, request.clone())
                .await
                .expect("alone")
                .0,
        );
    }
    let batched = join_all(requests.iter().map(|request| {
        let mut client = client.clone();
        let request = request.clone();
        async move { generate(&mut client, request).await }
    }))
    .await;
    for (i, (batched, alone)) in batched.into_iter().zip(alone).enumerate() {
        assert_eq!(batched.expect("batched").0, alone, "request {i}");
    }
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_blocks() {
    // The fixtures' 128-token context decodes in milliseconds, before the client could look at
    // the cache; the same architecture with a long context keeps the request running for
    // thousands of steps.
    let dir = tempfile::tempdir().expect("temp dir");
    let serve_args = long_context_args(dir.path());
    let serving = serve(&serve_args).await;
    let mut client = client(&serving).await;
    let mut stream = client
        .generate(greedy_request(&[3, 4, 5], 8000))
        .await
        .expect("accepted")
        .into_inner();
    stream
        .message()
        .await
        .expect("first message")
        .expect("some");
    // Gauges are set after the step that streamed the token, so wait for them too.
    wait_for_metrics(&serving, "the running request's blocks", |text| {
        metric(text, "kv_cache_usage_ratio") > 0.0
    })
    .await;
    drop(stream);
    wait_for_metrics(&serving, "blocks freed after cancellation", |text| {
        metric(text, "kv_cache_usage_ratio") == 0.0 && metric(text, "requests_running") == 0.0
    })
    .await;
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut serve_args = long_context_args(dir.path());
    serve_args.max_batch_size = 1;
    serve_args.max_queue = 1;
    let serving = serve(&serve_args).await;
    let mut client = client(&serving).await;
    // The first request runs; once it has produced a token it holds the only batch slot, and it
    // is long enough to hold it while the others arrive.
    let mut running = client
        .generate(greedy_request(&[3, 4, 5], LONG_REQUEST_TOKENS))
        .await
        .expect("accepted")
        .into_inner();
    running
        .message()
        .await
        .expect("first message")
        .expect("some");
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for _ in 0..4 {
        match client
            .generate(greedy_request(&[6, 7], LONG_REQUEST_TOKENS))
            .await
        {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => outcomes.push(status),
        }
    }
    // The queue was full because the first request still ran: it had not generated all of its
    // tokens after the refusals (the counter counts a token before it is streamed), and the
    // one queued request has generated none, as the only slot was taken.
    let (_, text) = http_get(&serving, "/metrics").await;
    let generated = metric(&text, "generation_tokens_total");
    assert!(
        generated < f64::from(LONG_REQUEST_TOKENS),
        "the first request had finished ({generated} tokens) before the queue filled"
    );
    wait_for_metrics(&serving, "one request running and one waiting", |text| {
        metric(text, "requests_running") == 1.0 && metric(text, "requests_waiting") == 1.0
    })
    .await;
    assert_eq!(held.len(), 1, "exactly one request fits in the queue");
    assert_eq!(outcomes.len(), 3);
    for status in outcomes {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("queue is full"),
            "{}",
            status.message()
        );
    }
    drop(held);
    drop(running);
    wait_for_metrics(&serving, "the queue to empty", |text| {
        metric(text, "requests_waiting") == 0.0 && metric(text, "requests_running") == 0.0
    })
    .await;
    drain(serving).await;
}

/// How one request with a client deadline ended: the tokens streamed before its end, and the
/// finish reason or the error.
async fn generate_with_timeout(
    client: &mut InferenceClient<Channel>,
    timeout: Duration,
) -> (usize, Result<FinishReason, tonic::Status>) {
    let mut request = tonic::Request::new(greedy_request(&[3, 4, 5], LONG_REQUEST_TOKENS));
    request.set_timeout(timeout);
    let mut stream = match client.generate(request).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return (0, Err(status)),
    };
    let mut tokens = 0;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                tokens += message.token_ids.len();
                if message.finish_reason() != FinishReason::Unspecified {
                    return (tokens, Ok(message.finish_reason()));
                }
            }
            Ok(None) => panic!("the stream ended without a finish reason or an error"),
            Err(status) => return (tokens, Err(status)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_deadline_is_honoured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let serving = serve(&long_context_args(dir.path())).await;
    let mut client = client(&serving).await;
    // The deadline must pass while the request runs: after its first token, before its last.
    // Machines differ in speed, so a deadline that passed before the first token is doubled and
    // one that outlived the request is halved, a bounded number of times. Only the server can
    // end a stream that has begun: tonic's own timers (client and server) cover the call up to
    // the response headers, and report CANCELLED "Timeout expired" then.
    let mut timeout = Duration::from_millis(400);
    let mut tried = Vec::new();
    let (tokens, status) = loop {
        assert!(
            tried.len() < 8,
            "no deadline passed while the request ran; (timeout, tokens, outcome) tried: {tried:?}"
        );
        let (tokens, outcome) = tokio::time::timeout(
            Duration::from_secs(120),
            generate_with_timeout(&mut client, timeout),
        )
        .await
        .expect("the request ends within 120 s");
        match outcome {
            Err(status) if tokens > 0 => break (tokens, status),
            Err(status)
                if status.code() == Code::DeadlineExceeded
                    || (status.code() == Code::Cancelled
                        && status.message().contains("Timeout expired")) =>
            {
                tried.push((timeout, tokens, format!("{status:?}")));
                timeout *= 2;
            }
            Err(status) => panic!("the request failed before its first token: {status:?}"),
            Ok(finish) => {
                tried.push((timeout, tokens, format!("{finish:?}")));
                timeout /= 2;
            }
        }
        wait_for_metrics(&serving, "the request to leave", |text| {
            metric(text, "requests_running") == 0.0
        })
        .await;
    };
    assert!(
        tokens < LONG_REQUEST_TOKENS as usize,
        "{tokens} tokens and then {status:?}"
    );
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline exceeded"),
        "{}",
        status.message()
    );
    // The server drops the request and frees its blocks.
    wait_for_metrics(&serving, "the expired request to leave", |text| {
        metric(text, "requests_running") == 0.0 && metric(text, "kv_cache_usage_ratio") == 0.0
    })
    .await;
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_hits_the_prefix_cache_with_the_same_tokens() {
    let name = "v3-tiny-f32";
    let serving = serve(&args(name)).await;
    let mut client = client(&serving).await;
    let reference = reference(name);
    let request = greedy_request(&reference.prompt_ids, reference.greedy_ids.len() as u32);
    let (first, last) = generate(&mut client, request.clone()).await.expect("first");
    assert_eq!(last.usage.expect("usage").cached_prompt_tokens, 0);
    let (second, last) = generate(&mut client, request).await.expect("second");
    // 66 prompt tokens: the first four 16-token blocks come from the cache.
    assert_eq!(last.usage.expect("usage").cached_prompt_tokens, 64);
    assert_eq!(first, reference.greedy_ids);
    assert_eq!(second, reference.greedy_ids);
    let (_, text) = http_get(&serving, "/metrics").await;
    assert_eq!(metric(&text, "prefix_cache_hits_total"), 64.0);
    assert_eq!(metric(&text, "prefix_cache_queries_total"), 132.0);
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_a_tiny_cache_still_completes_every_request_correctly() {
    let name = "v3-tiny-f32";
    let mut serve_args = args(name);
    // 11 blocks of 16 tokens; each request needs 5 for its 66-token prompt and grows to 8 by
    // its 60th new token: two that run at once cannot both finish, and one must give way. The
    // long generation keeps the first request running while the others arrive, however fast
    // the machine decodes.
    serve_args.kv_cache_memory = 11 * block_bytes(name, 16);
    serve_args.no_prefix_caching = true;
    let serving = serve(&serve_args).await;
    let client = client(&serving).await;
    let reference = reference(name);
    let results = join_all((0..6).map(|_| {
        let mut client = client.clone();
        let request = greedy_request(&reference.prompt_ids, 60);
        async move { generate(&mut client, request).await }
    }))
    .await;
    let outputs: Vec<Vec<u32>> = results
        .into_iter()
        .map(|result| result.expect("completes").0)
        .collect();
    // The reference covers the first tokens; a preempted request recomputes the rest and must
    // arrive at the same ones as every other.
    assert_eq!(
        outputs[0][..reference.greedy_ids.len()],
        reference.greedy_ids
    );
    for output in &outputs {
        assert_eq!(output, &outputs[0]);
    }
    let (_, text) = http_get(&serving, "/metrics").await;
    assert!(
        metric(&text, "preemptions_total") > 0.0,
        "no preemption happened"
    );
    // The engine updates its gauges after the step that streamed the last token, so a client
    // can read /metrics first.
    wait_for_metrics(&serving, "every block freed", |text| {
        metric(text, "kv_cache_usage_ratio") == 0.0
    })
    .await;
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_and_do_not_disturb_others() {
    let serving = serve(&args("v3-tiny-f32")).await;
    let mut client = client(&serving).await;
    let cases = [
        (
            GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(String::new())),
                ..GenerateRequest::default()
            },
            "prompt: text is empty",
        ),
        (
            greedy_request(&[3, 4], 200),
            "exceeds the context limit of 128",
        ),
        (
            greedy_request(&[3, 9999], 4),
            "outside the vocabulary of 512",
        ),
        (
            GenerateRequest {
                logprobs: 30,
                ..greedy_request(&[3], 4)
            },
            "logprobs must be at most 20",
        ),
    ];
    for (request, expected) in cases {
        let status = client.generate(request).await.expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(expected), "{}", status.message());
    }

    // A `string` field that is not UTF-8, sent as raw bytes on the wire.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawGenerateRequest {
        #[prost(bytes = "vec", tag = "2")]
        text: Vec<u8>,
    }
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", serving.server.grpc_addr))
            .expect("url")
            .connect()
            .await
            .expect("connects"),
    );
    grpc.ready().await.expect("ready");
    let status = grpc
        .server_streaming::<_, latentserve_proto::v1::GenerateResponse, _>(
            tonic::Request::new(RawGenerateRequest {
                text: vec![b'a', 0xff, 0xfe],
            }),
            "/latentserve.v1.Inference/Generate".parse().expect("path"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("bad UTF-8 rejected");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());

    let mut ok = greedy_request(&[3, 4, 5], 4);
    ok.stopping = Some(StoppingCriteria {
        max_tokens: Some(4),
        ..StoppingCriteria::default()
    });
    let (tokens, _) = generate(&mut client, ok)
        .await
        .expect("a good request still works");
    assert!(!tokens.is_empty());
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_requests_and_finishes_running_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let serving = serve(&long_context_args(dir.path())).await;
    let mut client = client(&serving).await;
    let (status, _) = http_get(&serving, "/readyz").await;
    assert_eq!(status, 200);
    let mut running = client
        .generate(greedy_request(&[3, 4, 5], DRAINED_REQUEST_TOKENS))
        .await
        .expect("accepted")
        .into_inner();
    running.message().await.expect("first").expect("some");
    let metrics_addr = serving.server.metrics_addr;
    let drain = tokio::spawn(serving.server.drain(Duration::from_secs(60)));
    // Wait (bounded) until draining has begun: new requests are refused.
    let mut refused = None;
    for _ in 0..500 {
        match client.generate(greedy_request(&[3], 2)).await {
            Err(status) if status.code() == Code::Unavailable => {
                refused = Some(status);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let refused = refused.expect("new requests are refused while draining");
    assert!(
        refused.message().contains("draining"),
        "{}",
        refused.message()
    );
    // The request was still running once draining had begun: it had not generated all of its
    // tokens (the counter counts a token before it is streamed), so the drain had to wait for it.
    let (_, text) = http_get_at(metrics_addr, "/metrics").await;
    let generated = metric(&text, "generation_tokens_total");
    assert!(
        generated < f64::from(DRAINED_REQUEST_TOKENS),
        "the request had finished ({generated} tokens) before draining began"
    );
    let mut count = 1;
    let mut finish = FinishReason::Unspecified;
    while let Some(message) = running
        .message()
        .await
        .expect("the running stream continues")
    {
        count += message.token_ids.len();
        finish = message.finish_reason();
    }
    assert_eq!(
        (count, finish),
        (DRAINED_REQUEST_TOKENS as usize, FinishReason::Length)
    );
    drain.await.expect("drain task").expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_streams_calls_checks_health_and_lists_services() {
    let name = "v3-tiny-f32";
    let serving = serve(&args(name)).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python/test_grpc_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .arg("--target")
        .arg(serving.server.grpc_addr.to_string())
        .arg("--reference")
        .arg(fixture(name).join("reference.json"))
        .output()
        .await
        .expect("python3 runs (scripts/install-deps installs grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_alone_in_its_group_serves_no_expert_exchange() {
    let serving = serve(&args("v3-tiny-f32")).await;
    let channel = Channel::from_shared(format!("http://{}", serving.server.grpc_addr))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut experts = latentserve_proto::v1::experts_client::ExpertsClient::new(channel);
    let status = experts
        .handshake(latentserve_proto::v1::HandshakeRequest {
            rank: 1,
            fingerprint: String::new(),
        })
        .await
        .expect_err("no Experts service on a single worker's port");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    drain(serving).await;
}
