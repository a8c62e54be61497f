//! `latentserve.v1.WorkerStatus` on a real server on 127.0.0.1: the prompt files a router needs,
//! and a status stream whose cache blocks are the worker's own block hashes.

mod serve_support;

use std::time::Duration;

use latentserve_proto::v1::worker_status_client::WorkerStatusClient;
use latentserve_proto::v1::{GetPromptFilesRequest, WatchWorkerRequest};
use latentserve_worker::engine::blocks::block_hash;
use serve_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_learns_the_prompt_files_and_every_cached_block() {
    let mut serve_args = args("v3-tiny-f32");
    serve_args.block_size = 4;
    let serving = serve(&serve_args).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", serving.server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut status = WorkerStatusClient::new(channel).max_decoding_message_size(64 << 20);
    let files = status
        .get_prompt_files(GetPromptFilesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(files.model, "v3-tiny-f32");
    assert_eq!(files.block_size, 4);
    assert!(files.prefix_caching);
    let on_disk = std::fs::read(fixture("v3-tiny-f32").join("tokenizer.json")).unwrap();
    assert_eq!(files.tokenizer_json, on_disk);

    let mut states = status
        .watch(WatchWorkerRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = states.message().await.unwrap().expect("a snapshot");
    assert!(first.snapshot);
    assert!(first.total_blocks > 0);
    assert_eq!(first.available_blocks, first.total_blocks);

    // Ten tokens: two full shareable blocks, keyed as the block manager keys them.
    let prompt: Vec<u32> = (5..15).collect();
    let mut inference = client(&serving).await;
    generate(&mut inference, greedy_request(&prompt, 2))
        .await
        .unwrap();
    let first_block = block_hash(None, &prompt[..4]);
    let second_block = block_hash(Some(first_block), &prompt[4..8]);
    let mut cached = std::collections::BTreeSet::new();
    while !(cached.contains(&first_block) && cached.contains(&second_block)) {
        let state = tokio::time::timeout(Duration::from_secs(10), states.message())
            .await
            .expect("a report within 10 s")
            .unwrap()
            .expect("the stream goes on");
        assert!(!state.snapshot);
        cached.extend(state.cached_added);
    }

    // Draining ends the stream with a state that says so, and the drain does not wait for it.
    let drained = tokio::spawn(drain(serving));
    let mut last = None;
    while let Some(state) = tokio::time::timeout(Duration::from_secs(10), states.message())
        .await
        .expect("the stream ends within 10 s")
        .unwrap_or(None)
    {
        last = Some(state);
    }
    assert!(last.expect("a last state").draining);
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the drain ends")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_prompt_tokens_count_the_prefill_left_and_are_zero_when_idle() {
    let mut serve_args = args("v3-tiny-f32");
    serve_args.block_size = 4;
    // Eight tokens a step: a 40-token prompt takes five steps to prefill.
    serve_args.max_tokens_per_step = 8;
    let serving = serve(&serve_args).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", serving.server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut states = WorkerStatusClient::new(channel)
        .watch(WatchWorkerRequest {})
        .await
        .unwrap()
        .into_inner();
    let snapshot = states.message().await.unwrap().expect("a snapshot");
    assert_eq!(snapshot.queued_prompt_tokens, 0, "idle: nothing to prefill");

    let prompt: Vec<u32> = (5..45).collect();
    let mut inference = client(&serving).await;
    generate(&mut inference, greedy_request(&prompt, 2))
        .await
        .unwrap();
    // Every step's report is buffered for the watcher: read them up to the idle one.
    let mut queued = Vec::new();
    loop {
        let state = tokio::time::timeout(Duration::from_secs(10), states.message())
            .await
            .expect("a report within 10 s")
            .unwrap()
            .expect("the stream goes on");
        queued.push(state.queued_prompt_tokens);
        if state.running_requests == 0 && state.waiting_requests == 0 {
            assert_eq!(state.queued_prompt_tokens, 0, "idle again: {queued:?}");
            break;
        }
    }
    assert!(
        queued.iter().any(|&q| q > 0),
        "a chunked prefill shows its remaining tokens: {queued:?}"
    );
    assert!(queued.iter().all(|&q| q <= 40), "{queued:?}");
    drain(serving).await;
}
