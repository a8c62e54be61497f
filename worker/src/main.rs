//! `latentserve-worker`: loads a DeepSeek-style checkpoint and serves it.

use clap::{Parser, Subcommand};
use latentserve_worker::cli;

/// The latentserve inference worker.
#[derive(Debug, Parser)]
#[command(name = "latentserve-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load against a running server: throughput and TTFT/ITL/end-to-end latency percentiles.
    BenchServe(cli::bench_serve::BenchServeArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::BenchServe(args) => runtime()?.block_on(cli::bench_serve::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
