//! Products (`matmul.cu` and cuBLAS): linear layers, and the grouped form over a layer's
//! experts.
//!
//! Every format runs the same warp-per-column kernel, which decodes its 16-byte packs in
//! registers: eight bf16/f16 or four `f32` weights, sixteen FP8 values (each times its
//! block's scale), or one MXFP4 block of 32 E2M1 values and its E8M0 scale. Quantized
//! weights never go to cuBLAS and are never decoded into a copy.

use std::sync::{Arc, PoisonError};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{Arg, Gpu, GpuMatrix, blas_error, count, grid, grid_1d, int, ptr};
use crate::Format;
use crate::cpu::Precision;
use crate::cpu::matmul::BF16_PRODUCT_MIN_ROWS;
use crate::error::{KernelError, Result};

/// Rows one product tile covers (`TILE_ROWS` in `matmul.cu`).
const TILE_ROWS: usize = 8;
/// Output columns per block of the product kernels (`COLS_PER_BLOCK`).
const COLS_PER_BLOCK: usize = 8;

/// One expert's matrix and optional bias, as [`Gpu::group`] takes them.
pub(crate) type Projection = (Arc<GpuMatrix>, Option<Arc<CudaSlice<f32>>>);

/// One projection of a MoE layer's experts, addressed by slot, for the grouped product: the
/// device tables of the slots' matrix, scale and bias addresses (0 for a slot without an
/// expert, a dense format's scales or a missing bias), and the matrices and biases
/// themselves, which it keeps alive so the addresses cannot dangle.
pub(crate) struct GroupedWeights {
    format: Format,
    rows: usize,
    cols: usize,
    ordinal: usize,
    slots: Vec<Option<Projection>>,
    weights: CudaSlice<u64>,
    scales: CudaSlice<u64>,
    biases: CudaSlice<u64>,
    /// Whether every matrix starts 16-byte aligned (the product kernels' packs need it).
    aligned: bool,
}

/// The product kernel for weights of `format`, dense or `grouped`.
fn kernel(grouped: bool, format: Format) -> &'static str {
    match (grouped, format) {
        (false, Format::BF16) => "linear_bf16",
        (false, Format::F16) => "linear_f16",
        (false, Format::F32) => "linear_f32",
        (false, Format::Mxfp4) => "linear_mxfp4",
        (false, Format::Fp8 { .. }) => "linear_fp8",
        (true, Format::BF16) => "grouped_linear_bf16",
        (true, Format::F16) => "grouped_linear_f16",
        (true, Format::F32) => "grouped_linear_f32",
        (true, Format::Mxfp4) => "grouped_linear_mxfp4",
        (true, Format::Fp8 { .. }) => "grouped_linear_fp8",
    }
}

/// Weights in one 16-byte pack of `format` (`PACK` of its row reader in `matmul.cu`): an
/// MXFP4 pack is one block, whose scale it reads with it.
fn pack(format: Format) -> usize {
    match format {
        Format::F32 => 4,
        Format::F16 | Format::BF16 => 8,
        Format::Fp8 { .. } => 16,
        Format::Mxfp4 => 32,
    }
}

/// The scale block the kernels take as `b0, b1`: FP8's, `[1, 1]` (unread) for the other
/// formats. `matrix_bytes` checked an FP8 block is non-empty and fits an `int`.
fn scale_block(format: Format) -> [i32; 2] {
    match format {
        Format::Fp8 { block: [b0, b1] } => [b0 as i32, b1 as i32],
        _ => [1, 1],
    }
}

/// A format as an error names it, with FP8's scale block.
fn describe(format: Format) -> String {
    match format {
        Format::Fp8 { block: [b0, b1] } => format!("FP8 ({b0}x{b1} scale blocks)"),
        f => f.name().to_string(),
    }
}

/// Blocks of [`COLS_PER_BLOCK`] warps: `row_blocks` on x, the `n` output columns on y.
fn product_cfg(op: &'static str, row_blocks: usize, n: usize) -> Result<LaunchConfig> {
    grid(op, row_blocks, n.div_ceil(COLS_PER_BLOCK), 32 * COLS_PER_BLOCK as u32)
}

