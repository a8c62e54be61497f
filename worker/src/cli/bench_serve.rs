//! `latentserve-worker bench-serve`: load against a running server, like vLLM's serving benchmark.
//! Sends `--requests` generations with `--concurrency` in flight, random token-id prompts of
//! `--input-len` tokens (the first `--shared-prefix` of them common to all, or to one of
//! `--prefixes` system prompts; with `--token-pool`, drawn from a few token ids only),
//! `--output-len` new tokens each (EOS ignored, greedy), and reports
//! throughput, latency percentiles and prefix-cache hits. The load goes through gRPC `Generate`
//! or, with `--api openai`, through streamed `/v1/completions`; to one server, or with `--pin`
//! to several, each client keeping to one (what a Kubernetes ClusterIP Service does to
//! long-lived connections).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    GenerateRequest, GetModelInfoRequest, SamplingParams, StoppingCriteria, TokenIds,
    generate_request,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

/// The API the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `latentserve.v1.Inference/Generate`, streamed.
    Grpc,
    /// `POST /v1/completions` with `stream: true` (server-sent events) and `logprobs: 0`, so that
    /// every token arrives in a chunk that says so.
    Openai,
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// gRPC address of the server, HOST:PORT or a URL (the model's vocabulary is asked there);
    /// with `--pin`, several, comma-separated.
    #[arg(long)]
    pub target: String,
    /// The API the requests go through.
    #[arg(long, value_enum, default_value_t = Api::Grpc)]
    pub api: Api,
    /// Address of the server's OpenAI API, HOST:PORT or a URL; needed with `--api openai`; with
    /// `--pin`, one per `--target`, comma-separated.
    #[arg(long)]
    pub openai_target: Option<String>,
    /// Spread the clients over the comma-separated targets, client `i` sending every request to
    /// target `i mod n`.
    #[arg(long)]
    pub pin: bool,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Requests in total.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub input_len: u32,
    /// New tokens per request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub output_len: u32,
    /// Leading prompt tokens shared by every request. One request runs alone first (a prefix
    /// cache miss); the report compares its time to first token with the others' (hits).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: u32,
    /// Distinct shared prefixes (system prompts) of `--shared-prefix` tokens; each request takes
    /// one at random. With more than one, no request runs alone first, and the report gives the
    /// prefix-cache hit rate against the ideal (every repeat of a prefix hits).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefixes: u32,
    /// Seed of the random prompts (change it to avoid hits on an earlier run's prompts).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw every prompt token from this many distinct token ids instead of the whole
    /// vocabulary: a narrow-topic workload, whose tokens keep visiting the same few routed
    /// experts (what skews expert load in real traffic). The pool depends on its size and the
    /// vocabulary only, not on `--seed`: runs with other seeds send other prompts (no prefix-cache
    /// hits between them) that load the same experts. 0: the whole vocabulary.
    #[arg(long, default_value_t = 0)]
    pub token_pool: u32,
    /// Count failed requests (before or after their first token) instead of stopping at the
    /// first one: for runs that kill a server on purpose.
    #[arg(long)]
    pub keep_going: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// p50, p90 and p99 of one latency, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (zeros when there are none).
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Self {
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

/// What one request measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTiming {
    pub ttft: f64,
    /// Gaps between consecutive tokens.
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub output_tokens: usize,
    pub cached_prompt_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub target: String,
    pub api: Api,
    pub concurrency: u32,
    pub requests: u32,
    pub input_len: u32,
    pub output_len: u32,
    pub shared_prefix: u32,
    pub prefixes: u32,
    /// Distinct token ids the prompts were drawn from (0: the whole vocabulary).
    pub token_pool: u32,
    pub pinned_targets: usize,
    pub duration_seconds: f64,
    pub output_tokens: usize,
    pub output_tokens_per_second: f64,
    pub requests_per_second: f64,
    pub ttft_seconds: Percentiles,
    pub itl_seconds: Percentiles,
    pub e2e_seconds: Percentiles,
    pub cached_prompt_tokens: usize,
    /// With a shared prefix: time to first token of the request that ran alone first (a miss).
    pub prefix_miss_ttft_seconds: Option<f64>,
    /// With a shared prefix: median TTFT of the others (hits) over the miss.
    pub prefix_hit_over_miss_ttft: Option<f64>,
    /// Cached prompt tokens if every request whose prefix was sent before had found it cached.
    pub ideal_cached_prompt_tokens: usize,
    /// `cached_prompt_tokens` over the ideal (with a shared prefix).
    pub prefix_hit_rate: Option<f64>,
    /// With `--keep-going`: requests that failed before any token arrived, and after.
    pub failed_before_first_token: usize,
    pub failed_mid_stream: usize,
}

