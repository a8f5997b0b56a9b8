//! Errors of the model crate. Each names the file, tensor or field that was wrong.

use std::path::PathBuf;

use crate::config::QUANT_METHODS;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a checkpoint directory: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("invalid {file}: {message}")]
    InvalidJson { file: PathBuf, message: String },
    #[error("config.json: field `{field}` {problem}")]
    Config { field: &'static str, problem: String },
    #[error("unsupported model_type `{0}`: supported are mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss")]
    UnsupportedArchitecture(String),
    #[error("{file}: invalid safetensors file: {message}")]
    Safetensors { file: PathBuf, message: String },
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { tensor: String, expected: Vec<usize>, got: Vec<usize> },
    /// A quantized checkpoint's data or scale tensor does not fit its format: `expected`
    /// names the shape, dtype and format, `got` the shape and dtype found.
    #[error("tensor `{tensor}` has {got}, expected {expected}")]
    QuantizedShape { tensor: String, expected: String, got: String },
    #[error("tensor `{tensor}` is {format}-quantized but config.json declares {declared}")]
    UndeclaredQuantization { tensor: String, format: &'static str, declared: String },
    #[error("tensor `{tensor}` has dtype {dtype}; {expected}")]
    UnsupportedDtype { tensor: String, dtype: String, expected: &'static str },
    #[error("quantization method `{0}` is not supported: supported are {QUANT_METHODS}")]
    UnsupportedQuantization(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("prompt has {prompt_tokens} tokens but the model's context is {max_context} tokens")]
    PromptTooLong { prompt_tokens: usize, max_context: usize },
    #[error("layer {layer} expert {expert} is unavailable: {reason}")]
    ExpertUnavailable { layer: usize, expert: usize, reason: String },
    #[error("expert dispatch failed at layer {layer}: {reason}")]
    Dispatch { layer: usize, reason: String },
    #[error("the request needs {blocks} KV-cache blocks; {available} of {capacity} are free")]
    KvCacheFull { blocks: usize, available: usize, capacity: usize },
    #[error(transparent)]
    Kernel(#[from] switchyard_kernels::KernelError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// Whether the device ran out of memory (the same work may fit elsewhere).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, ModelError::Kernel(k) if k.is_out_of_memory())
    }

    /// Whether the device failed in a way that makes everything it computes suspect; the
    /// process must stop serving.
    pub fn is_device_fault(&self) -> bool {
        matches!(self, ModelError::Kernel(k) if k.is_device_fault())
    }
}

/// The message of a panic caught with `catch_unwind` (engine and compute threads log it as the
/// cause of their failure).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
