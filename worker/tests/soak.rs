//! Soak: thousands of requests against one in-process server on 127.0.0.1, as careless and
//! hostile clients send them (cancelled streams, tiny deadlines, prompts past the context, bad
//! fields, malformed OpenAI bodies) mixed with ordinary ones through gRPC and OpenAI's API. Then:
//! every request got exactly one outcome, no cache block is left referenced, no request is left
//! in the engine, the heap the process holds is back within 3 MiB of what it held after a
//! warm-up (a leak of 300 bytes per request shows), and the resident memory within 25% (what
//! the heap count cannot see, such as threads; glibc keeps freed memory for reuse, which alone
//! moved it by 6-11% here).
//!
//! `LATENTSERVE_SOAK_REQUESTS` sets the count (default 10,000).

mod serve_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use latentserve_proto::v1::{GenerateRequest, SamplingParams, generate_request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serve_support::*;
use tonic::Code;

/// What one request ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Finished,
    /// The client went away on purpose.
    Cancelled,
    /// An error status the request was expected to be able to get.
    Refused,
}

const CONCURRENCY: usize = 32;
/// Heap growth allowed over the run: bounded state (caches, the outcomes themselves) took
/// 0.6-1.1 MiB whether the run had 3,000, 10,000 or 20,000 requests.
const MAX_HEAP_GROWTH_KIB: i64 = 3072;

/// The system allocator, counting the bytes this process holds allocated (server and clients):
/// unlike the resident memory, this is what a leak moves and what the allocator's retention of
/// freed memory after a peak does not.
struct CountingAllocator;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator with the caller's arguments; the
// counter is bookkeeping only.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn live_kib() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed) as i64 / 1024
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn question(rng: &mut StdRng) -> String {
    format!(
        "What is {} plus {}?",
        rng.random_range(0..100),
        rng.random_range(0..100)
    )
}

