//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc (with `dynamic-loading`) dlopens a library the first time one of its functions is
//! called and **panics** when no candidate file name loads ("Unable to dynamically load the
//! \"cuda\" shared library ...") or when a symbol is missing ("Missing symbol cuInit"). The
//! worker must instead exit with one line, so every entry point here first tries the same
//! candidate names cudarc would (its own `get_lib_name_candidates`), with the same loader
//! (libloading), and checks the symbols the caller is about to use. Only then are cudarc's
//! functions called, and they find the library already loaded.

use std::path::Path;

use crate::error::{CudaError, Library};

/// The file names cudarc tries for `library`, in its order.
pub fn candidates(library: Library) -> Vec<String> {
    // (For the driver cudarc also tries the stem `nvcuda`, which only exists on Windows.)
    let mut names = cudarc::get_lib_name_candidates(library.stem());
    // cudarc's list repeats some names; each is tried once.
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// A library that loaded, with the name it loaded under.
#[derive(Debug)]
pub struct Loaded {
    pub library: Library,
    pub file: String,
    handle: libloading::Library,
}

impl Loaded {
    /// Fails with [`CudaError::SymbolMissing`] naming the first of `symbols` the library lacks.
    pub fn require_symbols(&self, symbols: &[&'static str]) -> Result<(), CudaError> {
        for &symbol in symbols {
            // SAFETY: only the address is looked up; nothing is called through it.
            let found = unsafe { self.handle.get::<*const ()>(symbol.as_bytes()) };
            if found.is_err() {
                return Err(CudaError::SymbolMissing {
                    library: self.library,
                    file: self.file.clone(),
                    symbol,
                });
            }
        }
        Ok(())
    }
}

/// Loads `library` under the first candidate name that loads (as cudarc will), or says which
/// names were tried on which search path.
pub fn load(library: Library) -> Result<Loaded, CudaError> {
    let tried = candidates(library);
    let mut first_error = None;
    for name in &tried {
        // SAFETY: loading a CUDA library runs its initialisers, as cudarc's own loading would.
        match unsafe { libloading::Library::new(name) } {
            Ok(handle) => {
                return Ok(Loaded {
                    library,
                    file: name.clone(),
                    handle,
                });
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Err(CudaError::LibraryMissing {
        library,
        tried,
        ld_library_path: std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "(unset)".into()),
        first_error: first_error.unwrap_or_default(),
    })
}

/// Entry points of the driver API the probe calls.
pub const DRIVER_PROBE_SYMBOLS: [&str; 8] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceTotalMem_v2",
    "cuGetErrorName",
];

/// Entry points of NVRTC the kernel compiler calls.
pub const NVRTC_SYMBOLS: [&str; 10] = [
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

/// Loads NVRTC from an explicit folder (e.g. the `nvidia/cu13/lib` folder of the
/// `nvidia-cuda-nvrtc` Python wheel, or PyTorch's bundled copy), so that cudarc's later dlopen by
/// file name finds the already loaded library (the dynamic loader matches loaded libraries by
/// soname). The handles stay loaded for the life of the process.
///
/// Returns the file that was loaded, or `None` when the folder holds no libnvrtc.
pub fn preload_nvrtc_from(dir: &Path) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut files: Vec<std::path::PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    // libnvrtc-builtins first: libnvrtc dlopens it by name when it compiles.
    let builtins = files
        .iter()
        .find(|p| file_name_starts(p, "libnvrtc-builtins.so"));
    let nvrtc = files
        .iter()
        .find(|p| file_name_starts(p, "libnvrtc.so."))
        .or_else(|| files.iter().find(|p| file_name_starts(p, "libnvrtc.so")))?;
    for path in builtins.into_iter().chain([nvrtc]) {
        // SAFETY: as in `load`.
        let handle = unsafe { libloading::Library::new(path) }.ok()?;
        std::mem::forget(handle);
    }
    Some(nvrtc.clone())
}

fn file_name_starts(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_the_driver_soname_and_cuda_12_and_13_toolkits() {
        let driver = candidates(Library::Driver);
        assert!(driver.contains(&"libcuda.so.1".to_string()), "{driver:?}");
        let nvrtc = candidates(Library::Nvrtc);
        for name in ["libnvrtc.so.13", "libnvrtc.so.12"] {
            assert!(nvrtc.contains(&name.to_string()), "{nvrtc:?}");
        }
        let lt = candidates(Library::CublasLt);
        assert!(lt.contains(&"libcublasLt.so.12".to_string()), "{lt:?}");
    }

    #[test]
    fn a_library_that_is_not_there_is_a_typed_one_line_error() {
        // No machine has CUDA under this stem; the error lists every name tried.
        let err = load(Library::Driver).err();
        // On a machine with a driver the load succeeds; the error path is what is checked.
        if let Some(err) = err {
            let text = err.to_string();
            assert!(!text.contains('\n'));
            assert!(text.contains("libcuda.so.1"), "{text}");
            assert!(matches!(
                err,
                CudaError::LibraryMissing {
                    library: Library::Driver,
                    ..
                }
            ));
        } else {
            eprintln!(
                "note: a CUDA driver is installed here; the missing-library path is not exercised"
            );
        }
    }

    #[test]
    fn preload_from_a_folder_without_nvrtc_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(preload_nvrtc_from(dir.path()).is_none());
        assert!(preload_nvrtc_from(&dir.path().join("absent")).is_none());
    }
}
