//! The on-disk cache of compiled kernels, so that NVRTC runs once per (program, GPU
//! architecture, NVRTC version) rather than at every start.
//!
//! Layout: `ROOT/sm_90/rmsnorm-<hash>-nvrtc13.0.{ptx,cubin}`, where ROOT is
//! `$LATENTSERVE_CACHE/cuda-kernels`, else `$XDG_CACHE_HOME/latentserve/cuda-kernels`, else
//! `$HOME/.cache/latentserve/cuda-kernels`. The hash covers the full program text and the
//! compiler options, so an edited kernel or changed define never reuses a stale binary. Files
//! are written to a temporary name and renamed, so a crashed or concurrent writer never leaves a
//! half file under the final name.

use std::path::{Path, PathBuf};

use crate::compile::{self, Arch, Compiled};
use crate::error::CudaError;
use crate::sources::KernelSource;

/// What identifies one compiled program.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The source file name without `.cu`, e.g. `rmsnorm`.
    pub stem: String,
    /// FNV-1a 64 of the program text and the options (see [`source_hash`]).
    pub source_hash: u64,
    pub arch: Arch,
    pub nvrtc_version: (u32, u32),
}

impl CacheKey {
    pub fn new(source: &KernelSource, arch: Arch, nvrtc_version: (u32, u32)) -> Self {
        let options = compile::options(arch, &source.define_pairs());
        Self {
            stem: source
                .file
                .strip_suffix(".cu")
                .unwrap_or(source.file)
                .to_string(),
            source_hash: source_hash(&source.program_text(), &options),
            arch,
            nvrtc_version,
        }
    }

    /// The file name without extension: `rmsnorm-0123456789abcdef-nvrtc13.0`.
    pub fn file_stem(&self) -> String {
        format!(
            "{}-{:016x}-nvrtc{}.{}",
            self.stem, self.source_hash, self.nvrtc_version.0, self.nvrtc_version.1
        )
    }

    /// `ROOT/sm_90/<file_stem>.ptx`
    pub fn ptx_path(&self, root: &Path) -> PathBuf {
        root.join(self.arch.to_string())
            .join(format!("{}.ptx", self.file_stem()))
    }

    /// `ROOT/sm_90/<file_stem>.cubin`
    pub fn cubin_path(&self, root: &Path) -> PathBuf {
        root.join(self.arch.to_string())
            .join(format!("{}.cubin", self.file_stem()))
    }
}

/// FNV-1a (64 bit) over the program text, a separator, and each option: stable across Rust
/// releases and platforms (unlike `DefaultHasher`), which an on-disk key needs.
pub fn source_hash(text: &str, options: &[String]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(text.as_bytes());
    for option in options {
        feed(&[0]);
        feed(option.as_bytes());
    }
    hash
}

/// The cache folder from the environment (see the module docs); `None` when neither
/// LATENTSERVE_CACHE, XDG_CACHE_HOME nor HOME is set.
pub fn cache_root_from(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("LATENTSERVE_CACHE") {
        return Some(PathBuf::from(dir).join("cuda-kernels"));
    }
    if let Some(dir) = set("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("latentserve").join("cuda-kernels"));
    }
    set("HOME").map(|home| {
        PathBuf::from(home)
            .join(".cache")
            .join("latentserve")
            .join("cuda-kernels")
    })
}

/// [`cache_root_from`] over the process environment.
pub fn cache_root() -> Option<PathBuf> {
    cache_root_from(|name| std::env::var(name).ok())
}

/// A cache folder (or none: then every start compiles).
#[derive(Debug, Clone)]
pub struct KernelCache {
    root: Option<PathBuf>,
}

/// Where one program's binaries came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Compiled,
}

