//! What `--device cuda:N` finds: the driver, the GPU, and the libraries the CUDA path needs.

use cudarc::driver::{result, sys};

use crate::error::{CudaError, Library};
use crate::libs::{self, DRIVER_PROBE_SYMBOLS, NVRTC_SYMBOLS};

/// One GPU as the driver describes it, with the versions of the libraries that were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    /// e.g. "NVIDIA H200".
    pub name: String,
    /// (major, minor), e.g. (9, 0).
    pub compute_capability: (u32, u32),
    pub total_memory_bytes: u64,
    pub multiprocessors: u32,
    /// The CUDA version the driver supports, e.g. (13, 0).
    pub driver_version: (u32, u32),
    /// (major, minor) of the NVRTC that loaded.
    pub nvrtc_version: (u32, u32),
    /// The file names the libraries loaded under.
    pub driver_file: String,
    pub nvrtc_file: String,
    pub cublas_file: String,
    pub cublaslt_file: String,
}

impl DeviceInfo {
    /// `sm_90` for compute capability 9.0: the NVRTC architecture of this GPU.
    pub fn arch(&self) -> crate::compile::Arch {
        crate::compile::Arch::new(self.compute_capability.0, self.compute_capability.1)
    }

    /// One line for logs and error messages.
    pub fn summary(&self) -> String {
        format!(
            "cuda:{} {} (sm_{}{}, {:.1} GiB, {} SMs), driver CUDA {}.{}, NVRTC {}.{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            self.multiprocessors,
            self.driver_version.0,
            self.driver_version.1,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
        )
    }
}

/// Splits the driver's version number (1000 * major + 10 * minor) into (major, minor).
pub fn split_driver_version(version: i32) -> (u32, u32) {
    let v = version.max(0) as u32;
    (v / 1000, (v % 1000) / 10)
}

fn driver_call<T>(call: &'static str, r: Result<T, result::DriverError>) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::Driver {
        call,
        code: format!("{:?}", e.0),
    })
}

/// Finds GPU `ordinal` and the libraries the CUDA path loads, in the order a user would fix
/// them: driver library, a GPU, that ordinal, then NVRTC, cuBLAS and cuBLASLt. Never panics on
/// a missing library or symbol (see [`crate::libs`]).
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let driver = libs::load(Library::Driver)?;
    driver.require_symbols(&DRIVER_PROBE_SYMBOLS)?;
    let driver_version = {
        let mut v = 0;
        // SAFETY: the symbol is present (checked above); v is a valid out-pointer.
        driver_call("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v).result()
        })?;
        split_driver_version(v)
    };
    if let Err(e) = result::init() {
        let reason = format!("{:?}", e.0);
        return Err(match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => CudaError::NoDevice {
                driver_version: format!("{}.{}", driver_version.0, driver_version.1),
                reason,
            },
            _ => CudaError::Driver {
                call: "cuInit",
                code: reason,
            },
        });
    }
    let count = driver_call("cuDeviceGetCount", result::device::get_count())?.max(0) as usize;
    if count == 0 {
        return Err(CudaError::NoDevice {
            driver_version: format!("{}.{}", driver_version.0, driver_version.1),
            reason: "cuDeviceGetCount = 0".into(),
        });
    }
    if ordinal >= count {
        return Err(CudaError::OrdinalOutOfRange { ordinal, count });
    }
    let dev = driver_call("cuDeviceGet", result::device::get(ordinal as i32))?;
    let name = driver_call("cuDeviceGetName", result::device::get_name(dev))?;
    // SAFETY: dev came from cuDeviceGet.
    let attr = |a: sys::CUdevice_attribute| unsafe { result::device::get_attribute(dev, a) };
    use sys::CUdevice_attribute as A;
    let major = driver_call(
        "cuDeviceGetAttribute",
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
    )?;
    let minor = driver_call(
        "cuDeviceGetAttribute",
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
    )?;
    let sms = driver_call(
        "cuDeviceGetAttribute",
        attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
    )?;
    // SAFETY: dev came from cuDeviceGet.
    let memory = driver_call("cuDeviceTotalMem", unsafe {
        result::device::total_mem(dev)
    })?;

    let nvrtc = libs::load(Library::Nvrtc)?;
    nvrtc.require_symbols(&NVRTC_SYMBOLS)?;
    let nvrtc_version = crate::compile::nvrtc_version()?;
    let cublas = libs::load(Library::Cublas)?;
    let cublaslt = libs::load(Library::CublasLt)?;
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        total_memory_bytes: memory as u64,
        multiprocessors: sms.max(0) as u32,
        driver_version,
        nvrtc_version,
        driver_file: driver.file,
        nvrtc_file: nvrtc.file,
        cublas_file: cublas.file,
        cublaslt_file: cublaslt.file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_versions_split_like_cuda_does() {
        assert_eq!(split_driver_version(13000), (13, 0));
        assert_eq!(split_driver_version(12080), (12, 8));
        assert_eq!(split_driver_version(12040), (12, 4));
    }

    #[test]
    fn probe_without_a_driver_is_a_typed_error_not_a_panic() {
        match probe(0) {
            Err(CudaError::LibraryMissing {
                library: Library::Driver,
                tried,
                ..
            }) => assert!(tried.iter().any(|t| t == "libcuda.so.1"), "{tried:?}"),
            Err(other) => {
                // A machine with a driver but no GPU, or without the toolkit libraries.
                let text = other.to_string();
                assert!(!text.contains('\n'), "{text}");
                eprintln!("note: the probe got past the driver library here: {text}");
            }
            Ok(info) => eprintln!("note: a GPU is present here: {}", info.summary()),
        }
    }

    #[test]
    fn summary_is_one_line() {
        let info = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_memory_bytes: 150_754_820_096,
            multiprocessors: 132,
            driver_version: (13, 0),
            nvrtc_version: (13, 0),
            driver_file: "libcuda.so.1".into(),
            nvrtc_file: "libnvrtc.so.13".into(),
            cublas_file: "libcublas.so.13".into(),
            cublaslt_file: "libcublasLt.so.13".into(),
        };
        assert_eq!(
            info.summary(),
            "cuda:0 NVIDIA H200 (sm_90, 140.4 GiB, 132 SMs), driver CUDA 13.0, NVRTC 13.0"
        );
        assert_eq!(info.arch().to_string(), "sm_90");
    }
}
