//! DeepSeek-V2/V3 (MLA + MoE) on the CPU: configuration, checkpoint loading, the forward pass over
//! a paged latent cache, the tokenizer, and chat templates.

mod absorbed;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod deepseek;
pub mod generate;
pub mod loader;
pub mod mla;
pub mod moe;
pub mod ops;
pub mod random;
pub mod rope;
pub mod tokenizer;

use std::path::PathBuf;

pub use cache::{CacheLayout, LatentCache};
pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use config::ModelConfig;
pub use deepseek::{DeepSeekModel, LogitsFor, SequenceChunk};
pub use loader::{ExpertFilter, LoadOptions};
pub use moe::{DispatchPlan, ExpertExecutor, ExpertWork};
pub use tokenizer::Tokenizer;

/// Everything that can go wrong loading or running a model; each message names the file, tensor,
/// key or limit at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{name}` not found in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype} (supported: F32, F16, BF16, F8_E4M3)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("expert {expert} of layer {layer} is not loaded on this worker")]
    ExpertNotLoaded { layer: usize, expert: usize },
    #[error("expert execution failed: {0}")]
    Experts(String),
    /// Another shard that holds some of the routed experts cannot be reached.
    #[error("{0}")]
    ExpertsUnavailable(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] latentserve_kernels::KernelError),
}
