//! The MoE gate and the combine around the grouped products (`moe.cu`).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Arg, Gpu, Result, rows_cfg};
use crate::KernelError;

/// Experts a gate may choose from (`MAX_EXPERTS` in `moe.cu`).
pub const MAX_GATE_EXPERTS: usize = 256;

impl Gpu {
    /// The top-`k` experts of each of `tokens` rows of `e` gate logits, best first, and their
    /// weights (`softmax_first`: softmax over all experts then top-k, renormalised if asked;
    /// otherwise top-k then softmax over the k).
    #[allow(clippy::too_many_arguments)]
    pub fn topk_gate(
        &self,
        logits: &CudaSlice<f32>,
        tokens: usize,
        e: usize,
        k: usize,
        softmax_first: bool,
        renormalize: bool,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if e > MAX_GATE_EXPERTS || k > 32 || k > e {
            return Err(KernelError::Cuda(format!(
                "the GPU gate takes up to {MAX_GATE_EXPERTS} experts and top-32; this model routes {k} of {e}"
            )));
        }
        let warps = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((tokens as u32).div_ceil(warps).max(1), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            self.p(logits),
            self.p(ids),
            self.p(weights),
            Arg::I32(tokens as i32),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::I32((!softmax_first).into()),
            Arg::I32(renormalize.into()),
        ];
        // SAFETY: logits hold tokens × e values, ids and weights tokens × k.
        unsafe { self.launch("topk_gate", cfg, &args) }
    }

    /// `out[t] = Σ_j w[j] · y[src[j]]` over token `t`'s entries `start[t] .. start[t + 1]`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_rows(
        &self,
        y: &CudaSlice<f32>,
        start: &CudaSlice<i32>,
        src: &CudaSlice<i32>,
        w: &CudaSlice<f32>,
        tokens: usize,
        h: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let args = [self.p(y), self.p(start), self.p(src), self.p(w), self.p(out), Arg::I32(h as i32)];
        // SAFETY: start has tokens + 1 offsets into src/w, whose rows are rows of y.
        unsafe { self.launch("combine_rows", rows_cfg(tokens, 256), &args) }
    }
}
