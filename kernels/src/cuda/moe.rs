//! The MoE gate and the combine around the grouped products (`moe.cu`).

use cudarc::driver::CudaSlice;

use super::{Arg, Gpu, count, grid, int};
use crate::backend::{Combine, Gate};
use crate::error::{KernelError, Result};

/// Experts the device gate chooses from (`MAX_EXPERTS` in `moe.cu`: eight logits per lane).
pub const MAX_GATE_EXPERTS: usize = 256;
/// Experts the device gate picks per token (one weight per lane of a warp).
pub const MAX_GATE_K: usize = 32;

/// Tokens per block of the gate: one warp each.
const GATE_WARPS: usize = 8;

impl Gpu {
    /// The top-`k` experts of each of `tokens` rows of `e` gate logits, best first (ties to
    /// the lower id), and their weights, token-major, in host memory.
    pub(crate) fn top_k_gate(
        &self,
        logits: &CudaSlice<f32>,
        [tokens, e]: [usize; 2],
        k: usize,
        gate: Gate,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let op = "top_k_gate";
        if e > MAX_GATE_EXPERTS || k > MAX_GATE_K || k == 0 || k > e {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "the CUDA gate picks 1 to {MAX_GATE_K} of up to {MAX_GATE_EXPERTS} experts; this model routes {k} of {e}"
                ),
            });
        }
        self.check(op, "logits", logits, count(op, &[tokens, e])?)?;
        if tokens == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let cfg = grid(op, tokens.div_ceil(GATE_WARPS), 1, 32 * GATE_WARPS as u32)?;
        let n = count(op, &[tokens, k])?;
        // SAFETY: the launch below writes k ids and k weights for every token.
        let (ids, weights) = unsafe { (self.alloc::<u32>(op, n)?, self.alloc::<f32>(op, n)?) };
        let (mode, renormalize) = match gate {
            Gate::SoftmaxTopK { renormalize } => (0, renormalize),
            Gate::TopKSoftmax => (1, false),
        };
        let args = [
            self.p(logits),
            self.p(&ids),
            self.p(&weights),
            Arg::I32(int(op, "tokens", tokens)?),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::I32(mode),
            Arg::I32(renormalize.into()),
        ];
        // SAFETY: logits hold tokens × e values (checked above), ids and weights tokens × k;
        // e and k are within the kernel's per-warp limits.
        unsafe { self.launch("topk_gate", cfg, &args)? };
        Ok((self.download(op, &ids, n)?, self.download(op, &weights, n)?))
    }

    /// Token rows of weighted sums of rows of `y` (`y_rows` rows of `h`), as `c` lists them:
    /// `[c.tokens(), h]`, each sum in entry order from 0, as on the CPU.
    pub(crate) fn combine_rows(
        &self,
        y: &CudaSlice<f32>,
        [y_rows, h]: [usize; 2],
        c: &Combine,
    ) -> Result<CudaSlice<f32>> {
        let op = "combine_rows";
        c.check(op, y_rows)?;
        self.check(op, "y", y, count(op, &[y_rows, h])?)?;
        let len = count(op, &[c.tokens(), h])?;
        if len == 0 {
            return self.zeros(op, 0);
        }
        let cfg = grid(op, c.tokens(), 1, 256)?;
        let (start, src, weight) = (self.upload(op, &c.start)?, self.upload(op, &c.src)?, self.upload(op, &c.weight)?);
        // SAFETY: the launch below writes every token row.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let args = [
            self.p(y),
            self.p(&start),
            self.p(&src),
            self.p(&weight),
            self.p(&out),
            Arg::I32(int(op, "row width", h)?),
        ];
        // SAFETY: `Combine::check` found `start` non-decreasing from 0 and ending at the
        // length of `src` and `weight`, and every source row below y_rows; y holds
        // y_rows × h values (checked above), out tokens × h.
        unsafe { self.launch("combine_rows", cfg, &args)? };
        Ok(out)
    }
}