/// One request of a random kind; panics on an outcome no client of that kind may get.
async fn one_request(
    kind: u32,
    rng: &mut StdRng,
    grpc: &mut latentserve_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
    openai: std::net::SocketAddr,
) -> Outcome {
    let text = question(rng);
    let grpc_request = |text: String, temperature: f32| {
        let mut request = greedy_request(&[], 6);
        request.prompt = Some(generate_request::Prompt::Text(text));
        request.sampling = Some(SamplingParams {
            temperature: Some(temperature),
            seed: Some(7),
            ..SamplingParams::default()
        });
        request.stopping.as_mut().expect("stopping").ignore_eos = false;
        request
    };
    // Refusals any request may meet under load: a full queue.
    let refused_by_load = |code: Code| code == Code::ResourceExhausted;
    match kind {
        // An ordinary gRPC generation, greedy or sampled.
        0..=3 => match generate(grpc, grpc_request(text, (kind % 2) as f32)).await {
            Ok((_, last)) => {
                assert!(last.usage.is_some(), "the last message carries the usage");
                Outcome::Finished
            }
            Err(status) if refused_by_load(status.code()) => Outcome::Refused,
            Err(status) => panic!("an ordinary request failed: {status:?}"),
        },
        // A stream dropped after its first message.
        4 => {
            let mut request = grpc_request(text, 1.0);
            request.stopping.as_mut().expect("stopping").ignore_eos = true;
            request.stopping.as_mut().expect("stopping").max_tokens = Some(40);
            match grpc.generate(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let _ = stream.message().await;
                    Outcome::Cancelled
                }
                Err(status) if refused_by_load(status.code()) => Outcome::Refused,
                Err(status) => panic!("a request to cancel was refused: {status:?}"),
            }
        }
        // A deadline that passes before or during the generation.
        5 => {
            let mut request = tonic::Request::new(grpc_request(text, 0.0));
            request.set_timeout(Duration::from_micros(rng.random_range(50..5_000)));
            match grpc.generate(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => return Outcome::Finished,
                            Err(status) => {
                                assert!(
                                    matches!(
                                        status.code(),
                                        Code::DeadlineExceeded | Code::Cancelled
                                    ),
                                    "{status:?}"
                                );
                                return Outcome::Refused;
                            }
                        }
                    }
                }
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted
                        ),
                        "{status:?}"
                    );
                    Outcome::Refused
                }
            }
        }
        // A prompt past the context, or a field out of range.
        6 => {
            let request = if rng.random_bool(0.5) {
                grpc_request(text.repeat(50), 0.0)
            } else {
                GenerateRequest {
                    logprobs: 99,
                    ..grpc_request(text, 0.0)
                }
            };
            let status = generate(grpc, request).await.expect_err("a bad request");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            Outcome::Refused
        }
        // An OpenAI chat, whole or streamed.
        7 | 8 => {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": 6,
                "stream": kind == 8,
            });
            let (status, answer) =
                http_post_at(openai, "/v1/chat/completions", &body.to_string()).await;
            match status {
                200 => {
                    if kind == 8 {
                        let events = sse_data(&answer);
                        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                    }
                    Outcome::Finished
                }
                429 => Outcome::Refused,
                other => panic!("an ordinary chat got {other}: {answer}"),
            }
        }
        // A malformed OpenAI body.
        _ => {
            let body = if rng.random_bool(0.5) {
                r#"{"prompt": "x", "temperature": "hot"}"#.to_owned()
            } else {
                "{not json".to_owned()
            };
            let (status, answer) = http_post_at(openai, "/v1/completions", &body).await;
            assert_eq!(status, 400, "{answer}");
            Outcome::Refused
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_careless_requests_leave_nothing_behind() {
    let total: usize = std::env::var("LATENTSERVE_SOAK_REQUESTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10_000);
    let mut serve_args = args("v3-tiny-f32");
    serve_args.model = Some(demo_model());
    serve_args.model_name = Some("demo".into());
    serve_args.max_batch_size = 16;
    serve_args.max_queue = 48;
    serve_args.kv_cache_memory = 2 << 20;
    let serving = serve(&serve_args).await;
    let openai = serving.server.openai_addr.expect("OpenAI port");
    let grpc = client(&serving).await;

    let run = |count: usize, seed: u64| {
        let next = Arc::new(AtomicUsize::new(0));
        let outcomes: Vec<_> = (0..CONCURRENCY)
            .map(|worker| {
                let (next, mut grpc) = (next.clone(), grpc.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed * 1000 + worker as u64);
                    let mut seen = Vec::new();
                    while next.fetch_add(1, Ordering::SeqCst) < count {
                        let kind = rng.random_range(0..10);
                        let outcome = tokio::time::timeout(
                            Duration::from_secs(120),
                            one_request(kind, &mut rng, &mut grpc, openai),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("a request of kind {kind} hung"));
                        seen.push(outcome);
                    }
                    seen
                })
            })
            .collect();
        async move {
            let mut all = Vec::new();
            for task in outcomes {
                all.extend(task.await.expect("a client task panicked"));
            }
            all
        }
    };

    // Warm up (allocator arenas, caches, lazily built kernels), then measure.
    let warm = run(total / 20 + 50, 1).await;
    let settle = |serving: &latentserve_worker::cli::serve::Serving| {
        let engine = serving.handle.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(60);
            while engine.in_flight() > 0 {
                assert!(
                    Instant::now() < until,
                    "requests still in flight after 60 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    settle(&serving).await;
    let baseline = resident_kib();
    let live_baseline = live_kib();
    let started = Instant::now();
    let outcomes = run(total, 2).await;
    settle(&serving).await;
    let after = resident_kib();
    let live_after = live_kib();

    assert_eq!(
        outcomes.len(),
        total,
        "every request got exactly one outcome"
    );
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let finished = count(Outcome::Finished);
    println!(
        "soak: {total} requests in {:.1} s: {finished} finished, {} cancelled, {} refused; \
         after {} warm-up requests: heap {live_baseline} KiB, RSS {baseline} KiB; after the \
         run: heap {live_after} KiB, RSS {after} KiB",
        started.elapsed().as_secs_f64(),
        count(Outcome::Cancelled),
        count(Outcome::Refused),
        warm.len(),
    );
    assert!(
        finished > total / 3,
        "too few requests finished: {finished}"
    );

    let (_, metrics) = http_get(&serving, "/metrics").await;
    assert_eq!(
        metric(&metrics, "kv_cache_usage_ratio"),
        0.0,
        "a cache block leaked"
    );
    assert_eq!(metric(&metrics, "requests_running"), 0.0);
    assert_eq!(metric(&metrics, "requests_waiting"), 0.0);
    assert!(
        live_after <= live_baseline + MAX_HEAP_GROWTH_KIB,
        "the heap grew from {live_baseline} KiB to {live_after} KiB"
    );
    assert!(
        after as f64 <= baseline as f64 * 1.25,
        "resident memory grew from {baseline} KiB to {after} KiB"
    );
    drain(serving).await;
}