/// Marks the error of a request that failed after its first token had arrived.
#[derive(Debug, thiserror::Error)]
#[error("failed after its first token")]
pub struct FailedMidStream;

/// The error of a request that failed, marked when tokens had arrived already.
fn failure(error: anyhow::Error, streaming: bool) -> anyhow::Error {
    if streaming {
        error.context(FailedMidStream)
    } else {
        error
    }
}

impl BenchReport {
    pub fn new(
        args: &BenchServeArgs,
        timings: &[RequestTiming],
        duration: Duration,
        miss: Option<&RequestTiming>,
        ideal_cached_prompt_tokens: usize,
    ) -> Self {
        let cached_prompt_tokens: usize = timings.iter().map(|t| t.cached_prompt_tokens).sum();
        let output_tokens = timings.iter().map(|t| t.output_tokens).sum();
        let seconds = duration.as_secs_f64().max(f64::MIN_POSITIVE);
        let ttft = Percentiles::of(&timings.iter().map(|t| t.ttft).collect::<Vec<_>>());
        let itl: Vec<f64> = timings.iter().flat_map(|t| t.itl.iter().copied()).collect();
        Self {
            target: match (args.api, &args.openai_target) {
                (Api::Openai, Some(target)) => target.clone(),
                _ => args.target.clone(),
            },
            api: args.api,
            concurrency: args.concurrency,
            requests: args.requests,
            input_len: args.input_len,
            output_len: args.output_len,
            shared_prefix: args.shared_prefix,
            prefixes: args.prefixes,
            token_pool: args.token_pool,
            pinned_targets: if args.pin {
                args.target.split(',').count()
            } else {
                1
            },
            duration_seconds: seconds,
            output_tokens,
            output_tokens_per_second: output_tokens as f64 / seconds,
            requests_per_second: timings.len() as f64 / seconds,
            ttft_seconds: ttft,
            itl_seconds: Percentiles::of(&itl),
            e2e_seconds: Percentiles::of(&timings.iter().map(|t| t.e2e).collect::<Vec<_>>()),
            cached_prompt_tokens,
            prefix_miss_ttft_seconds: miss.map(|m| m.ttft),
            prefix_hit_over_miss_ttft: miss.map(|m| ttft.p50 / m.ttft.max(f64::MIN_POSITIVE)),
            ideal_cached_prompt_tokens,
            prefix_hit_rate: (ideal_cached_prompt_tokens > 0)
                .then(|| cached_prompt_tokens as f64 / ideal_cached_prompt_tokens as f64),
            failed_before_first_token: 0,
            failed_mid_stream: 0,
        }
    }