/// Whether the product kernels may read rows of `k` weights in 16-byte packs: `k` fills
/// whole packs and the matrix and activations start 16-byte aligned (device allocations
/// are 256-byte aligned, so rows then are too).
fn vectorizable(format: Format, k: usize, addresses: &[u64]) -> bool {
    k.is_multiple_of(pack(format)) && addresses.iter().all(|a| a % 16 == 0)
}

/// The shape of one product: `m` rows of `k` in, `n` out.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
}

impl Gpu {
    /// `x[m, k] · Wᵀ (+ bias)` for `w` `[n, k]`: `[m, n]`, on the kernel below
    /// [`BF16_PRODUCT_MIN_ROWS`] rows and on cuBLAS from there where the format and
    /// `precision` allow (see the module doc).
    pub(crate) fn linear(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        precision: Precision,
    ) -> Result<CudaSlice<f32>> {
        let op = "linear";
        let d = Dims { m, n: w.rows, k: w.cols };
        self.check_matrix(op, w)?;
        self.check(op, "x", x, count(op, &[m, d.k])?)?;
        if let Some(b) = bias {
            self.check(op, "bias", b, d.n)?;
        }
        let len = count(op, &[m, d.n])?;
        if len == 0 {
            return self.zeros(op, 0);
        }
        // SAFETY: one of the branches below writes every element.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let s = &self.stream;
        let (xp, outp, bp) = (ptr(x, s), ptr(&out, s), bias.map_or(0, |b| ptr(b, s)));
        // SAFETY: x holds m × k values, `w` n × k, bias n and out m × n (checked above), all
        // on this device.
        unsafe {
            if m >= BF16_PRODUCT_MIN_ROWS && self.gemm(op, xp, w, outp, m, precision)? {
                if bias.is_some() {
                    self.add_bias(op, outp, bp, d)?;
                }
            } else {
                self.column_kernel(op, xp, w, bp, outp, d)?;
            }
        }
        Ok(out)
    }

