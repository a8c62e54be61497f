//! Subcommands of `latentserve-worker`.

pub mod bench;
pub mod bench_serve;
pub mod generate;
pub mod init_random;
pub mod model_dir;
pub mod parse;
pub mod plan_placement;
pub mod serve;
pub mod shard_args;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::device::{Device, DeviceParseError, DeviceUnavailable, require_supported};

/// The latentserve inference worker.
#[derive(Debug, Parser)]
#[command(name = "latentserve-worker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one generation from a prompt, without a server.
    Generate(generate::GenerateArgs),
    /// Write a model directory with random weights for a config.
    InitRandom(init_random::InitRandomArgs),
    /// Measure offline model speed (prefill, decode at several depths, memory).
    Bench(bench::BenchArgs),
    /// Serve a model over gRPC (metrics and probes on a second port) until SIGTERM drains it.
    Serve(Box<serve::ServeArgs>),
    /// Load against a running server: throughput and TTFT/ITL/end-to-end latency percentiles.
    BenchServe(bench_serve::BenchServeArgs),
    /// A balanced expert placement file from a group's expert counters (EPLB).
    PlanPlacement(plan_placement::PlanPlacementArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Generate(args) => generate::run(&args),
            Command::InitRandom(args) => init_random::run(&args),
            Command::Bench(args) => bench::run(&args),
            Command::Serve(args) => async_runtime()?.block_on(serve::run(*args)),
            Command::BenchServe(args) => async_runtime()?.block_on(bench_serve::run(args)),
            Command::PlanPlacement(args) => plan_placement::run(&args),
        }
    }
}

/// The tokio runtime of the network subcommands (the model subcommands need none).
fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The `--device` flag, flattened into `serve`, `generate` and `bench`.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceArgs {
    /// Device to run on: cpu, cuda or cuda:N. CUDA needs a binary built with the `cuda` feature.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: DeviceParseError| e.to_string())
}

impl DeviceArgs {
    /// Fails, with one line naming what is missing, unless this binary can run on the device.
    /// Call it first thing in a command, before any model is loaded.
    pub fn require_supported(&self) -> Result<(), DeviceUnavailable> {
        require_supported(self.device)
    }
}

/// Storage dtype of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
}

impl WeightDtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_defaults_to_cpu() {
        #[derive(Parser)]
        struct DeviceOnly {
            #[command(flatten)]
            device: DeviceArgs,
        }
        assert_eq!(DeviceOnly::parse_from(["x"]).device.device, Device::Cpu);
        assert_eq!(
            DeviceOnly::parse_from(["x", "--device", "cuda:1"])
                .device
                .device,
            Device::Cuda(1)
        );
        let err = DeviceOnly::try_parse_from(["x", "--device", "tpu"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    }
}