impl KernelCache {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self { root }
    }

    /// The cache under [`cache_root`].
    pub fn from_env() -> Self {
        Self::new(cache_root())
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The cached binaries of `source` for `key`, if both files are there.
    pub fn get(&self, source: &KernelSource, key: &CacheKey) -> Option<Compiled> {
        let root = self.root.as_deref()?;
        let ptx = std::fs::read_to_string(key.ptx_path(root)).ok()?;
        let cubin = std::fs::read(key.cubin_path(root)).ok()?;
        if ptx.is_empty() || cubin.is_empty() {
            return None;
        }
        Some(Compiled {
            file: source.file,
            arch: key.arch,
            ptx,
            cubin,
        })
    }

    /// Stores both binaries (temporary file, then rename).
    pub fn put(&self, key: &CacheKey, compiled: &Compiled) -> Result<(), CudaError> {
        let Some(root) = self.root.as_deref() else {
            return Ok(());
        };
        write_atomic(&key.ptx_path(root), compiled.ptx.as_bytes())?;
        write_atomic(&key.cubin_path(root), &compiled.cubin)
    }

    /// The cached binaries, or compiles with `compile` and stores them. A cache that cannot be
    /// written (read-only home in a container) is not an error: the compiled result is returned
    /// with the write error, for the caller to log.
    pub fn get_or_compile(
        &self,
        source: &KernelSource,
        key: &CacheKey,
        compile: impl FnOnce() -> Result<Compiled, CudaError>,
    ) -> Result<(Compiled, Origin, Option<CudaError>), CudaError> {
        if let Some(hit) = self.get(source, key) {
            return Ok((hit, Origin::Cache, None));
        }
        let compiled = compile()?;
        let write_error = self.put(key, &compiled).err();
        Ok((compiled, Origin::Compiled, write_error))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CudaError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CudaError::Cache { path, source }
    };
    let dir = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn root_prefers_latentserve_cache_then_xdg_then_home() {
        assert_eq!(
            cache_root_from(env(&[
                ("LATENTSERVE_CACHE", "/var/cache/ls"),
                ("HOME", "/home/u")
            ])),
            Some(PathBuf::from("/var/cache/ls/cuda-kernels"))
        );
        assert_eq!(
            cache_root_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/home/u")])),
            Some(PathBuf::from("/x/latentserve/cuda-kernels"))
        );
        assert_eq!(
            cache_root_from(env(&[("LATENTSERVE_CACHE", ""), ("HOME", "/home/u")])),
            Some(PathBuf::from("/home/u/.cache/latentserve/cuda-kernels"))
        );
        assert_eq!(cache_root_from(env(&[])), None);
    }

    #[test]
    fn key_changes_with_source_options_arch_and_nvrtc_version() {
        let base = CacheKey::new(&sources::RMSNORM, Arch::SM_90, (13, 0));
        assert_eq!(base.stem, "rmsnorm");
        assert_eq!(
            base,
            CacheKey::new(&sources::RMSNORM, Arch::SM_90, (13, 0)),
            "deterministic"
        );
        assert_ne!(
            base.source_hash,
            CacheKey::new(&sources::ROPE, Arch::SM_90, (13, 0)).source_hash
        );
        // The arch is an option too, so the hash changes with it as well as the folder.
        let sm80 = CacheKey::new(&sources::RMSNORM, Arch::SM_80, (13, 0));
        assert_ne!(base.source_hash, sm80.source_hash);
        let other_nvrtc = CacheKey::new(&sources::RMSNORM, Arch::SM_90, (12, 8));
        assert_ne!(base.file_stem(), other_nvrtc.file_stem());
        let text = sources::RMSNORM.program_text();
        assert_ne!(
            source_hash(&text, &["-DA=1".into()]),
            source_hash(&text, &["-DA=2".into()])
        );
        // Option boundaries matter: ["ab"] is not ["a", "b"].
        assert_ne!(
            source_hash("", &["ab".into()]),
            source_hash("", &["a".into(), "b".into()])
        );
    }

    #[test]
    fn fnv1a_matches_its_published_test_vectors() {
        assert_eq!(source_hash("", &[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(source_hash("a", &[]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(source_hash("foobar", &[]), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn paths_are_per_arch_and_name_the_nvrtc_version() {
        let key = CacheKey {
            stem: "mla_decode".into(),
            source_hash: 0xabc,
            arch: Arch::SM_90,
            nvrtc_version: (13, 0),
        };
        let root = Path::new("/c");
        assert_eq!(
            key.ptx_path(root),
            Path::new("/c/sm_90/mla_decode-0000000000000abc-nvrtc13.0.ptx")
        );
        assert_eq!(
            key.cubin_path(root),
            Path::new("/c/sm_90/mla_decode-0000000000000abc-nvrtc13.0.cubin")
        );
    }

    #[test]
    fn get_or_compile_compiles_once_then_reads_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(Some(dir.path().join("cuda-kernels")));
        let key = CacheKey::new(&sources::SILU_MUL, Arch::SM_90, (13, 0));
        let fake = || Compiled {
            file: "silu_mul.cu",
            arch: Arch::SM_90,
            ptx: ".visible .entry silu_mul_f32(\n".into(),
            cubin: vec![0x7f, b'E', b'L', b'F'],
        };
        let mut calls = 0;
        let (first, origin, write_error) = cache
            .get_or_compile(&sources::SILU_MUL, &key, || {
                calls += 1;
                Ok(fake())
            })
            .unwrap();
        assert_eq!((origin, write_error.is_none()), (Origin::Compiled, true));
        let (second, origin, _) = cache
            .get_or_compile(&sources::SILU_MUL, &key, || {
                calls += 1;
                Ok(fake())
            })
            .unwrap();
        assert_eq!(origin, Origin::Cache);
        assert_eq!(first, second);
        assert_eq!(calls, 1);
        assert!(key.cubin_path(cache.root().unwrap()).is_file());
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("cuda-kernels/sm_90"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn an_unwritable_cache_still_returns_the_compiled_kernels() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the cache folder should be: create_dir_all fails.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let cache = KernelCache::new(Some(blocker.join("cuda-kernels")));
        let key = CacheKey::new(&sources::RMSNORM, Arch::SM_80, (12, 8));
        let (compiled, origin, write_error) = cache
            .get_or_compile(&sources::RMSNORM, &key, || {
                Ok(Compiled {
                    file: "rmsnorm.cu",
                    arch: Arch::SM_80,
                    ptx: "x".into(),
                    cubin: vec![1],
                })
            })
            .unwrap();
        assert_eq!(origin, Origin::Compiled);
        assert_eq!(compiled.cubin, [1]);
        let err = write_error.expect("the write failed");
        assert!(matches!(err, CudaError::Cache { .. }), "{err}");
    }
}
