//! Hugging Face MoE checkpoints for Switchyard: reading them as the Hub ships them, running
//! their forward pass on the kernels backend, and generating text. The single-process
//! [`Engine`] here is what `switchyard generate` runs and the reference every distributed
//! topology must reproduce.
//!
//! Supported `model_type`s: `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`, `gpt_oss`,
//! `deepseek_v3`.
//!
//! # Layout
//! - [`config`]: `config.json` (transformers 4.x and 5.x layouts) → [`ModelSpec`].
//! - [`checkpoint`]: memory-mapped safetensors, single file or sharded; [`Tensor`] views.
//! - [`loader`]: each architecture's tensor names → model weights (per-expert or fused).
//! - [`tokenizer`]: `tokenizer.json` and the end-of-sequence ids.
//! - [`chat`]: chat templates rendered as transformers renders them.
//! - [`rope`]: rotary tables (default, linear, dynamic NTK, YaRN).
//! - [`layers`]: [`layers::Exec`] (backend, precision, bytes read), the SwiGLU MLP, attention
//!   weights.
//! - [`mla`]: DeepSeek's multi-head latent attention (weights split at load, the layer's pass
//!   over the latent cache).
//! - [`moe`]: the gate ([`moe::route`]) and the experts ([`moe::ExpertLayer`]), kept apart.
//! - [`kv_cache`]: the paged KV cache (fixed-size blocks of one arena per pool).
//! - [`model`]: [`Model`], the batched forward pass, written once over the kernels'
//!   [`Backend`](switchyard_kernels::Backend): the same code runs on the CPU and on a GPU.
//! - [`sampling`]: greedy / temperature / min-p / top-k / top-p with a seeded generator.
//! - [`controls`]: penalties, logit bias, banned words, min-tokens and stop token ids,
//!   applied to each sequence's logits before sampling.
//! - [`engine`]: [`Engine`], generation for one or many prompts.
//! - [`units`]: byte counts such as `8GiB` on the command line.
//! - [`random`]: random checkpoints of a given shape (benchmarks, tests).
//! - [`error`]: the error type, [`ModelError`].

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod controls;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod mla;
pub mod model;
pub mod moe;
pub mod random;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod units;

pub use checkpoint::{Checkpoint, Tensor};
pub use config::{Arch, ModelSpec};
pub use controls::SamplingControls;
pub use engine::{
    Engine, EngineOptions, FinishReason, GenerateRequest, GeneratedToken, Generation, PromptLogprob, Sequence,
};
pub use error::{ModelError, NonFiniteAt, Result};
pub use kv_cache::SeqCache;
pub use model::{Chunk, Model};
pub use sampling::SamplingParams;