    /// The warp-per-column kernel over `d.m` rows, for every format.
    ///
    /// # Safety
    /// `x` addresses `d.m × d.k` values, `bias` (0: none) `d.n`, `out` `d.m × d.n`, and `w` is
    /// checked, `[d.n, d.k]`, all on this device.
    unsafe fn column_kernel(
        &self,
        op: &'static str,
        x: u64,
        w: &GpuMatrix,
        bias: u64,
        out: u64,
        d: Dims,
    ) -> Result<()> {
        let (wp, sp) = (w.ptr(&self.stream), w.scales_ptr(&self.stream));
        let vec = vectorizable(w.format, d.k, &[x, wp]);
        let [b0, b1] = scale_block(w.format);
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(wp),
            Arg::Ptr(sp),
            Arg::Ptr(bias),
            Arg::Ptr(out),
            Arg::I32(int(op, "rows", d.m)?),
            Arg::I32(int(op, "output features", d.n)?),
            Arg::I32(int(op, "input features", d.k)?),
            Arg::I32(b0),
            Arg::I32(b1),
            Arg::I32(vec.into()),
        ];
        let cfg = product_cfg(op, d.m.div_ceil(TILE_ROWS), d.n)?;
        // SAFETY: the kernel reads m × k, n × k and n values and writes m × n (the caller's
        // contract); of a quantized matrix it reads the values and scales of those n × k
        // weights, which the checked matrix holds (`matrix_bytes`); packs are only used where
        // `vectorizable` found them aligned.
        unsafe { self.launch(kernel(false, w.format), cfg, &args) }
    }

    /// `out = x · Wᵀ` for `m` rows through cuBLAS, when the format and precision allow;
    /// `false` (nothing written) otherwise. Column-major cuBLAS computes
    /// `outᵀ[n, m] = W[n, k] · xᵀ[k, m]`, the row-major `out`.
    ///
    /// # Safety
    /// `x` addresses `m × w.cols` values and `out` `m × w.rows`, on this device; `w` is
    /// checked.
    unsafe fn gemm(
        &self,
        op: &'static str,
        x: u64,
        w: &GpuMatrix,
        out: u64,
        m: usize,
        precision: Precision,
    ) -> Result<bool> {
        use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let (n, k) = (w.rows, w.cols);
        if k == 0 {
            return Ok(false);
        }
        let (mi, ni, ki) = (int(op, "rows", m)?, int(op, "output features", n)?, int(op, "input features", k)?);
        let (a_type, xin, _rounded) = match (w.format, precision) {
            (Format::F32, _) => (CUDA_R_32F, x, None),
            (Format::BF16, Precision::Bf16Products) => {
                let len = count(op, &[m, k])?;
                // SAFETY: `round_to_bf16` writes all m × k elements before cuBLAS reads them.
                let rounded = unsafe { self.alloc::<u16>(op, len)? };
                let rp = ptr(&rounded, &self.stream);
                let args = [Arg::Ptr(x), Arg::Ptr(rp), Arg::I64(len as i64)];
                // SAFETY: x holds m × k f32 (the caller's contract), the rounded copy m × k u16.
                unsafe { self.launch("round_to_bf16", grid_1d(len), &args)? };
                // Freed on the stream after the GEMM that reads it.
                (CUDA_R_16BF, rp, Some(rounded))
            }
            _ => return Ok(false),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.bind(op)?;
        let handle = self.blas.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: W is n × k, x m × k (as a_type), out m × n f32 (the caller's contract), all
        // on the handle's stream; beta = 0, so out is only written.
        unsafe {
            blas::gemm_ex(
                *handle.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                w.ptr(&self.stream) as *const _,
                a_type,
                ki,
                xin as *const _,
                a_type,
                ki,
                (&beta as *const f32).cast(),
                out as *mut _,
                CUDA_R_32F,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error(op, self.ordinal, e))?;
        Ok(true)
    }

    /// `out[r, :] += bias` over `d.m` rows.
    ///
    /// # Safety
    /// `out` addresses `d.m × d.n` values and `bias` `d.n`, on this device.
    unsafe fn add_bias(&self, op: &'static str, out: u64, bias: u64, d: Dims) -> Result<()> {
        let args = [Arg::Ptr(out), Arg::Ptr(bias), Arg::I32(int(op, "rows", d.m)?), Arg::I32(int(op, "columns", d.n)?)];
        // SAFETY: the caller's contract; the kernel touches out[0 .. m × n] and bias[0 .. n].
        unsafe { self.launch("add_bias", grid_1d(d.m * d.n), &args) }
    }

    /// The address tables of one projection over a layer's expert slots (`None`: a slot with
    /// no expert). Every matrix must be on this device and share one format (an FP8 scale
    /// block included) and shape, and every bias must hold a value per output; `None` where
    /// no slot holds an expert.
    pub(crate) fn group(&self, slots: Vec<Option<Projection>>) -> Result<Option<GroupedWeights>> {
        let op = "group";
        let Some((first, _)) = slots.iter().flatten().next() else { return Ok(None) };
        let (format, rows, cols) = (first.format, first.rows, first.cols);
        int(op, "expert slots", slots.len())?;
        let s = &self.stream;
        let n = slots.len();
        let (mut weights, mut scales, mut biases) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut aligned = true;
        for slot in &slots {
            let Some((m, b)) = slot else {
                weights.push(0);
                scales.push(0);
                biases.push(0);
                continue;
            };
            self.check_matrix(op, m)?;
            if (m.format, m.rows, m.cols) != (format, rows, cols) {
                return Err(KernelError::shape(
                    op,
                    "expert weight",
                    format!("{} [{rows}, {cols}]", describe(format)),
                    format!("{} [{}, {}]", describe(m.format), m.rows, m.cols),
                ));
            }
            if let Some(b) = b {
                self.check(op, "expert bias", b, rows)?;
            }
            aligned &= m.ptr(s).is_multiple_of(16);
            weights.push(m.ptr(s));
            scales.push(m.scales_ptr(s));
            biases.push(b.as_ref().map_or(0, |b| ptr(b, s)));
        }
        let (weights, scales, biases) =
            (self.upload(op, &weights)?, self.upload(op, &scales)?, self.upload(op, &biases)?);
        Ok(Some(GroupedWeights { format, rows, cols, ordinal: self.ordinal, slots, weights, scales, biases, aligned }))
    }

    /// Rows grouped by slot (`counts[e]` rows for slot `e`, in slot order) through their
    /// slot's matrix: `[Σ counts, cols]` in, `[Σ counts, rows]` out. One grouped launch
    /// covers every slot's rows in tiles; with [`Precision::Bf16Products`] and bf16 or `f32`
    /// weights, a slot with [`BF16_PRODUCT_MIN_ROWS`] rows or more goes to cuBLAS instead
    /// (quantized weights never do).
    pub(crate) fn grouped_linear(
        &self,
        x: &CudaSlice<f32>,
        w: &GroupedWeights,
        counts: &[usize],
        precision: Precision,
    ) -> Result<CudaSlice<f32>> {
        let op = "grouped_linear";
        self.same_device(op, "w", w.ordinal)?;
        if counts.len() != w.slots.len() {
            return Err(KernelError::shape(op, "counts", format!("{} slots", w.slots.len()), counts.len()));
        }
        if let Some(e) = (0..counts.len()).find(|&e| counts[e] > 0 && w.slots[e].is_none()) {
            return Err(KernelError::OutOfRange {
                op,
                message: format!("rows routed to slot {e}, which holds no expert"),
            });
        }
        let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        let total = total.ok_or_else(|| KernelError::Unsupported { op, message: "row counts overflow".into() })?;
        let d = Dims { m: total, n: w.rows, k: w.cols };
        int(op, "rows", total)?;
        self.check(op, "x", x, count(op, &[total, d.k])?)?;
        let len = count(op, &[total, d.n])?;
        if len == 0 {
            return self.zeros(op, 0);
        }
        let cublas = precision == Precision::Bf16Products && matches!(w.format, Format::BF16 | Format::F32) && d.k > 0;
        let big = |e: usize| cublas && counts[e] >= BF16_PRODUCT_MIN_ROWS;
        let tiles = tiles(counts, big);
        // SAFETY: the tiles cover every row of a slot not sent to cuBLAS, and cuBLAS writes
        // every row of the others.
        let out = unsafe { self.alloc::<f32>(op, len)? };
        let s = &self.stream;
        let (xp, outp) = (ptr(x, s), ptr(&out, s));
        if !tiles.is_empty() {
            let n_tiles = tiles.len() / 3;
            let tiles = self.upload(op, &tiles)?;
            let vec = w.aligned && vectorizable(w.format, d.k, &[xp]);
            let [b0, b1] = scale_block(w.format);
            let args = [
                Arg::Ptr(xp),
                self.p(&w.weights),
                self.p(&w.scales),
                self.p(&w.biases),
                self.p(&tiles),
                Arg::Ptr(outp),
                Arg::I32(int(op, "output features", d.n)?),
                Arg::I32(int(op, "input features", d.k)?),
                Arg::I32(b0),
                Arg::I32(b1),
                Arg::I32(vec.into()),
            ];
            // SAFETY: every tile names a slot that holds a matrix of n × k values of the
            // group's format, with their scales where it is quantized (checked by `group`),
            // and a bias of n or none, and rows inside 0 .. total, of which x holds total × k
            // values and out total × n (checked above). Packs are only used where every
            // matrix and x start 16-byte aligned and k is whole packs, so rows are aligned.
            unsafe { self.launch(kernel(true, w.format), product_cfg(op, n_tiles, d.n)?, &args)? };
        }
        let mut row0 = 0;
        for (e, &c) in counts.iter().enumerate() {
            if big(e) {
                let (m, b) = w.slots[e].as_ref().expect("checked: only held slots have rows");
                let (x_at, out_at) = ((row0 * d.k * 4) as u64, (row0 * d.n * 4) as u64);
                let rows = Dims { m: c, ..d };
                // SAFETY: rows row0 .. row0 + c lie inside the total checked above, so x holds
                // their c × k inputs and out their c × n outputs; the bias holds n values.
                unsafe {
                    let done = self.gemm(op, xp + x_at, m, outp + out_at, c, precision)?;
                    assert!(done, "cuBLAS takes bf16 and f32 weights with bf16 products");
                    if let Some(b) = b {
                        self.add_bias(op, outp + out_at, ptr(b, s), rows)?;
                    }
                }
            }
            row0 += c;
        }
        Ok(out)
    }
}

/// Splits rows grouped by slot (`counts[e]` rows of slot `e`, in slot order) into tiles of
/// at most [`TILE_ROWS`] rows for the grouped kernel, as (slot, first row, rows) triples;
/// slots with `skip(e)` are left out (they run through cuBLAS). The caller checks the
/// slots and the total row count fit an `int`.
fn tiles(counts: &[usize], skip: impl Fn(usize) -> bool) -> Vec<i32> {
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
    fn tiles_cover_each_slots_rows() {
        let t = tiles(&[3, 0, 17, 2], |e| e == 3);
        assert_eq!(t, vec![0, 0, 3, 2, 3, 8, 2, 11, 8, 2, 19, 1]);
    }

    #[test]
    fn packs_need_whole_rows_and_aligned_starts() {
        assert!(vectorizable(Format::BF16, 2880, &[0, 256]));
        assert!(!vectorizable(Format::BF16, 36, &[0]));
        assert!(vectorizable(Format::F32, 36, &[512]));
        assert!(!vectorizable(Format::F32, 36, &[520]));
        // An MXFP4 pack is a block: 90 of them in gpt-oss-20b's rows.
        assert!(vectorizable(Format::Mxfp4, 2880, &[0]));
        assert!(!vectorizable(Format::Mxfp4, 2880, &[8]));
        assert!(vectorizable(Format::Fp8 { block: [3, 5] }, 96, &[0]));
        assert!(!vectorizable(Format::Fp8 { block: [128, 128] }, 40, &[0]));
    }

    #[test]
    fn every_format_has_a_compiled_product_kernel() {
        let matmul = super::super::source::SOURCES.iter().find(|s| s.name == "matmul.cu").unwrap();
        let formats = [Format::F32, Format::F16, Format::BF16, Format::Mxfp4, Format::Fp8 { block: [128, 128] }];
        for format in formats {
            for grouped in [false, true] {
                let name = kernel(grouped, format);
                assert!(matmul.functions.contains(&name), "{name} is not in matmul.cu's function list");
            }
        }
        assert_eq!(scale_block(Format::Fp8 { block: [3, 5] }), [3, 5]);
        assert_eq!(scale_block(Format::Mxfp4), [1, 1]);
    }

    /// The bit arithmetic of `matmul.cu`'s `e2m1`, `e8m0` and `e4m3`, written again here, gives
    /// exactly the values of the `quant` tables the CPU decodes with.
    #[test]
    fn device_decoders_bit_arithmetic_gives_the_quant_tables() {
        use crate::quant;
        let same = |a: f32, b: f32| (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits();
        for nibble in 0u32..16 {
            let em = nibble & 7;
            let magnitude = match em {
                0 => 0,
                1 => 0x3f00_0000,
                _ => (em + 252) << 22,
            };
            let v = f32::from_bits(magnitude | (nibble & 8) << 28);
            assert!(same(v, quant::E2M1[nibble as usize]), "e2m1({nibble}) = {v}");
        }
        for s in 0u32..256 {
            let v = f32::from_bits(if s == 0 { 1 << 22 } else { s << 23 });
            assert!(same(v, quant::e8m0(s as u8)), "e8m0({s}) = {v}");
        }
        for b in 0u32..256 {
            let em = b & 0x7f;
            let mut magnitude = if em < 8 { (em as f32 * 0.001953125).to_bits() } else { (em << 20) + (120 << 23) };
            if em == 0x7f {
                magnitude = 0x7fc0_0000;
            }
            let v = f32::from_bits(magnitude | (b & 0x80) << 24);
            assert!(same(v, quant::FP8_E4M3[b as usize]), "e4m3({b}) = {v}");
        }
    }
}
