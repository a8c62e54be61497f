//! `--device cpu|cuda|cuda:N`: which device a command runs on, and the start-up check that
//! refuses a device this binary cannot use, in one line, before anything is loaded.
//!
//! Today only `cpu` runs a model. `cuda` is parsed everywhere; without the `cuda` cargo feature
//! it is refused at once, and with it the GPU is probed (driver library, device, NVRTC, cuBLAS)
//! and then refused too, because the CUDA forward pass is not in this build yet.

use std::fmt;
use std::str::FromStr;

use clap::Args;

/// A device as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// A `--device` value that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device {given:?}: expected cpu, cuda or cuda:N (N a GPU ordinal, e.g. cuda:0)")]
pub struct DeviceParseError {
    pub given: String,
}

impl FromStr for Device {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DeviceParseError {
            given: s.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => {
                let ordinal = lower.strip_prefix("cuda:").ok_or_else(err)?;
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                ordinal.parse().map(Self::Cuda).map_err(|_| err())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
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
    pub fn require_supported(&self) -> anyhow::Result<()> {
        require_supported(self.device)
    }
}

/// See [`DeviceArgs::require_supported`].
pub fn require_supported(device: Device) -> anyhow::Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(ordinal) => require_cuda(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn require_cuda(ordinal: usize) -> anyhow::Result<()> {
    anyhow::bail!(
        "--device cuda:{ordinal}: this latentserve-worker was built without the `cuda` feature (rebuild with `cargo build -p latentserve-worker --features cuda`, or use the latentserve-worker-cuda image)"
    )
}

#[cfg(feature = "cuda")]
fn require_cuda(ordinal: usize) -> anyhow::Result<()> {
    // Messages are flattened to one line: the error has no source chain to print.
    let info = latentserve_kernels_cuda::probe(ordinal)
        .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?;
    tracing::debug!(
        driver = %info.driver_file,
        nvrtc = %info.nvrtc_file,
        cublas = %info.cublas_file,
        cublaslt = %info.cublaslt_file,
        "CUDA libraries"
    );
    anyhow::bail!(
        "--device cuda:{ordinal}: found {}, but the CUDA forward pass is not in this build yet (only device probing and kernel compilation are); run with --device cpu",
        info.summary()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms_parse() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("CPU".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:7".parse(), Ok(Device::Cuda(7)));
        assert_eq!(" cuda:12 ".parse(), Ok(Device::Cuda(12)));
    }

    #[test]
    fn bad_strings_name_the_accepted_forms() {
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda:x",
            "cuda0",
            "cuda:0:1",
            "metal",
            "cuda:99999999999999999999999",
        ] {
            let err = bad.parse::<Device>().unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("expected cpu, cuda or cuda:N"),
                "{bad:?}: {text}"
            );
            assert!(text.contains(&format!("{bad:?}")), "{text}");
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(3)] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
    }

    #[test]
    fn cpu_is_always_supported() {
        require_supported(Device::Cpu).unwrap();
    }

    #[test]
    fn cuda_is_refused_in_one_line() {
        // Without the feature: always. With it: no build has a CUDA forward pass yet, so every
        // outcome of the probe (missing driver, no GPU, or a GPU found) is a refusal.
        let err = require_supported(Device::Cuda(0)).unwrap_err();
        // No cause chain: `main` prints it as one `Error: ...` line.
        assert_eq!(err.chain().count(), 1);
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("--device cuda:0: "), "{text}");
        if cfg!(not(feature = "cuda")) {
            assert!(text.contains("built without the `cuda` feature"), "{text}");
        }
    }

    #[test]
    fn the_flag_defaults_to_cpu() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            device: DeviceArgs,
        }
        assert_eq!(Cli::parse_from(["x"]).device.device, Device::Cpu);
        assert_eq!(
            Cli::parse_from(["x", "--device", "cuda:1"]).device.device,
            Device::Cuda(1)
        );
        let err = Cli::try_parse_from(["x", "--device", "tpu"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    }
}