    pub fn table(&self) -> String {
        let ms = |p: &Percentiles| {
            format!(
                "{:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                p.mean * 1e3,
                p.p50 * 1e3,
                p.p90 * 1e3,
                p.p99 * 1e3
            )
        };
        let mut out = format!(
            "target {} ({:?})  concurrency {}  requests {}  input {}  output {}  shared prefix {}\n\
             duration            {:.2} s\n\
             output tokens       {}\n\
             output tokens/s     {:.1}\n\
             requests/s          {:.3}\n\
             cached prompt toks  {}\n\
             latency (ms)              mean        p50        p90        p99\n\
             TTFT              {}\n\
             ITL               {}\n\
             end-to-end        {}\n",
            self.target,
            self.api,
            self.concurrency,
            self.requests,
            self.input_len,
            self.output_len,
            self.shared_prefix,
            self.duration_seconds,
            self.output_tokens,
            self.output_tokens_per_second,
            self.requests_per_second,
            self.cached_prompt_tokens,
            ms(&self.ttft_seconds),
            ms(&self.itl_seconds),
            ms(&self.e2e_seconds),
        );
        if let (Some(miss), Some(ratio)) = (
            self.prefix_miss_ttft_seconds,
            self.prefix_hit_over_miss_ttft,
        ) {
            out.push_str(&format!(
                "prefix miss TTFT    {:.2} ms; hit p50 / miss = {ratio:.3}\n",
                miss * 1e3
            ));
        }
        if let Some(rate) = self.prefix_hit_rate {
            out.push_str(&format!(
                "prefix hit rate     {:.3} ({} of {} ideal cached tokens, {} prefixes)\n",
                rate, self.cached_prompt_tokens, self.ideal_cached_prompt_tokens, self.prefixes
            ));
        }
        if self.failed_before_first_token + self.failed_mid_stream > 0 {
            out.push_str(&format!(
                "failed requests     {} before their first token, {} mid-stream\n",
                self.failed_before_first_token, self.failed_mid_stream
            ));
        }
        out
    }
}

/// Seed of the `--token-pool` draw, the same for every `--seed`.
const TOKEN_POOL_SEED: u64 = 0x706f_6f6c;

/// The prompts: `count` random id sequences of `input_len` whose first `shared_prefix` ids are
/// one of `prefixes` random prefixes (chosen at random per prompt), and which prefix each has.
/// With `token_pool` > 0 every id is drawn from that many distinct ids (fewer when the
/// vocabulary has fewer), themselves drawn at random with a fixed seed (the same pool for every
/// `seed`).
pub fn make_prompts(
    count: usize,
    input_len: usize,
    shared_prefix: usize,
    prefixes: usize,
    vocab_size: u32,
    token_pool: usize,
    seed: u64,
) -> Vec<(Vec<u32>, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Low ids are the tokenizer's special tokens; random text never contains them.
    let low = 3.min(vocab_size.saturating_sub(1));
    let pool: Vec<u32> = if token_pool > 0 {
        let size = token_pool.min(vocab_size.saturating_sub(low).max(1) as usize);
        let mut pool_rng = StdRng::seed_from_u64(TOKEN_POOL_SEED);
        let mut chosen = std::collections::BTreeSet::new();
        while chosen.len() < size {
            chosen.insert(pool_rng.random_range(low..vocab_size));
        }
        chosen.into_iter().collect()
    } else {
        Vec::new()
    };
    let draw = |rng: &mut StdRng| {
        if pool.is_empty() {
            rng.random_range(low..vocab_size)
        } else {
            pool[rng.random_range(0..pool.len())]
        }
    };
    let heads: Vec<Vec<u32>> = (0..prefixes.max(1))
        .map(|_| (0..shared_prefix).map(|_| draw(&mut rng)).collect())
        .collect();
    (0..count)
        .map(|_| {
            let which = if heads.len() > 1 {
                rng.random_range(0..heads.len())
            } else {
                0
            };
            let mut prompt = heads[which].clone();
            prompt.extend((shared_prefix..input_len).map(|_| draw(&mut rng)));
            (prompt, which)
        })
        .collect()
}

/// Prompt tokens the requests could find cached, sent in `order` (prefix of each): every request
/// after the first of its prefix finds the prefix's full blocks, at most `(len - 1) / block_size`
/// blocks as the worker computes the last token anyway.
pub fn ideal_cached_tokens(
    order: &[usize],
    shared_prefix: usize,
    input_len: usize,
    block_size: usize,
) -> usize {
    if shared_prefix == 0 || block_size == 0 {
        return 0;
    }
    let blocks = (shared_prefix / block_size).min(input_len.saturating_sub(1) / block_size);
    let mut seen = std::collections::HashSet::new();
    order.iter().filter(|prefix| !seen.insert(**prefix)).count() * blocks * block_size
}

/// Where the load goes.
#[derive(Clone)]
enum LoadClient {
    Grpc(InferenceClient<Channel>),
    Openai(OpenAiClient),
}

