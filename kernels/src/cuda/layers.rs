//! The per-row layers (`layers.cu`): embedding, RMSNorm, RoPE, residuals, the SwiGLU
//! variants, row gathers, the non-finite check, the greedy pick, and the bandwidth probe.
//!
//! Sizes are passed beside the buffers because a buffer may be longer than the tensor it
//! holds (an empty tensor keeps one element); each operation checks its buffers hold them.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Arg, Gpu, GpuMatrix, count, grid, grid_1d, int};
use crate::Format;
use crate::error::{KernelError, Result};

impl Gpu {
    /// Rows `ids` of `table`, widened to `f32`: `[ids.len(), table.cols]`. Dense tables only:
    /// a quantized one is refused.
    pub(crate) fn embed(&self, table: &GpuMatrix, ids: &[u32]) -> Result<CudaSlice<f32>> {
        let op = "embed";
        let name = match table.format {
            Format::BF16 => "embed_bf16",
            Format::F16 => "embed_f16",
            Format::F32 => "embed_f32",
            quantized @ (Format::Mxfp4 | Format::Fp8 { .. }) => {
                return Err(KernelError::Unsupported {
                    op,
                    message: format!(
                        "an {} embedding table: the CUDA embedding reads dense tables (F32, F16, BF16) only",
                        quantized.name()
                    ),
                });
            }
        };
        self.check_matrix(op, table)?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(KernelError::OutOfRange {
                op,
                message: format!("token id {id} is outside the table of {} rows", table.rows),
            });
        }
        let len = count(op, &[ids.len(), table.cols])?;
        if len == 0 {
            return self.zeros(op, 0);
        }
        let cfg = grid(op, ids.len(), 1, 256)?;
        let ids_d = self.upload(op, ids)?;
        // SAFETY: the launch below writes all ids.len() rows.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let args =
            [Arg::Ptr(table.ptr(&self.stream)), self.p(&ids_d), self.p(&out), Arg::I32(int(op, "width", table.cols)?)];
        // SAFETY: every id is a row of the table, which holds rows × cols values (checked
        // above); out holds ids.len() × cols.
        unsafe { self.launch(name, cfg, &args)? };
        Ok(out)
    }

    /// RMSNorm of the first `len` values of `x` as rows of `d` values, with weights `w`.
    pub(crate) fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        len: usize,
        w: &CudaSlice<f32>,
        d: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let op = "rms_norm";
        let rows = self.norm_rows(op, x, len, w, d)?;
        if rows == 0 {
            return self.zeros(op, 0);
        }
        // SAFETY: the launch below writes all rows × d values.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let args = [self.p(x), self.p(w), self.p(&out), Arg::I32(int(op, "row width", d)?), Arg::F32(eps)];
        // SAFETY: x and out hold rows × d values, w holds d (checked by `norm_rows`).
        unsafe { self.launch("rms_norm", grid(op, rows, 1, 256)?, &args)? };
        Ok(out)
    }

    /// [`Gpu::rms_norm`] in place.
    pub(crate) fn rms_norm_inplace(
        &self,
        x: &mut CudaSlice<f32>,
        len: usize,
        w: &CudaSlice<f32>,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm";
        let rows = self.norm_rows(op, x, len, w, d)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [self.p(x), self.p(w), self.p(x), Arg::I32(int(op, "row width", d)?), Arg::F32(eps)];
        // SAFETY: x holds rows × d values and w d (checked by `norm_rows`); each block reads
        // its row whole before it writes it, so input and output may be one buffer.
        unsafe { self.launch("rms_norm", grid(op, rows, 1, 256)?, &args) }
    }

    /// Rows of a norm of `len` values in rows of `d`, after checking the buffers hold them.
    fn norm_rows(
        &self,
        op: &'static str,
        x: &CudaSlice<f32>,
        len: usize,
        w: &CudaSlice<f32>,
        d: usize,
    ) -> Result<usize> {
        if d == 0 || !len.is_multiple_of(d) {
            return Err(KernelError::shape(op, "x", format!("rows of {d} values"), format!("{len} values")));
        }
        self.check(op, "x", x, len)?;
        self.check(op, "weight", w, d)?;
        Ok(len / d)
    }

    /// Rotate-half RoPE of `heads` heads of `head_dim` in each of `tokens` rows of `x`, from
    /// per-row `cos`/`sin` tables of `head_dim / 2` values.
    pub(crate) fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        [tokens, heads, head_dim]: [usize; 3],
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
    ) -> Result<()> {
        let op = "rope";
        if !head_dim.is_multiple_of(2) {
            return Err(KernelError::Unsupported { op, message: format!("an odd head dimension, {head_dim}") });
        }
        let row = count(op, &[heads, head_dim])?;
        self.check(op, "x", x, count(op, &[tokens, row])?)?;
        self.check(op, "cos", cos, count(op, &[tokens, head_dim / 2])?)?;
        self.check(op, "sin", sin, count(op, &[tokens, head_dim / 2])?)?;
        if tokens == 0 || row == 0 {
            return Ok(());
        }
        int(op, "row width", row)?;
        let args = [
            self.p(x),
            self.p(cos),
            self.p(sin),
            Arg::I32(int(op, "heads", heads)?),
            Arg::I32(int(op, "head dimension", head_dim)?),
        ];
        // SAFETY: x holds tokens × heads × head_dim values, the tables tokens × head_dim / 2
        // (checked above); the kernel's int index stays below heads × head_dim / 2.
        unsafe { self.launch("rope", grid(op, tokens, 1, 128)?, &args) }
    }

    /// Clamps the first `n` values of `x` to `[-c, c]`.
    pub(crate) fn clip(&self, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<()> {
        let op = "clip";
        self.check(op, "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: x holds n values (checked above).
        unsafe { self.launch("clip", grid_1d(n), &[self.p(x), Arg::I64(n as i64), Arg::F32(c)]) }
    }

    /// `x[..n] += y[..n]`.
    pub(crate) fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        let op = "add";
        self.check(op, "x", x, n)?;
        self.check(op, "y", y, n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: both hold n values (checked above).
        unsafe { self.launch("add", grid_1d(n), &[self.p(x), self.p(y), Arg::I64(n as i64)]) }
    }

    /// `silu(gate) · up` over `n` values.
    pub(crate) fn swiglu(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
        let op = "swiglu";
        self.check(op, "gate", gate, n)?;
        self.check(op, "up", up, n)?;
        if n == 0 {
            return self.zeros(op, 0);
        }
        // SAFETY: the launch below writes all n values.
        let out = unsafe { self.alloc::<f32>(op, n)? };
        let args = [self.p(gate), self.p(up), self.p(&out), Arg::I64(n as i64)];
        // SAFETY: gate, up and out hold n values (checked above).
        unsafe { self.launch("swiglu", grid_1d(n), &args)? };
        Ok(out)
    }

    /// gpt-oss's clamped SwiGLU: `n` outputs from `2n` interleaved gate/up values.
    pub(crate) fn clamped_swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        n: usize,
        alpha: f32,
        limit: f32,
    ) -> Result<CudaSlice<f32>> {
        let op = "clamped_swiglu";
        self.check(op, "gate_up", gate_up, count(op, &[n, 2])?)?;
        if n == 0 {
            return self.zeros(op, 0);
        }
        // SAFETY: the launch below writes all n values.
        let out = unsafe { self.alloc::<f32>(op, n)? };
        let args = [self.p(gate_up), self.p(&out), Arg::I64(n as i64), Arg::F32(alpha), Arg::F32(limit)];
        // SAFETY: gate_up holds 2n values (checked above), out n.
        unsafe { self.launch("clamped_swiglu", grid_1d(n), &args)? };
        Ok(out)
    }

    /// `y[r, :] *= σ(g[r])` over `rows` rows of `h`.
    pub(crate) fn scale_rows_sigmoid(
        &self,
        y: &mut CudaSlice<f32>,
        rows: usize,
        h: usize,
        g: &CudaSlice<f32>,
    ) -> Result<()> {
        let op = "scale_rows_sigmoid";
        let n = count(op, &[rows, h])?;
        self.check(op, "y", y, n)?;
        self.check(op, "gate", g, rows)?;
        if n == 0 {
            return Ok(());
        }
        let args = [self.p(y), self.p(g), Arg::I32(int(op, "row width", h)?), Arg::I64(rows as i64)];
        // SAFETY: y holds rows × h values, g rows (checked above).
        unsafe { self.launch("scale_rows_sigmoid", grid_1d(n), &args) }
    }

    /// Rows `rows` of `x` (`x_rows` rows of `h`), in that order: `[rows.len(), h]`.
    pub(crate) fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        [x_rows, h]: [usize; 2],
        rows: &[u32],
    ) -> Result<CudaSlice<f32>> {
        let op = "gather_rows";
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x_rows) {
            return Err(KernelError::OutOfRange { op, message: format!("row {r} of {x_rows}") });
        }
        self.check(op, "x", x, count(op, &[x_rows, h])?)?;
        let len = count(op, &[rows.len(), h])?;
        if len == 0 {
            return self.zeros(op, 0);
        }
        let cfg = grid(op, rows.len(), 1, 256)?;
        let idx = self.upload(op, rows)?;
        // SAFETY: the launch below writes all rows.len() rows.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let args = [self.p(x), self.p(&idx), self.p(&out), Arg::I32(int(op, "row width", h)?)];
        // SAFETY: every index is a row of x, which holds x_rows × h values (checked above);
        // out holds rows.len() × h.
        unsafe { self.launch("gather_rows", cfg, &args)? };
        Ok(out)
    }

    /// The rows of `x` (`rows` rows of `h`) holding a NaN or an infinity, in order. Only one
    /// flag per row leaves the device.
    pub(crate) fn non_finite_rows(&self, x: &CudaSlice<f32>, rows: usize, h: usize) -> Result<Vec<u32>> {
        let op = "non_finite_rows";
        self.check(op, "x", x, count(op, &[rows, h])?)?;
        if rows == 0 || h == 0 {
            return Ok(Vec::new());
        }
        let cfg = grid(op, rows, 1, 256)?;
        // SAFETY: the launch below writes one flag per row.
        let flags = unsafe { self.alloc::<u32>(op, rows)? };
        let args = [self.p(x), self.p(&flags), Arg::I32(int(op, "row width", h)?)];
        // SAFETY: x holds rows × h values (checked above), flags rows.
        unsafe { self.launch("non_finite_rows", cfg, &args)? };
        let flags = self.download(op, &flags, rows)?;
        Ok(flags.iter().enumerate().filter(|&(_, &f)| f != 0).map(|(r, _)| r as u32).collect())
    }

    /// Per row of `v` logits (`rows` rows): the greedy token (ties to the lower id) and its
    /// log-probability, summed in double as the CPU does.
    pub(crate) fn greedy(&self, logits: &CudaSlice<f32>, rows: usize, v: usize) -> Result<Vec<(u32, f32)>> {
        let op = "greedy";
        self.check(op, "logits", logits, count(op, &[rows, v])?)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if v == 0 {
            return Err(KernelError::Unsupported { op, message: "a greedy pick over an empty vocabulary".into() });
        }
        let cfg = grid(op, rows, 1, 1024)?;
        // SAFETY: the launch below writes one id and one log-probability per row.
        let (ids, logprobs) = unsafe { (self.alloc::<u32>(op, rows)?, self.alloc::<f32>(op, rows)?) };
        let args = [self.p(logits), Arg::I32(int(op, "vocabulary", v)?), self.p(&ids), self.p(&logprobs)];
        // SAFETY: logits hold rows × v values (checked above), ids and logprobs rows.
        unsafe { self.launch("greedy_pick", cfg, &args)? };
        let (ids, logprobs) = (self.download(op, &ids, rows)?, self.download(op, &logprobs, rows)?);
        Ok(ids.into_iter().zip(logprobs).collect())
    }

    /// Measured read bandwidth of device memory in bytes/s: the best of `reps` passes over a
    /// buffer of `bytes` (much larger than the L2 cache).
    pub(crate) fn read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let op = "read_bandwidth";
        let n4 = bytes / 16;
        if n4 == 0 {
            return Ok(0.0);
        }
        let buf = self.zeros::<f32>(op, count(op, &[n4, 4])?)?;
        // Enough blocks to fill every SM of the largest devices several times over.
        let blocks = 4 * 132 * 8;
        let partial = self.zeros::<f32>(op, blocks)?;
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
