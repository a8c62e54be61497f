//! Errors of the CUDA side. Every message is one line (the worker prints it as its only output
//! when `--device cuda` cannot be used), and names what is missing and what was searched.

use std::path::PathBuf;

/// A CUDA library the worker loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Library {
    /// The driver API, `libcuda.so.1`: installed with the NVIDIA driver, mounted into containers
    /// by the NVIDIA container toolkit.
    Driver,
    /// The run-time compiler, `libnvrtc.so.13` or `.12`: part of the CUDA toolkit/runtime image.
    Nvrtc,
    /// `libcublas.so.13` or `.12`.
    Cublas,
    /// `libcublasLt.so.13` or `.12`.
    CublasLt,
}

impl Library {
    pub const ALL: [Library; 4] = [Self::Driver, Self::Nvrtc, Self::Cublas, Self::CublasLt];

    /// The stem cudarc builds its candidate file names from.
    pub fn stem(self) -> &'static str {
        match self {
            Self::Driver => "cuda",
            Self::Nvrtc => "nvrtc",
            Self::Cublas => "cublas",
            Self::CublasLt => "cublasLt",
        }
    }

    /// What a user would call it.
    pub fn title(self) -> &'static str {
        match self {
            Self::Driver => "CUDA driver library",
            Self::Nvrtc => "NVRTC library (CUDA run-time compiler)",
            Self::Cublas => "cuBLAS library",
            Self::CublasLt => "cuBLASLt library",
        }
    }

    /// The file name a Linux install has, for messages.
    pub fn usual_file(self) -> &'static str {
        match self {
            Self::Driver => "libcuda.so.1",
            Self::Nvrtc => "libnvrtc.so.13 or .12",
            Self::Cublas => "libcublas.so.13 or .12",
            Self::CublasLt => "libcublasLt.so.13 or .12",
        }
    }

    /// Where it normally comes from, for messages.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Driver => {
                "install the NVIDIA driver, or run the container with the NVIDIA container runtime and a GPU"
            }
            Self::Nvrtc | Self::Cublas | Self::CublasLt => {
                "install the CUDA runtime libraries (the nvidia/cuda runtime image has them) or add their folder to LD_LIBRARY_PATH"
            }
        }
    }
}

/// Why the CUDA device cannot be used, or a CUDA-side step failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// None of the file names cudarc would dlopen could be loaded.
    #[error(
        "{} not found: no {} could be loaded ({} names tried: {}; search path LD_LIBRARY_PATH={}, then /etc/ld.so.cache, /lib, /usr/lib); {}",
        .library.title(), .library.usual_file(), .tried.len(), .tried.join(", "), .ld_library_path, .library.hint()
    )]
    LibraryMissing {
        library: Library,
        tried: Vec<String>,
        /// The value of LD_LIBRARY_PATH when the search ran ("(unset)" when unset).
        ld_library_path: String,
        /// The first loader error, e.g. "libcuda.so.1: cannot open shared object file".
        first_error: String,
    },
    /// The library loaded, but lacks an entry point the worker calls (a driver or toolkit too old).
    #[error(
        "{} {} lacks the symbol {symbol}: it is older than this build supports (CUDA 12 or 13 needed)",
        .library.title(), .file
    )]
    SymbolMissing {
        library: Library,
        file: String,
        symbol: &'static str,
    },
    /// The driver loaded and initialised but sees no GPU.
    #[error(
        "CUDA driver {driver_version} is loaded but reports no GPU ({reason}); check that the container was given a GPU (e.g. nvidia.com/gpu: 1) and that nvidia-smi lists it"
    )]
    NoDevice {
        driver_version: String,
        reason: String,
    },
    /// `cuda:N` with N past the last GPU.
    #[error(
        "CUDA device {ordinal} does not exist: the driver reports {count} GPU(s), ordinals 0..={last}",
        last = .count.saturating_sub(1)
    )]
    OrdinalOutOfRange { ordinal: usize, count: usize },
    /// A driver call failed.
    #[error("CUDA driver call {call} failed: {code}")]
    Driver { call: &'static str, code: String },
    /// NVRTC rejected a kernel source; `log` is NVRTC's full log (first error line in the message).
    #[error("NVRTC failed to compile {program} for {arch}: {}", first_error_line(.log))]
    Compile {
        program: String,
        arch: String,
        log: String,
    },
    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC call {call} failed: {code}")]
    Nvrtc { call: &'static str, code: String },
    /// Reading or writing the on-disk kernel cache.
    #[error("kernel cache {}: {source}", .path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The first line of a compiler log that reports an error (else its first non-empty line).
pub fn first_error_line(log: &str) -> &str {
    let mut lines = log.lines().map(str::trim).filter(|l| !l.is_empty());
    log.lines()
        .map(str::trim)
        .find(|l| l.contains("error"))
        .or_else(|| lines.next())
        .unwrap_or("(empty log)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_and_name_what_is_missing() {
        let missing = CudaError::LibraryMissing {
            library: Library::Driver,
            tried: vec!["libcuda.so".into(), "libcuda.so.1".into()],
            ld_library_path: "(unset)".into(),
            first_error: "libcuda.so: cannot open shared object file".into(),
        };
        let text = missing.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("CUDA driver library not found: no libcuda.so.1"));
        assert!(text.contains("2 names tried: libcuda.so, libcuda.so.1"));
        let range = CudaError::OrdinalOutOfRange {
            ordinal: 3,
            count: 2,
        };
        assert_eq!(
            range.to_string(),
            "CUDA device 3 does not exist: the driver reports 2 GPU(s), ordinals 0..=1"
        );
        let compile = CudaError::Compile {
            program: "rmsnorm.cu".into(),
            arch: "sm_90".into(),
            log: "\nrmsnorm.cu(3): warning: x\nrmsnorm.cu(7): error: identifier \"y\" is undefined\n\n1 error detected".into(),
        };
        assert_eq!(
            compile.to_string(),
            "NVRTC failed to compile rmsnorm.cu for sm_90: rmsnorm.cu(7): error: identifier \"y\" is undefined"
        );
    }
}