impl LoadClient {
    async fn run_one(
        &self,
        prompt: Vec<u32>,
        output_len: u32,
        index: usize,
    ) -> anyhow::Result<RequestTiming> {
        match self {
            LoadClient::Grpc(client) => {
                run_one_grpc(client.clone(), prompt, output_len, index).await
            }
            LoadClient::Openai(client) => client.run_one(prompt, output_len, index).await,
        }
    }
}

/// Streamed completions over HTTP/1.1 (one pooled connection per request in flight, as the
/// OpenAI SDKs do).
#[derive(Clone)]
struct OpenAiClient {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<hyper::body::Bytes>,
    >,
    /// `http://HOST:PORT`, without a trailing slash.
    base: String,
    model: String,
}

impl OpenAiClient {
    fn new(base: String, model: String) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Self { http, base, model }
    }

    async fn run_one(
        &self,
        prompt: Vec<u32>,
        output_len: u32,
        index: usize,
    ) -> anyhow::Result<RequestTiming> {
        use http_body_util::BodyExt;

        let body = serde_json::json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
            // The chosen token's logprob makes every engine output a chunk, with one entry per
            // token: without it a token whose text is empty (a special token, part of a
            // character) sends nothing, and TTFT and ITL could not be timed per token.
            "logprobs": 0,
            "user": format!("bench-{index}"),
        });
        let request = hyper::Request::post(format!("{}/v1/completions", self.base))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.to_string(),
            )))
            .context("building the request")?;
        let start = Instant::now();
        let response = self
            .http
            .request(request)
            .await
            .with_context(|| format!("request {index}: no answer from {}", self.base))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!(
                "request {index} was refused ({status}): {}",
                String::from_utf8_lossy(&text)
            );
        }
        let mut timing = RequestTiming::default();
        let mut last: Option<Instant> = None;
        let mut pending = Vec::new();
        'events: while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(err) => {
                    let error = anyhow::anyhow!("request {index} failed: {err}");
                    return Err(failure(error, last.is_some()));
                }
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            // Events end with a blank line; a frame may hold several or part of one.
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let now = Instant::now();
                let text = String::from_utf8_lossy(&event);
                let Some(payload) = text.trim().strip_prefix("data:") else {
                    continue;
                };
                let payload = payload.trim();
                if payload == "[DONE]" {
                    break 'events;
                }
                let chunk: serde_json::Value = serde_json::from_str(payload)
                    .with_context(|| format!("request {index}: a chunk is not JSON: {payload}"))?;
                if let Some(error) = chunk.get("error") {
                    let error = anyhow::anyhow!("request {index} failed: {error}");
                    return Err(failure(error, last.is_some()));
                }
                if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                    timing.output_tokens =
                        usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    timing.cached_prompt_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0) as usize;
                }
                let tokens = chunk["choices"][0]["logprobs"]["tokens"]
                    .as_array()
                    .map_or(0, Vec::len);
                if tokens > 0 {
                    match last {
                        None => timing.ttft = (now - start).as_secs_f64(),
                        Some(previous) => {
                            // Several tokens in one chunk share the gap, as in the gRPC mode.
                            let gap = (now - previous).as_secs_f64() / tokens as f64;
                            timing.itl.extend(std::iter::repeat_n(gap, tokens));
                        }
                    }
                    last = Some(now);
                }
            }
        }
        timing.e2e = start.elapsed().as_secs_f64();
        if timing.output_tokens == 0 {
            bail!("request {index}: the stream ended without usage (stream_options.include_usage)");
        }
        Ok(timing)
    }
}

/// The model name a server's OpenAI API serves (its `/v1/models`).
async fn served_model(client: &OpenAiClient) -> anyhow::Result<String> {
    use http_body_util::BodyExt;

    let request = hyper::Request::get(format!("{}/v1/models", client.base))
        .body(http_body_util::Full::default())
        .context("building the request")?;
    let response = client
        .http
        .request(request)
        .await
        .with_context(|| format!("GET {}/v1/models", client.base))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET {}/v1/models: {status}: {}",
            client.base,
            String::from_utf8_lossy(&body)
        );
    }
    let list: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("GET {}/v1/models: not JSON", client.base))?;
    list["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("GET {}/v1/models lists no model", client.base))
}

