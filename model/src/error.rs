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
    #[error("config.json: `{field}` {problem}")]
    Config { field: &'static str, problem: String },
    #[error(
        "unsupported model_type `{0}`: supported are mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2, deepseek_v3"
    )]
    UnsupportedArchitecture(String),
    /// The model needs an operation the device's backend does not have yet.
    #[error("{what} runs on the CPU backend only so far, not on {device}")]
    UnsupportedOnDevice { what: String, device: String },
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
    /// A forward pass produced NaN or infinite activations: the checkpoint's weights are
    /// broken (or overflow) where `at` says.
    #[error("NaN or infinite values in {at}")]
    NonFinite { at: NonFiniteAt },
    /// A small tensor (norm, bias, gate, sinks) holds a NaN or an infinity at load time.
    #[error("tensor `{tensor}` holds {count} NaN or infinite value(s), the first at index {first}")]
    NonFiniteTensor { tensor: String, count: usize, first: usize },
    #[error(transparent)]
    Kernel(#[from] switchyard_kernels::KernelError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// Where a forward pass found NaN or infinite activations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NonFiniteAt {
    /// The embedding rows of these token ids (sorted, each once).
    Embedding { token_ids: Vec<u32> },
    /// The hidden states after layer `layer`'s attention block (with its residual).
    Attention { layer: usize },
    /// The hidden states after layer `layer`'s feed-forward (with its residual): a MoE block
    /// (gate, experts, shared expert) or a dense MLP.
    FeedForward { layer: usize, moe: bool },
    /// The logits (final norm and `lm_head`).
    Logits,
}

impl std::fmt::Display for NonFiniteAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NonFiniteAt::Embedding { token_ids } => {
                let ids: Vec<String> = token_ids.iter().map(u32::to_string).collect();
                let s = if token_ids.len() == 1 { "" } else { "s" };
                write!(f, "the embedding of token id{s} {} (rows of `model.embed_tokens.weight`)", ids.join(", "))
            }
            NonFiniteAt::Attention { layer } => write!(f, "layer {layer}'s attention output"),
            NonFiniteAt::FeedForward { layer, moe: true } => write!(f, "layer {layer}'s MoE output"),
            NonFiniteAt::FeedForward { layer, moe: false } => write!(f, "layer {layer}'s MLP output"),
            NonFiniteAt::Logits => write!(f, "the logits (final norm and lm_head)"),
        }
    }
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
