//! `latentserve-router`: per-request, prefix-cache- and load-aware balancing in front of a
//! ModelDeployment's workers.

use clap::Parser;
use latentserve_router::cli::{RouterArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    run(RouterArgs::parse()).await
}