async fn run_one_grpc(
    mut client: InferenceClient<Channel>,
    prompt: Vec<u32>,
    output_len: u32,
    index: usize,
) -> anyhow::Result<RequestTiming> {
    let request = GenerateRequest {
        request_id: format!("bench-{index}"),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: prompt })),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(output_len),
            ignore_eos: true,
            ..StoppingCriteria::default()
        }),
        logprobs: 0,
        cache_salt: String::new(),
    };
    let start = Instant::now();
    let mut stream = client
        .generate(request)
        .await
        .with_context(|| format!("request {index} was refused"))?
        .into_inner();
    let mut timing = RequestTiming::default();
    let mut last: Option<Instant> = None;
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                let error = anyhow::anyhow!("request {index} failed: {status}");
                return Err(failure(error, last.is_some()));
            }
        };
        let now = Instant::now();
        if !message.token_ids.is_empty() {
            match last {
                None => timing.ttft = (now - start).as_secs_f64(),
                Some(previous) => {
                    // Several tokens in one message share the gap.
                    let gap = (now - previous).as_secs_f64() / message.token_ids.len() as f64;
                    timing
                        .itl
                        .extend(std::iter::repeat_n(gap, message.token_ids.len()));
                }
            }
            last = Some(now);
            timing.output_tokens += message.token_ids.len();
        }
        if let Some(usage) = message.usage {
            timing.cached_prompt_tokens = usage.cached_prompt_tokens as usize;
        }
    }
    timing.e2e = start.elapsed().as_secs_f64();
    Ok(timing)
}

/// `HOST:PORT` or a URL as a URL.
fn url(target: &str) -> String {
    if target.contains("://") {
        target.trim_end_matches('/').to_owned()
    } else {
        format!("http://{target}")
    }
}

/// The client of one target: its gRPC channel, or its OpenAI API.
async fn load_client(
    api: Api,
    target: &str,
    openai_target: Option<&str>,
) -> anyhow::Result<(LoadClient, latentserve_proto::v1::ModelInfo)> {
    let grpc_url = url(target);
    let channel = Channel::from_shared(grpc_url.clone())
        .with_context(|| format!("--target {grpc_url} is not a valid address"))?
        .connect()
        .await
        .with_context(|| format!("connecting to {grpc_url}"))?;
    let mut grpc = InferenceClient::new(channel);
    let info = grpc
        .get_model_info(GetModelInfoRequest {})
        .await
        .with_context(|| format!("GetModelInfo on {grpc_url} failed"))?
        .into_inner();
    if info.vocab_size == 0 {
        bail!("{grpc_url} reports an empty vocabulary");
    }
    let client = match api {
        Api::Grpc => LoadClient::Grpc(grpc),
        Api::Openai => {
            let Some(target) = openai_target else {
                bail!("--api openai needs --openai-target HOST:PORT (the server's OpenAI port)");
            };
            let mut client = OpenAiClient::new(url(target), String::new());
            client.model = served_model(&client).await?;
            LoadClient::Openai(client)
        }
    };
    Ok((client, info))
}

