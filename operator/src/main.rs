//! `latentserve-operator`: reconciles `ModelDeployment` objects into worker pods.

use clap::Parser;

/// The latentserve Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "latentserve-operator", version, about)]
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
