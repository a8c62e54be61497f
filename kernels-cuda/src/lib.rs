//! The CUDA side of the latentserve worker, as far as it is built today.
//!
//! What is here, all of it usable on a machine without CUDA:
//! - [`probe`]: finds the driver library, the GPU `cuda:N`, NVRTC, cuBLAS and cuBLASLt, and
//!   returns typed one-line errors ([`CudaError`]) instead of cudarc's panics ([`libs`]).
//! - [`sources`] and [`compile`]: the CUDA C kernels (RMSNorm, RoPE/YaRN, latent-cache write,
//!   SiLU-mul, split-KV absorbed MLA decode + combine), compiled by NVRTC at start-up for the
//!   GPU's architecture, with the binaries kept in an on-disk [`cache`].
//! - Host-side layouts: FP8 block-scale bookkeeping ([`fp8`]), CUDA-graph batch buckets
//!   ([`graphs`]), device block tables ([`block_table`]) and the MLA decode launch plan ([`mla`]).
//!
//! What is not here yet: device memory, kernel launches, cuBLAS(Lt) GEMMs, and therefore any
//! forward pass on a GPU. Nothing in this crate has run on a GPU.
//!
//! cudarc is used with `dynamic-loading`: no CUDA library is linked at build time, so the crate
//! (and the worker's `cuda` feature) builds anywhere.

pub mod block_table;
pub mod cache;
pub mod compile;
pub mod error;
pub mod fp8;
pub mod graphs;
pub mod libs;
pub mod mla;
pub mod probe;
pub mod sources;

pub use compile::Arch;
pub use error::{CudaError, Library};
pub use probe::{DeviceInfo, probe};

/// The compiled kernel programs of one architecture.
#[derive(Debug)]
pub struct KernelSet {
    pub arch: Arch,
    pub nvrtc_version: (u32, u32),
    pub programs: Vec<compile::Compiled>,
    /// Programs that came from the cache (the rest were compiled now).
    pub cached: usize,
    /// A cache write that failed (the kernels are still usable), for the caller to log.
    pub cache_warning: Option<CudaError>,
}

/// Every program of [`sources::ALL`] for `arch`, from `cache` or compiled by NVRTC.
pub fn build_kernels(arch: Arch, cache: &cache::KernelCache) -> Result<KernelSet, CudaError> {
    let nvrtc_version = compile::nvrtc_version()?;
    let mut programs = Vec::new();
    let mut cached = 0;
    let mut cache_warning = None;
    for source in sources::ALL {
        let key = cache::CacheKey::new(&source, arch, nvrtc_version);
        let (compiled, origin, warning) =
            cache.get_or_compile(&source, &key, || compile::compile(&source, arch))?;
        if origin == cache::Origin::Cache {
            cached += 1;
        }
        if cache_warning.is_none() {
            cache_warning = warning;
        }
        programs.push(compiled);
    }
    Ok(KernelSet {
        arch,
        nvrtc_version,
        programs,
        cached,
        cache_warning,
    })
}