pub async fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    if args.shared_prefix > args.input_len {
        bail!(
            "--shared-prefix ({}) must not exceed --input-len ({})",
            args.shared_prefix,
            args.input_len
        );
    }
    let targets: Vec<&str> = args.target.split(',').map(str::trim).collect();
    let openai_targets: Vec<Option<&str>> = match &args.openai_target {
        Some(list) => list.split(',').map(|t| Some(t.trim())).collect(),
        None => vec![None; targets.len()],
    };
    if targets.len() > 1 && !args.pin {
        bail!(
            "--target names {} servers: add --pin to spread the clients over them",
            targets.len()
        );
    }
    if openai_targets.len() != targets.len() {
        bail!(
            "--openai-target names {} servers for {} --target: give one per target, in the same order",
            openai_targets.len(),
            targets.len()
        );
    }
    let mut clients = Vec::new();
    let mut info = None;
    for (target, openai_target) in targets.iter().zip(&openai_targets) {
        let (client, target_info) = load_client(args.api, target, *openai_target).await?;
        clients.push(client);
        info.get_or_insert(target_info);
    }
    let info = info.context("--target names no server")?;
    let client = clients[0].clone();
    let with_miss = args.shared_prefix > 0 && args.prefixes == 1;
    let count = args.requests as usize + usize::from(with_miss);
    let mut prompts = make_prompts(
        count,
        args.input_len as usize,
        args.shared_prefix as usize,
        args.prefixes as usize,
        info.vocab_size,
        args.token_pool as usize,
        args.seed,
    );
    let miss = if with_miss {
        let (prompt, _) = prompts.remove(0);
        Some(client.run_one(prompt, args.output_len, 0).await?)
    } else {
        None
    };
    // The queue hands out from its end: the requests start in reverse order. After a miss
    // that ran alone, every request can hit.
    let start_order: Vec<usize> = prompts.iter().rev().map(|(_, prefix)| *prefix).collect();
    let (shared, input, block) = (
        args.shared_prefix as usize,
        args.input_len as usize,
        info.kv_cache_block_size as usize,
    );
    let ideal = if with_miss {
        ideal_cached_tokens(&[0, 0], shared, input, block) * prompts.len()
    } else {
        ideal_cached_tokens(&start_order, shared, input, block)
    };

    let started = Instant::now();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(
        prompts
            .into_iter()
            .map(|(prompt, _)| prompt)
            .enumerate()
            .collect::<Vec<_>>(),
    ));
    let mut workers = Vec::new();
    for worker in 0..args.concurrency as usize {
        let queue = queue.clone();
        let client = clients[worker % clients.len()].clone();
        let output_len = args.output_len;
        let keep_going = args.keep_going;
        workers.push(tokio::spawn(async move {
            let (mut timings, mut before, mut mid) = (Vec::new(), 0, 0);
            loop {
                let Some((index, prompt)) = queue.lock().await.pop() else {
                    return Ok::<_, anyhow::Error>((timings, before, mid));
                };
                match client.run_one(prompt, output_len, index + 1).await {
                    Ok(timing) => timings.push(timing),
                    Err(error) if keep_going => {
                        eprintln!("{error:#}");
                        if error.downcast_ref::<FailedMidStream>().is_some() {
                            mid += 1;
                        } else {
                            before += 1;
                        }
                    }
                    Err(error) => return Err(error),
                }
            }
        }));
    }
    let (mut timings, mut before, mut mid) = (Vec::new(), 0, 0);
    for worker in workers {
        let (done, failed_before, failed_mid) =
            worker.await.context("a benchmark task panicked")??;
        timings.extend(done);
        before += failed_before;
        mid += failed_mid;
    }
    let mut report = BenchReport::new(&args, &timings, started.elapsed(), miss.as_ref(), ideal);
    report.failed_before_first_token = before;
    report.failed_mid_stream = mid;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.p50, p.p90, p.p99, p.mean), (50.0, 90.0, 99.0, 50.5));
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
        assert_eq!(Percentiles::of(&[3.0]).p99, 3.0);
    }

    #[test]
    fn prompts_share_exactly_the_prefix() {
        let prompts: Vec<Vec<u32>> = make_prompts(3, 10, 4, 1, 100, 0, 1)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert!(prompts.iter().all(|p| p.len() == 10));
        assert!(prompts.iter().all(|p| p[..4] == prompts[0][..4]));
        assert_ne!(prompts[0][4..], prompts[1][4..]);
        assert!(prompts.iter().flatten().all(|&id| (3..100).contains(&id)));
        assert_eq!(
            make_prompts(3, 10, 4, 1, 100, 0, 1)
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>(),
            prompts
        );
    }

    #[test]
    fn several_prefixes_are_shared_by_the_prompts_that_name_them() {
        let prompts = make_prompts(64, 12, 8, 4, 1000, 0, 3);
        let mut seen = std::collections::BTreeSet::new();
        for (prompt, prefix) in &prompts {
            seen.insert(*prefix);
            let first = prompts.iter().find(|(_, p)| p == prefix).unwrap();
            assert_eq!(prompt[..8], first.0[..8]);
        }
        assert_eq!(seen.len(), 4, "64 draws reach all 4 prefixes");
        let other = prompts.iter().find(|(_, p)| *p != prompts[0].1).unwrap();
        assert_ne!(other.0[..8], prompts[0].0[..8]);
    }

    #[test]
    fn a_token_pool_limits_the_ids_and_keeps_the_default_prompts() {
        let pooled = make_prompts(32, 64, 16, 2, 32000, 8, 5);
        let ids: std::collections::BTreeSet<u32> =
            pooled.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        assert_eq!(ids.len(), 8, "32 x 64 draws reach all 8 ids of the pool");
        assert!(ids.iter().all(|&id| (3..32000).contains(&id)));
        assert!(pooled.iter().all(|(p, _)| p.len() == 64));
        // Prefixes stay shared, and the same seed gives the same prompts.
        for (prompt, prefix) in &pooled {
            let first = pooled.iter().find(|(_, p)| p == prefix).unwrap();
            assert_eq!(prompt[..16], first.0[..16]);
        }
        assert_eq!(make_prompts(32, 64, 16, 2, 32000, 8, 5), pooled);
        // Another seed: other prompts over the same pool.
        let reseeded = make_prompts(32, 64, 16, 2, 32000, 8, 6);
        assert_ne!(reseeded, pooled);
        let reseeded_ids: std::collections::BTreeSet<u32> = reseeded
            .iter()
            .flat_map(|(p, _)| p.iter().copied())
            .collect();
        assert_eq!(reseeded_ids, ids);
        // A pool larger than the vocabulary is the vocabulary (ids 3..10 here).
        let small: std::collections::BTreeSet<u32> = make_prompts(16, 32, 0, 1, 10, 100, 1)
            .into_iter()
            .flat_map(|(p, _)| p)
            .collect();
        assert_eq!(small, (3..10).collect());
        // Without a pool the prompts are the ones earlier runs sent.
        let mut rng = StdRng::seed_from_u64(1);
        let first: Vec<u32> = (0..10).map(|_| rng.random_range(3..100)).collect();
        assert_eq!(make_prompts(1, 10, 0, 1, 100, 0, 1)[0].0, first);
    }

    #[test]
    fn the_ideal_counts_every_repeat_of_a_prefix() {
        // Block 4, prefix 8 tokens: 2 blocks per repeat; the first of each prefix misses.
        assert_eq!(ideal_cached_tokens(&[0, 1, 0, 0, 1, 2], 8, 16, 4), 3 * 8);
        // A prefix as long as the prompt: the last token is always computed.
        assert_eq!(ideal_cached_tokens(&[0, 0], 8, 8, 4), 4);
        assert_eq!(ideal_cached_tokens(&[0, 0], 0, 8, 4), 0);
    }

    #[test]
    fn report_throughput_and_prefix_ratio() {
        let args = BenchServeArgs {
            target: "x".into(),
            api: Api::Grpc,
            openai_target: None,
            concurrency: 2,
            requests: 2,
            input_len: 8,
            output_len: 3,
            shared_prefix: 4,
            prefixes: 1,
            pin: false,
            keep_going: false,
            seed: 0,
            token_pool: 0,
            json: true,
        };
        let timing = |ttft| RequestTiming {
            ttft,
            itl: vec![0.1, 0.1],
            e2e: ttft + 0.2,
            output_tokens: 3,
            cached_prompt_tokens: 4,
        };
        let miss = timing(1.0);
        let report = BenchReport::new(
            &args,
            &[timing(0.1), timing(0.1)],
            Duration::from_secs(2),
            Some(&miss),
            16,
        );
        assert_eq!(report.output_tokens, 6);
        assert_eq!(report.output_tokens_per_second, 3.0);
        assert_eq!(report.requests_per_second, 1.0);
        assert_eq!(report.prefix_hit_over_miss_ttft, Some(0.1));
        assert!(report.table().contains("hit p50 / miss = 0.100"));
        assert_eq!(report.prefix_hit_rate, Some(0.5));
    }
}
