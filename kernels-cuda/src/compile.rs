//! Building the kernel programs with NVRTC: the program text, the compiler options, and the
//! compilation itself (PTX and CUBIN for one GPU architecture).
//!
//! The sources need no CUDA headers (NVRTC ships none of `cuda_fp16.h`/`cuda_bf16.h`; the
//! kernels bring their own 16-bit conversions), so NVRTC alone, without a toolkit or a GPU,
//! compiles them: that is how the tests run them on CPU-only machines.

use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt;

use cudarc::nvrtc::{result, sys};

use crate::error::{CudaError, Library};
use crate::libs::{self, NVRTC_SYMBOLS};
use crate::sources::KernelSource;

/// A real GPU architecture, `sm_XY` (NVRTC's `--gpu-architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub const SM_80: Arch = Arch::new(8, 0);
    pub const SM_90: Arch = Arch::new(9, 0);

    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses `sm_90`, `sm_86`, `90` or `9.0`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some((major, minor)) = s.split_once('.') {
            return Some(Self::new(major.parse().ok()?, minor.parse().ok()?));
        }
        let digits = s.strip_prefix("sm_").unwrap_or(s);
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some(Self::new(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// The NVRTC options every kernel program is compiled with, in order.
pub fn options(arch: Arch, defines: &[(&str, String)]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        // Functions without __global__/__device__ are device functions: no host code here.
        "-default-device".to_string(),
        "--std=c++17".to_string(),
        // Fused multiply-add on, denormals kept, IEEE division and sqrt: the CPU reference
        // numerics, not fast-math.
        "--fmad=true".to_string(),
    ];
    opts.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    opts
}

/// The full text NVRTC compiles for one source: the shared prelude, then the kernel file.
pub fn program_text(source: &KernelSource) -> String {
    format!(
        "// latentserve kernel program {}\n{}\n{}",
        source.file,
        crate::sources::PRELUDE,
        source.text
    )
}

/// What NVRTC produced for one program on one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub file: &'static str,
    pub arch: Arch,
    /// PTX text (what the driver can JIT on newer GPUs).
    pub ptx: String,
    /// The CUBIN for `arch` (what is loaded on that GPU without a JIT step).
    pub cubin: Vec<u8>,
}

impl Compiled {
    /// The kernel entry points the PTX declares.
    pub fn ptx_entries(&self) -> Vec<String> {
        ptx_entries(&self.ptx)
    }
}

/// Names of the `.entry` functions of a PTX text.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.trim().split(".entry ").nth(1)?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

fn nvrtc_call<T>(call: &'static str, r: Result<T, result::NvrtcError>) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::Nvrtc {
        call,
        code: format!("{:?}", e.0),
    })
}

/// Loads NVRTC (a typed error, not cudarc's panic, when it is missing) and checks its symbols.
pub fn require_nvrtc() -> Result<libs::Loaded, CudaError> {
    let nvrtc = libs::load(Library::Nvrtc)?;
    nvrtc.require_symbols(&NVRTC_SYMBOLS)?;
    Ok(nvrtc)
}

/// (major, minor) of the NVRTC that loads.
pub fn nvrtc_version() -> Result<(u32, u32), CudaError> {
    require_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the symbol is present (checked); both are valid out-pointers.
    nvrtc_call("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor).result()
    })?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// Owns an NVRTC program until it is dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles one kernel source for `arch` with NVRTC.
pub fn compile(source: &KernelSource, arch: Arch) -> Result<Compiled, CudaError> {
    require_nvrtc()?;
    let text = CString::new(program_text(source)).map_err(|_| CudaError::Compile {
        program: source.file.to_string(),
        arch: arch.to_string(),
        log: "the source contains a NUL byte".into(),
    })?;
    let name = CString::new(source.file).expect("kernel file names have no NUL");
    let program = Program(nvrtc_call(
        "nvrtcCreateProgram",
        result::create_program(text.as_c_str(), Some(name.as_c_str())),
    )?);
    let opts = options(arch, &source.define_pairs());
    // SAFETY: the program is live; options are NUL-free strings.
    if let Err(e) = unsafe { result::compile_program(program.0, &opts) } {
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(program.0) }
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_default();
        return Err(CudaError::Compile {
            program: source.file.to_string(),
            arch: arch.to_string(),
            log: if log.trim().is_empty() {
                format!("{:?}", e.0)
            } else {
                log
            },
        });
    }
    // SAFETY: compiled successfully above.
    let ptx = nvrtc_call("nvrtcGetPTX", unsafe { result::get_ptx(program.0) })?;
    let cubin = get_cubin(&program)?;
    Ok(Compiled {
        file: source.file,
        arch,
        ptx: c_chars_to_string(&ptx),
        cubin,
    })
}

fn get_cubin(program: &Program) -> Result<Vec<u8>, CudaError> {
    let mut size = 0usize;
    // SAFETY: the program compiled; size is a valid out-pointer.
    nvrtc_call("nvrtcGetCUBINSize", unsafe {
        sys::nvrtcGetCUBINSize(program.0, &mut size).result()
    })?;
    let mut buf = vec![0 as c_char; size];
    if size > 0 {
        // SAFETY: buf holds `size` bytes as NVRTC asked.
        nvrtc_call("nvrtcGetCUBIN", unsafe {
            sys::nvrtcGetCUBIN(program.0, buf.as_mut_ptr()).result()
        })?;
    }
    Ok(buf.into_iter().map(|c| c as u8).collect())
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_and_prints_as_nvrtc_wants() {
        assert_eq!(Arch::parse("sm_90"), Some(Arch::SM_90));
        assert_eq!(Arch::parse("90"), Some(Arch::SM_90));
        assert_eq!(Arch::parse("8.6"), Some(Arch::new(8, 6)));
        assert_eq!(Arch::parse("sm_100"), Some(Arch::new(10, 0)));
        assert_eq!(Arch::parse("sm_"), None);
        assert_eq!(Arch::parse("gpu"), None);
        assert_eq!(Arch::new(12, 0).to_string(), "sm_120");
    }

    #[test]
    fn options_name_the_arch_default_device_and_cxx17() {
        let opts = options(Arch::SM_90, &[("MLA_HEADS_PER_BLOCK", "8".into())]);
        assert_eq!(
            opts,
            [
                "--gpu-architecture=sm_90",
                "-default-device",
                "--std=c++17",
                "--fmad=true",
                "-DMLA_HEADS_PER_BLOCK=8"
            ]
        );
    }

    #[test]
    fn ptx_entries_are_read_from_entry_lines() {
        let ptx = "//\n.visible .entry rmsnorm_bf16(\n\t.param .u64 a\n)\n.visible .entry silu_mul_f32(\n";
        assert_eq!(ptx_entries(ptx), ["rmsnorm_bf16", "silu_mul_f32"]);
    }
}
