//! Products (`matmul.cu` and cuBLAS): linear layers, and the grouped form over a layer's
//! experts.

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Arg, Gpu, GpuMatrix, Result, grid_1d, ptr};
use crate::cpu::Precision;
use crate::cpu::matmul::BF16_PRODUCT_MIN_ROWS;
use crate::{DType, KernelError};

/// Rows one product tile covers (`TILE_ROWS` in `matmul.cu`).
pub const TILE_ROWS: usize = 8;
/// Output columns per block of the product kernels (`COLS_PER_BLOCK`).
const COLS_PER_BLOCK: u32 = 8;

/// The per-expert matrices of one projection of a MoE layer, addressed by slot, for the
/// grouped product: a device table of matrix addresses (and of bias addresses, 0 for none).
pub struct GroupedWeights {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    weights: CudaSlice<u64>,
    biases: CudaSlice<u64>,
}

/// One expert's matrix and optional bias, as [`Gpu::group`] takes them.
pub type Projection<'a> = (&'a GpuMatrix, Option<&'a CudaSlice<f32>>);

/// The product kernel for weights of `dtype`, dense or `grouped`.
fn kernel(grouped: bool, dtype: DType) -> &'static str {
    match (grouped, dtype) {
        (false, DType::BF16) => "linear_bf16",
        (false, DType::F16) => "linear_f16",
        (false, DType::F32) => "linear_f32",
        (true, DType::BF16) => "grouped_linear_bf16",
        (true, DType::F16) => "grouped_linear_f16",
        (true, DType::F32) => "grouped_linear_f32",
    }
}

