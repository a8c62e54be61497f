//! `latentserve-worker`: loads a DeepSeek-style checkpoint and serves it.

use clap::Parser;

/// The latentserve inference worker.
#[derive(Debug, Parser)]
#[command(name = "latentserve-worker", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cli {} = Cli::parse();
    Ok(())
}
