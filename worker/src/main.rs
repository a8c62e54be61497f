//! `latentserve-worker`: loads a DeepSeek-style checkpoint and runs it.

use clap::Parser;
use latentserve_worker::cli::Cli;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    Cli::parse().run()
}