/// Blocks of [`COLS_PER_BLOCK`] warps: `row_blocks` on x (limit 2^31 - 1), column blocks on y.
fn product_cfg(row_blocks: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (row_blocks as u32, (n as u32).div_ceil(COLS_PER_BLOCK), 1),
        block_dim: (32 * COLS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// The address table of one projection over a layer's expert slots (`None`: a slot with
    /// no expert, which no tile may name). Every matrix must share one dtype and shape.
    pub fn group(&self, slots: &[Option<Projection<'_>>]) -> Result<Option<GroupedWeights>> {
        let Some((first, _)) = slots.iter().flatten().next() else { return Ok(None) };
        let (dtype, rows, cols) = (first.dtype, first.rows, first.cols);
        let mut weights = Vec::with_capacity(slots.len());
        let mut biases = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Some((m, b)) => {
                    if (m.dtype, m.rows, m.cols) != (dtype, rows, cols) {
                        return Err(KernelError::Cuda(format!(
                            "experts of one layer differ: {} {}x{} beside {} {rows}x{cols}",
                            m.dtype.name(),
                            m.rows,
                            m.cols,
                            dtype.name()
                        )));
                    }
                    weights.push(m.ptr(&self.stream));
                    biases.push(b.map_or(0, |b| ptr(b, &self.stream)));
                }
                None => {
                    weights.push(0);
                    biases.push(0);
                }
            }
        }
        Ok(Some(GroupedWeights { dtype, rows, cols, weights: self.upload(&weights)?, biases: self.upload(&biases)? }))
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)` for `w` `[n, k]`.
    pub fn linear(
        &self,
        x: &CudaSlice<f32>,
        w: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        m: usize,
        out: &mut CudaSlice<f32>,
        precision: Precision,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(());
        }
        debug_assert!(x.len() >= m * k && out.len() >= m * n);
        let s = &self.stream;
        let (xp, wp, op) = (ptr(x, s), w.ptr(s), ptr(out, s));
        let bp = bias.map_or(0, |b| ptr(b, s));
        if m >= BF16_PRODUCT_MIN_ROWS && self.gemm(xp, w, op, m, precision)? {
            return if bias.is_some() { self.add_bias(op, bp, m, n) } else { Ok(()) };
        }
        let vec = vectorizable(w.dtype, k);
        debug_assert!(!vec || (wp % 16 == 0 && xp % 16 == 0), "16-byte packs need aligned rows");
        let args = [
            Arg::Ptr(xp),
            Arg::Ptr(wp),
            Arg::Ptr(bp),
            Arg::Ptr(op),
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I32(vec.into()),
        ];
        // SAFETY: the kernel reads m×k, n×k and n values and writes m×n, all within the buffers.
        unsafe { self.launch(kernel(false, w.dtype), product_cfg(m.div_ceil(TILE_ROWS), n), &args) }
    }

    /// `out = x · Wᵀ` through cuBLAS, when the dtype and precision allow; `false` otherwise.
    /// Column-major cuBLAS computes `outᵀ[n, m] = W[n, k] · xᵀ[k, m]`, the row-major `out`.
    fn gemm(&self, x: u64, w: &GpuMatrix, out: u64, m: usize, precision: Precision) -> Result<bool> {
        use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let (n, k) = (w.rows, w.cols);
        let (a_type, xin, _rounded) = match (w.dtype, precision) {
            (DType::F32, _) => (CUDA_R_32F, x, None),
            (DType::BF16, Precision::Bf16Products) => {
                let rounded = self.alloc::<u16>(m * k)?;
                let rp = ptr(&rounded, &self.stream);
                // SAFETY: x holds m×k f32, the rounded copy m×k u16.
                unsafe {
                    self.launch(
                        "round_to_bf16",
                        grid_1d(m * k),
                        &[Arg::Ptr(x), Arg::Ptr(rp), Arg::I64(m as i64 * k as i64)],
                    )?
                };
                (CUDA_R_16BF, rp, Some(rounded))
            }
            _ => return Ok(false),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.bind()?;
        let handle = self.blas.lock().expect("cuBLAS lock");
        // SAFETY: W is n×k, x is m×k (as a_type), out is m×n f32, all on this handle's stream.
        unsafe {
            blas::gemm_ex(
                *handle.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w.ptr(&self.stream) as *const _,
                a_type,
                k as i32,
                xin as *const _,
                a_type,
                k as i32,
                (&beta as *const f32).cast(),
                out as *mut _,
                CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Cuda(format!("cuBLAS GEMM: {e:?}")))?;
        Ok(true)
    }

    /// Every tile of `tiles` (expert slot, first row, rows; rows ≤ [`TILE_ROWS`]) through its
    /// expert's matrix: `out[r] = x[r] · W_eᵀ (+ b_e)` for the tile's rows.
    pub fn grouped_linear(
        &self,
        x: &CudaSlice<f32>,
        w: &GroupedWeights,
        tiles: &CudaSlice<i32>,
        n_tiles: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if n_tiles == 0 {
            return Ok(());
        }
        let args = [
            self.p(x),
            self.p(&w.weights),
            self.p(&w.biases),
            self.p(tiles),
            self.p(out),
            Arg::I32(w.rows as i32),
            Arg::I32(w.cols as i32),
            Arg::I32(vectorizable(w.dtype, w.cols).into()),
        ];
        // SAFETY: every tile names a slot with a matrix and rows within x and out.
        unsafe { self.launch(kernel(true, w.dtype), product_cfg(n_tiles, w.rows), &args) }
    }

    /// One expert's rows `row0 .. row0 + m` through cuBLAS (many rows routed to it); `false`
    /// where cuBLAS does not take the weights' dtype at this precision.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_gemm(
        &self,
        x: &CudaSlice<f32>,
        w: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        row0: usize,
        m: usize,
        out: &mut CudaSlice<f32>,
        precision: Precision,
    ) -> Result<bool> {
        let s = &self.stream;
        let xp = ptr(x, s) + (row0 * w.cols * 4) as u64;
        let op = ptr(out, s) + (row0 * w.rows * 4) as u64;
        if !self.gemm(xp, w, op, m, precision)? {
            return Ok(false);
        }
        if let Some(b) = bias {
            self.add_bias(op, ptr(b, s), m, w.rows)?;
        }
        Ok(true)
    }

    fn add_bias(&self, out: u64, bias: u64, m: usize, n: usize) -> Result<()> {
        // SAFETY: out is m×n, bias n.
        unsafe {
            self.launch(
                "add_bias",
                grid_1d(m * n),
                &[Arg::Ptr(out), Arg::Ptr(bias), Arg::I32(m as i32), Arg::I32(n as i32)],
            )
        }
    }
}

/// Whether the product kernels may read a row of `k` weights in 16-byte packs (device
/// allocations are 256-byte aligned, so rows are when `k` fills whole packs).
fn vectorizable(dtype: DType, k: usize) -> bool {
    k.is_multiple_of(16 / dtype.size_in_bytes())
}

/// Splits rows grouped by expert (`counts[e]` rows of slot `e`, in slot order) into tiles of
/// at most [`TILE_ROWS`] rows for [`Gpu::grouped_linear`], as (slot, first row, rows)
/// triples; experts with `skip(e)` are left out (they run through cuBLAS).
pub fn tiles(counts: &[usize], skip: impl Fn(usize) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    let mut row = 0;
    for (e, &c) in counts.iter().enumerate() {
        if !skip(e) {
            for start in (0..c).step_by(TILE_ROWS) {
                out.extend([e as i32, (row + start) as i32, (c - start).min(TILE_ROWS) as i32]);
            }
        }
        row += c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_each_experts_rows() {
        let t = tiles(&[3, 0, 17, 2], |e| e == 3);
        assert_eq!(t, vec![0, 0, 3, 2, 3, 8, 2, 11, 8, 2, 19, 1]);
    }

    #[test]
    fn packs_need_whole_rows() {
        assert!(vectorizable(DType::BF16, 2880));
        assert!(!vectorizable(DType::BF16, 36));
        assert!(vectorizable(DType::F32, 36));
    }
}
