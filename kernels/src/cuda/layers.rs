//! The per-row layers (`layers.cu`): embedding, RMSNorm, RoPE, residuals, the SwiGLU
//! variants, row gathers, the greedy pick, and the bandwidth probe.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Arg, Gpu, GpuMatrix, Result, grid_1d, rows_cfg};
use crate::DType;

impl Gpu {
    /// `out[i] = table[ids[i]]`, rows of the table's width widened to `f32`.
    pub fn embed(&self, table: &GpuMatrix, ids: &CudaSlice<u32>, n: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let name = match table.dtype {
            DType::BF16 => "embed_bf16",
            DType::F16 => "embed_f16",
            DType::F32 => "embed_f32",
        };
        let args = [Arg::Ptr(table.ptr(&self.stream)), self.p(ids), self.p(out), Arg::I32(table.cols as i32)];
        // SAFETY: ids are checked against the vocabulary by the caller; out holds n rows.
        unsafe { self.launch(name, rows_cfg(n, 256), &args) }
    }

    /// RMSNorm of `rows` rows of `w`'s width.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let args = [self.p(x), self.p(w), self.p(out), Arg::I32(w.len() as i32), Arg::F32(eps)];
        // SAFETY: x and out hold rows × w.len() values.
        unsafe { self.launch("rms_norm", rows_cfg(rows, 256), &args) }
    }

    /// RMSNorm in place.
    pub fn rms_norm_inplace(&self, x: &mut CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, eps: f32) -> Result<()> {
        let args = [self.p(x), self.p(w), self.p(x), Arg::I32(w.len() as i32), Arg::F32(eps)];
        // SAFETY: each block reads its row whole before writing it.
        unsafe { self.launch("rms_norm", rows_cfg(rows, 256), &args) }
    }

    /// Rotary embedding of `heads` heads per token, from per-token cos/sin tables.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let args = [self.p(x), self.p(cos), self.p(sin), Arg::I32(heads as i32), Arg::I32(head_dim as i32)];
        // SAFETY: x is tokens × heads × head_dim, the tables tokens × head_dim / 2.
        unsafe { self.launch("rope", rows_cfg(tokens, 128), &args) }
    }

    /// Clamps the first `n` values to `[-c, c]`.
    pub fn clip(&self, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<()> {
        // SAFETY: x holds n values.
        unsafe { self.launch("clip", grid_1d(n), &[self.p(x), Arg::I64(n as i64), Arg::F32(c)]) }
    }

    /// `x[..n] += y[..n]`.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        // SAFETY: both hold n values.
        unsafe { self.launch("add", grid_1d(n), &[self.p(x), self.p(y), Arg::I64(n as i64)]) }
    }

    /// `out = silu(gate) * up` over `n` values.
    pub fn swiglu(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        // SAFETY: all hold n values.
        unsafe { self.launch("swiglu", grid_1d(n), &[self.p(gate), self.p(up), self.p(out), Arg::I64(n as i64)]) }
    }

    /// gpt-oss's clamped SwiGLU: `n` outputs from `2n` interleaved gate/up values.
    pub fn clamped_swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        alpha: f32,
        limit: f32,
    ) -> Result<()> {
        let args = [self.p(gate_up), self.p(out), Arg::I64(n as i64), Arg::F32(alpha), Arg::F32(limit)];
        // SAFETY: gate_up holds 2n values, out n.
        unsafe { self.launch("clamped_swiglu", grid_1d(n), &args) }
    }

    /// `y[r, :] *= σ(g[r])` over `rows` rows of `h`.
    pub fn scale_rows_sigmoid(&self, y: &mut CudaSlice<f32>, g: &CudaSlice<f32>, h: usize, rows: usize) -> Result<()> {
        let args = [self.p(y), self.p(g), Arg::I32(h as i32), Arg::I64(rows as i64)];
        // SAFETY: y holds rows × h values, g rows.
        unsafe { self.launch("scale_rows_sigmoid", grid_1d(rows * h), &args) }
    }

    /// `out[r] = x[idx[r]]` for `rows` rows of `h`.
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        rows: usize,
        h: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        // SAFETY: every index is a row of x; out holds rows × h.
        unsafe {
            self.launch("gather_rows", rows_cfg(rows, 256), &[self.p(x), self.p(idx), self.p(out), Arg::I32(h as i32)])
        }
    }

    /// Per row of `v` logits: the greedy token (ties to the lower id) and its
    /// log-probability.
    pub fn greedy_pick(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        v: usize,
        ids: &mut CudaSlice<i32>,
        logprobs: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let args = [self.p(logits), Arg::I32(v as i32), self.p(ids), self.p(logprobs)];
        // SAFETY: logits hold rows × v values, ids and logprobs rows.
        unsafe { self.launch("greedy_pick", rows_cfg(rows, 1024), &args) }
    }

    /// Measured read bandwidth of device memory in bytes/s: the best of `reps` passes over a
    /// buffer of `bytes` (much larger than the L2 cache).
    pub fn read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let n4 = bytes / 16;
        let buf = self.zeros::<f32>(n4 * 4)?;
        let blocks = 4 * 132 * 8;
        let partial = self.zeros::<f32>(blocks)?;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let args = [self.p(&buf), Arg::I64(n4 as i64), self.p(&partial)];
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let start = std::time::Instant::now();
            // SAFETY: buf holds n4 float4s, partial one float per block.
            unsafe { self.launch("read_sum", cfg, &args)? };
            self.synchronize()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok((n4 * 16) as f64 / best)
    }
}
