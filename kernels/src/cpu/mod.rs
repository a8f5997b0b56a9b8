//! The CPU backend: every kernel takes `f32` activations and reads weights in their stored
//! dtype. Multi-threaded through the rayon pool; AVX-512 where the CPU has it (detected once
//! at run time), a portable path everywhere else.
//!
//! # Layout
//! - [`matmul`]: linear layers (`x · Wᵀ + b`), the hot path.
//! - `widen` (x86-64): products over weight rows widened to `f32` a few at a time: every
//!   format, the quantized ones included, with AVX2 and FMA.
//! - `quant512` (x86-64): MXFP4 and FP8 products decoded in registers with AVX-512.
//! - [`norm`]: RMSNorm (root-mean-square normalisation).
//! - [`rope`]: rotary position embeddings, applied from precomputed cos/sin tables.
//! - [`attention`]: causal attention over a KV cache with GQA, sliding windows and sinks.
//! - [`mla`]: multi-head latent attention (DeepSeek) over latent cache rows, absorbed or
//!   expanded.
//! - [`bandwidth`]: measured memory read bandwidth (benchmarks).
//! - [`routing`]: softmax and top-k for MoE gates.
//! - [`activation`]: SiLU, SwiGLU and gpt-oss's clamped SwiGLU.

pub mod activation;
pub mod attention;
pub mod bandwidth;
pub mod matmul;
pub mod mla;
pub mod norm;
#[cfg(target_arch = "x86_64")]
pub mod quant512;
pub mod rope;
pub mod routing;
#[cfg(target_arch = "x86_64")]
pub mod widen;

pub use matmul::{Precision, linear, linear_with};

/// Whether the AVX-512 kernels may run on this CPU (checked once).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("SWITCHYARD_NO_AVX512").is_none() && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A short description of the instruction set the kernels use, for logs and benchmarks.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match (has_avx512(), widen::available()) {
            (true, _) if quant512::available() => return "avx512",
            (true, true) => return "avx512 (avx2 for quantized formats)",
            (true, false) => return "avx512 (portable for quantized formats)",
            (false, true) => return "avx2",
            (false, false) => {}
        }
    }
    "portable"
}
