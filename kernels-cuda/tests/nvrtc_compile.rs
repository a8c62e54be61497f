//! Compiles every kernel source with the real NVRTC, for sm_90 (H100/H200) and sm_80 (A100).
//! NVRTC needs no GPU and no driver, so this runs on CPU-only machines when the library is there:
//!
//!   pip install nvidia-cuda-nvrtc            # CUDA 13 NVRTC (nvidia/cu13/lib/libnvrtc.so.13)
//!   pip install nvidia-cuda-nvrtc-cu12       # or CUDA 12 (nvidia/cuda_nvrtc/lib/libnvrtc.so.12)
//!
//! The test finds it through LATENTSERVE_NVRTC_DIR (the folder holding libnvrtc.so.*), else the
//! normal loader path (LD_LIBRARY_PATH), else by asking `python3` where the `nvidia` wheels are.
//! Without it the tests print a SKIPPED line and pass, unless LATENTSERVE_REQUIRE_NVRTC=1 (set it
//! in CI after installing the wheel, so that a broken setup fails instead of skipping).

use std::path::PathBuf;
use std::sync::OnceLock;

use latentserve_kernels_cuda::cache::KernelCache;
use latentserve_kernels_cuda::compile::{self, Arch};
use latentserve_kernels_cuda::sources::{self, KernelSource};
use latentserve_kernels_cuda::{CudaError, build_kernels};

/// Folders the pip wheels put NVRTC in, under each `nvidia` package path python3 reports.
fn python_nvrtc_dirs() -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import nvidia\nfor p in nvidia.__path__: print(p)"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|root| {
            ["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"]
                .into_iter()
                .map(move |sub| PathBuf::from(root).join(sub))
        })
        .filter(|dir| dir.is_dir())
        .collect()
}

/// Makes NVRTC loadable if it can be found; returns how, or why not.
fn nvrtc() -> &'static Result<String, String> {
    static SETUP: OnceLock<Result<String, String>> = OnceLock::new();
    SETUP.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LATENTSERVE_NVRTC_DIR") {
            let dir = PathBuf::from(dir);
            if let Some(file) = latentserve_kernels_cuda::libs::preload_nvrtc_from(&dir) {
                return Ok(format!("{} (LATENTSERVE_NVRTC_DIR)", file.display()));
            }
        }
        if let Ok(loaded) = compile::require_nvrtc() {
            return Ok(format!("{} (loader path)", loaded.file));
        }
        for dir in python_nvrtc_dirs() {
            if let Some(file) = latentserve_kernels_cuda::libs::preload_nvrtc_from(&dir) {
                return Ok(format!("{} (python3 nvidia package)", file.display()));
            }
        }
        Err(match compile::require_nvrtc() {
            Err(e) => e.to_string(),
            Ok(_) => "unreachable".into(),
        })
    })
}

/// Runs `body` when NVRTC is available; otherwise prints the skip notice (or fails when
/// LATENTSERVE_REQUIRE_NVRTC=1).
fn with_nvrtc(test: &str, body: impl FnOnce()) {
    match nvrtc() {
        Ok(how) => {
            eprintln!("{test}: NVRTC {how}");
            body();
        }
        Err(why) => {
            assert!(
                std::env::var("LATENTSERVE_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "LATENTSERVE_REQUIRE_NVRTC=1 but NVRTC is not loadable: {why}"
            );
            eprintln!(
                "SKIPPED {test}: NVRTC is not loadable ({why}). `pip install nvidia-cuda-nvrtc` and set LATENTSERVE_NVRTC_DIR to its nvidia/cu13/lib folder to run it."
            );
        }
    }
}

fn check_compiles(source: &KernelSource, arch: Arch) {
    let compiled = compile::compile(source, arch).unwrap_or_else(|e| match &e {
        CudaError::Compile { log, .. } => panic!("{e}\n{log}"),
        _ => panic!("{e}"),
    });
    let entries = compiled.ptx_entries();
    for entry in source.entries() {
        assert!(
            entries.contains(&entry),
            "{} for {arch}: PTX lacks entry {entry}; has {entries:?}",
            source.file
        );
    }
    assert_eq!(
        entries.len(),
        source.entries().len(),
        "{}: unexpected extra entries {entries:?}",
        source.file
    );
    assert!(
        compiled.ptx.contains(&format!(".target {arch}")),
        "{}: PTX not for {arch}",
        source.file
    );
    assert_eq!(
        &compiled.cubin[..4],
        b"\x7fELF",
        "{}: the CUBIN is not an ELF image",
        source.file
    );
}

#[test]
fn every_kernel_compiles_for_sm_90() {
    with_nvrtc("every_kernel_compiles_for_sm_90", || {
        for source in sources::ALL {
            check_compiles(&source, Arch::SM_90);
        }
    });
}

#[test]
fn every_kernel_compiles_for_sm_80() {
    with_nvrtc("every_kernel_compiles_for_sm_80", || {
        for source in sources::ALL {
            check_compiles(&source, Arch::SM_80);
        }
    });
}

#[test]
fn a_broken_kernel_is_a_one_line_compile_error_with_the_full_log_kept() {
    with_nvrtc("a_broken_kernel_is_a_one_line_compile_error", || {
        let broken = KernelSource {
            text: "extern \"C\" __global__ void broken_f32(float* x) { x[0] = undefined_name; }\n",
            ..sources::SILU_MUL
        };
        let err = compile::compile(&broken, Arch::SM_90).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.starts_with("NVRTC failed to compile silu_mul.cu for sm_90: "),
            "{text}"
        );
        assert!(text.contains("undefined_name"), "{text}");
        match err {
            CudaError::Compile { log, .. } => assert!(log.contains("error"), "{log}"),
            other => panic!("{other}"),
        }
    });
}

#[test]
fn start_up_build_compiles_once_then_reads_the_cache() {
    with_nvrtc("start_up_build_compiles_once_then_reads_the_cache", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(Some(dir.path().join("cuda-kernels")));
        let started = std::time::Instant::now();
        let first = build_kernels(Arch::SM_90, &cache).unwrap();
        let compile_time = started.elapsed();
        assert_eq!(first.cached, 0);
        assert!(first.cache_warning.is_none());
        let started = std::time::Instant::now();
        let second = build_kernels(Arch::SM_90, &cache).unwrap();
        let cached_time = started.elapsed();
        assert_eq!(second.cached, sources::ALL.len());
        for (a, b) in first.programs.iter().zip(&second.programs) {
            assert_eq!(a, b);
        }
        eprintln!(
            "NVRTC {}.{}: compiled {} programs for sm_90 in {compile_time:?}; cache hit in {cached_time:?}",
            first.nvrtc_version.0,
            first.nvrtc_version.1,
            first.programs.len()
        );
        let files = std::fs::read_dir(dir.path().join("cuda-kernels/sm_90"))
            .unwrap()
            .count();
        assert_eq!(
            files,
            2 * sources::ALL.len(),
            "a .ptx and a .cubin per program"
        );
    });
}
