//! The CUDA C kernel sources, embedded in the binary, and the entry points each must define.

/// Prepended to every program: 16-bit float conversions, reductions, the paged-slot rule, and
/// the macro that instantiates a kernel for f32, f16 and bf16.
pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// The element types every kernel is instantiated for, as entry-name suffixes.
pub const DTYPE_SUFFIXES: [&str; 3] = ["f32", "f16", "bf16"];

/// One `.cu` file: its text, the defines it is compiled with, and its entry-point stems (each
/// instantiated as `{stem}_{f32,f16,bf16}`).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub text: &'static str,
    pub stems: &'static [&'static str],
    pub defines: &'static [(&'static str, &'static str)],
}

impl KernelSource {
    /// `-D` defines of this program.
    pub fn define_pairs(&self) -> Vec<(&'static str, String)> {
        self.defines
            .iter()
            .map(|&(k, v)| (k, v.to_string()))
            .collect()
    }

    /// Every `extern "C"` entry the compiled program must contain.
    pub fn entries(&self) -> Vec<String> {
        self.stems
            .iter()
            .flat_map(|stem| DTYPE_SUFFIXES.iter().map(move |d| format!("{stem}_{d}")))
            .collect()
    }

    /// The full program text (prelude + file), as hashed for the cache and given to NVRTC.
    pub fn program_text(&self) -> String {
        crate::compile::program_text(self)
    }
}

/// Heads of one MLA decode block (they share each latent row load).
pub const MLA_HEADS_PER_BLOCK: usize = 8;
/// kv_lora_rank <= threads per block * this.
pub const MLA_MAX_COLS_PER_THREAD: usize = 4;

const MLA_DEFINES: &[(&str, &str)] = &[
    ("MLA_HEADS_PER_BLOCK", "8"),
    ("MLA_MAX_COLS_PER_THREAD", "4"),
];

pub const RMSNORM: KernelSource = KernelSource {
    file: "rmsnorm.cu",
    text: include_str!("kernels/rmsnorm.cu"),
    stems: &["rmsnorm"],
    defines: &[],
};

pub const ROPE: KernelSource = KernelSource {
    file: "rope.cu",
    text: include_str!("kernels/rope.cu"),
    stems: &["rope_interleaved", "rope_neox"],
    defines: &[],
};

pub const LATENT_CACHE: KernelSource = KernelSource {
    file: "latent_cache.cu",
    text: include_str!("kernels/latent_cache.cu"),
    stems: &["latent_cache_write"],
    defines: &[],
};

pub const SILU_MUL: KernelSource = KernelSource {
    file: "silu_mul.cu",
    text: include_str!("kernels/silu_mul.cu"),
    stems: &["silu_mul"],
    defines: &[],
};

pub const MLA_DECODE: KernelSource = KernelSource {
    file: "mla_decode.cu",
    text: include_str!("kernels/mla_decode.cu"),
    stems: &["mla_decode_split", "mla_decode_combine"],
    defines: MLA_DEFINES,
};

/// Every kernel program the CUDA path compiles at start-up.
pub const ALL: [KernelSource; 5] = [RMSNORM, ROPE, LATENT_CACHE, SILU_MUL, MLA_DECODE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_entry_is_generated_by_its_file() {
        for source in ALL {
            for stem in source.stems {
                // Each stem comes from an `extern "C" __global__ void {stem}_##SUFFIX(` line.
                let needle = format!("void {stem}_##SUFFIX(");
                assert!(
                    source.text.contains(&needle),
                    "{} lacks {needle}",
                    source.file
                );
            }
            assert!(
                source.text.contains("LS_FOR_EACH_DTYPE("),
                "{} never instantiates its kernels",
                source.file
            );
        }
        assert_eq!(
            RMSNORM.entries(),
            ["rmsnorm_f32", "rmsnorm_f16", "rmsnorm_bf16"]
        );
        let names: Vec<String> = ALL.iter().flat_map(|s| s.entries()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "duplicate entry names");
        assert_eq!(names.len(), 21);
    }

    #[test]
    fn sources_need_no_cuda_headers() {
        // NVRTC has no toolkit headers to find; a stray #include would fail on every machine.
        for text in ALL.iter().map(|s| s.text).chain([PRELUDE]) {
            assert!(!text.contains("#include"), "{text}");
        }
    }

    #[test]
    fn mla_defines_match_the_host_constants() {
        let defines = MLA_DECODE.define_pairs();
        assert!(defines.contains(&("MLA_HEADS_PER_BLOCK", MLA_HEADS_PER_BLOCK.to_string())));
        assert!(defines.contains(&(
            "MLA_MAX_COLS_PER_THREAD",
            MLA_MAX_COLS_PER_THREAD.to_string()
        )));
    }
}
