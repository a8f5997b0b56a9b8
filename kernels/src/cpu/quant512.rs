//! Products with quantized weights on AVX-512: MXFP4 and FP8 decoded in registers, 32 values a
//! step, straight into the FMAs. No buffer, no decoded copy; activations and accumulation stay
//! `f32`, so results are transformers' dequantized product up to summation order.
//!
//! - **MXFP4.** A block's 16 bytes are widened to 16 lanes. Each lane's low nibble (value `2i`)
//!   and high nibble (value `2i + 1`) index a 16-float E2M1 table with one permute each (the
//!   permute reads only an index's low four bits). The activations are reordered once per call
//!   to match: per block, its even positions and then its odd ones ([`prepare`]). The block's
//!   E8M0 scale multiplies the table first (exact: a power of two), so the permutes give the
//!   dequantized values.
//! - **FP8** (column blocks a multiple of 32 wide, as the Hub's 128 × 128 are). 32 bytes are
//!   widened to 16-bit lanes and their bits moved into binary16: e4m3's exponent and mantissa
//!   are binary16's low ones, `2^8` apart, subnormals included, and the hardware converts
//!   binary16 to `f32` exactly. The block scale is factored out of each step's partial sum, and
//!   the `2^8` out of the finished dot product (exact). (The NaN byte decodes as 480 in the
//!   vector steps, as in the AVX2 kernel, and as NaN in the scalar tail past the last whole
//!   step; checkpoints hold none.) Other block widths take the AVX2 kernel.

use std::arch::x86_64::*;
use std::borrow::Cow;
use std::ops::Range;

use crate::Weights;
use crate::quant::{E2M1, FP8_E4M3, MXFP4_BLOCK, MXFP4_BLOCK_BYTES, e8m0};

/// Values per step of the microkernel.
const STEP: usize = 32;
/// Token rows handled together.
const TOKENS: usize = 4;
/// Weight rows handled together.
const ROWS: usize = 4;

const MXFP4: u8 = 0;
const FP8: u8 = 1;

/// The 256 E8M0 scales by byte.
static E8M0: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut s = 0;
    while s < 256 {
        t[s] = e8m0(s as u8);
        s += 1;
    }
    t
};

/// Whether these kernels may run on this CPU (AVX-512 F and BW, and the kernels wanted).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| super::has_avx512() && is_x86_feature_detected!("avx512bw"))
}

/// Whether these kernels read `w` on this CPU.
pub fn reads(w: &Weights<'_>) -> bool {
    match w {
        Weights::Mxfp4 { .. } => available(),
        Weights::Fp8 { block, .. } => block[1].is_multiple_of(STEP) && available(),
        _ => false,
    }
}

/// Panics unless `w` holds an `n × k` matrix with all its scales: the kernels read the scales
/// through raw pointers, with `k` as the row length.
pub fn check(w: &Weights<'_>, n: usize, k: usize) {
    match *w {
        Weights::Mxfp4 { blocks, scales, cols } => {
            assert!(cols == k && k.is_multiple_of(MXFP4_BLOCK), "MXFP4 product: {cols} columns, k = {k}");
            assert!(blocks.len() >= n * k / 2, "MXFP4 product: {} block bytes for {n}x{k}", blocks.len());
            assert!(scales.len() >= n * k / MXFP4_BLOCK, "MXFP4 product: {} scales for {n}x{k}", scales.len());
        }
        Weights::Fp8 { values, scales, cols, block } => {
            let want = crate::quant::blocks_along(n, block[0]) * crate::quant::blocks_along(k, block[1]);
            assert!(cols == k, "FP8 product: {cols} columns, k = {k}");
            assert!(values.len() >= n * k, "FP8 product: {} values for {n}x{k}", values.len());
            assert!(scales.len() >= want, "FP8 product: {} scales, {want} blocks", scales.len());
        }
        _ => {}
    }
}

/// The activations `x` (`m × k`) as the kernel for `w` reads them: MXFP4 reorders each block's
/// 32 values to its even positions then its odd ones; FP8 reads them as they are.
pub fn prepare<'x>(x: &'x [f32], w: &Weights<'_>) -> Cow<'x, [f32]> {
    if !matches!(w, Weights::Mxfp4 { .. }) {
        return Cow::Borrowed(x);
    }
    let mut out = vec![0.0f32; x.len()];
    for (src, dst) in x.chunks_exact(MXFP4_BLOCK).zip(out.chunks_exact_mut(MXFP4_BLOCK)) {
        let (even, odd) = dst.split_at_mut(MXFP4_BLOCK / 2);
        for (i, pair) in src.chunks_exact(2).enumerate() {
            even[i] = pair[0];
            odd[i] = pair[1];
        }
    }
    Cow::Owned(out)
}

/// A quantized matrix as raw parts the microkernel steps through.
#[derive(Clone, Copy)]
struct Packed {
    data: *const u8,
    /// E8M0 bytes (MXFP4) or `f32` block scales (FP8).
    scales: *const u8,
    k: usize,
    /// Bytes of one row's data.
    row_bytes: usize,
    /// Rows that share one row of scales (FP8: a block's height), and that row's bytes.
    scale_rows: usize,
    scale_row_bytes: usize,
    /// Steps that share one scale.
    steps_per_scale: usize,
}

impl Packed {
    fn new(w: &Weights<'_>, k: usize) -> Self {
        match *w {
            Weights::Mxfp4 { blocks, scales, .. } => Packed {
                data: blocks.as_ptr(),
                scales: scales.as_ptr(),
                k,
                row_bytes: k / 2,
                scale_rows: 1,
                scale_row_bytes: k / MXFP4_BLOCK,
                steps_per_scale: 1,
            },
            Weights::Fp8 { values, scales, block, .. } => Packed {
                data: values.as_ptr(),
                scales: scales.as_ptr().cast(),
                k,
                row_bytes: k,
                scale_rows: block[0],
                scale_row_bytes: crate::quant::blocks_along(k, block[1]) * 4,
                steps_per_scale: block[1] / STEP,
            },
            _ => unreachable!("reads() admits only quantized formats"),
        }
    }

    /// Row `j`'s first data byte and first scale (a byte for MXFP4, an `f32` for FP8). Rows
    /// past the end give addresses only good for prefetching.
    fn row(&self, j: usize) -> (*const u8, *const u8) {
        (
            self.data.wrapping_add(j * self.row_bytes),
            self.scales.wrapping_add(j / self.scale_rows * self.scale_row_bytes),
        )
    }

    /// Step `s` (values `32s .. 32s + 32`) of a row (from [`Packed::row`]) whose step takes
    /// scale `scale`: two halves of 16 values, in the order [`prepare`] puts the activations,
    /// and (FP8) the scale of their partial sum. MXFP4's halves come scaled.
    ///
    /// # Safety
    /// AVX-512 F and BW are present; step `s` and scale `scale` lie inside the row.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn step<const F: u8>(
        (data, scales): (*const u8, *const u8),
        s: usize,
        scale: usize,
        table: __m512,
    ) -> (__m512, __m512, __m512) {
        unsafe {
            if F == MXFP4 {
                // The block's scale multiplies the table, exactly (a power of two), so the
                // permutes give the dequantized values themselves.
                let table = _mm512_mul_ps(table, _mm512_set1_ps(E8M0[*scales.add(scale) as usize]));
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add(s * MXFP4_BLOCK_BYTES).cast()));
                let even = _mm512_permutexvar_ps(bytes, table);
                let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table);
                (even, odd, table)
            } else {
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(data.add(s * STEP).cast()));
                // s.eeee.mmm → binary16 s.0eeee.mmm0000000: the value divided by 2^8.
                let h = _mm512_and_si512(
                    _mm512_srai_epi16::<1>(_mm512_slli_epi16::<8>(v)),
                    _mm512_set1_epi16(0xbfff_u16 as i16),
                );
                let low = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
                let high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h));
                let scale = (scales as *const f32).add(scale).read_unaligned();
                (low, high, _mm512_set1_ps(scale))
            }
        }
    }

    /// FP8 values `range` of a row (from [`Packed::row`]) times `x` (unreordered), one at a
    /// time: the tail past the last whole step.
    ///
    /// # Safety
    /// `range` lies inside the row; `x` holds `range.end` values.
    unsafe fn fp8_tail(&self, (data, scales): (*const u8, *const u8), range: Range<usize>, x: *const f32) -> f32 {
        let width = self.steps_per_scale * STEP;
        let mut sum = 0.0;
        for i in range {
            unsafe {
                let scale = (scales as *const f32).add(i / width).read_unaligned();
                sum += FP8_E4M3[*data.add(i) as usize] * scale * *x.add(i);
            }
        }
        sum
    }
}

/// Dot products of `T` prepared token rows with weight rows `j .. j + R`.
///
/// # Safety
/// AVX-512 F and BW are present; the rows exist; each `x[t]` holds `k` values.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn block<const F: u8, const T: usize, const R: usize>(
    p: &Packed,
    x: [*const f32; T],
    j: usize,
) -> [[f32; R]; T] {
    let steps = p.k / STEP;
    let table = unsafe { _mm512_loadu_ps(E2M1.as_ptr()) };
    let rows: [(*const u8, *const u8); R] = std::array::from_fn(|r| p.row(j + r));
    // The next block of rows, fetched into cache while this one is computed: rows of a few
    // hundred bytes (gpt-oss: 1440) are too short for the hardware prefetcher to follow.
    let ahead: [*const u8; R] = std::array::from_fn(|r| p.row(j + R + r).0);
    let step_bytes = if F == MXFP4 { MXFP4_BLOCK_BYTES } else { STEP };
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let (mut scale, mut left) = (0, p.steps_per_scale);
    for s in 0..steps {
        if (s * step_bytes).is_multiple_of(64) {
            for a in ahead {
                // A prefetch never faults, past the matrix included.
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(s * step_bytes).cast());
            }
        }
        let mut xa = [_mm512_setzero_ps(); T];
        let mut xb = [_mm512_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: s * 32 + 32 <= k inside every token row.
            unsafe {
                xa[t] = _mm512_loadu_ps(x[t].add(s * STEP));
                xb[t] = _mm512_loadu_ps(x[t].add(s * STEP + STEP / 2));
            }
        }
        for r in 0..R {
            // SAFETY: step s of row j + r and its scale are inside the matrix.
            // (MXFP4 has a scale per step: no counter to keep.)
            let (a, b, sc) = unsafe { Packed::step::<F>(rows[r], s, if F == MXFP4 { s } else { scale }, table) };
            for t in 0..T {
                acc[t][r] = if F == MXFP4 {
                    _mm512_fmadd_ps(b, xb[t], _mm512_fmadd_ps(a, xa[t], acc[t][r]))
                } else {
                    let partial = _mm512_fmadd_ps(b, xb[t], _mm512_mul_ps(a, xa[t]));
                    _mm512_fmadd_ps(partial, sc, acc[t][r])
                };
            }
        }
        if F == FP8 {
            left -= 1;
            if left == 0 {
                (scale, left) = (scale + 1, p.steps_per_scale);
            }
        }
    }
    let mut res = [[0.0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            let sum = _mm512_reduce_add_ps(acc[t][r]);
            res[t][r] = if F == FP8 {
                // SAFETY: the tail lies inside row j + r and token row t.
                sum * 256.0 + unsafe { p.fp8_tail(rows[r], steps * STEP..p.k, x[t]) }
            } else {
                sum
            };
        }
    }
    res
}

/// Output columns `cols` of `x[m, k] · Wᵀ (+ bias)` into `out` (`m × n`), `x` as [`prepare`]
/// returned it.
///
/// # Safety
/// [`reads`]`(&w)` holds and [`check`]`(&w, n, k)` passes; `out` points to `m × n` writable
/// floats of which no other thread writes columns `cols`; `x` holds `m × k` values.
pub(super) unsafe fn columns(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out: *mut f32,
    [m, n, k]: [usize; 3],
    cols: Range<usize>,
) {
    let p = Packed::new(&w, k);
    // SAFETY: forwarded.
    unsafe {
        match w {
            Weights::Mxfp4 { .. } => typed::<MXFP4>(&p, x, bias, out, [m, n, k], cols),
            _ => typed::<FP8>(&p, x, bias, out, [m, n, k], cols),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn typed<const F: u8>(
    p: &Packed,
    x: &[f32],
    bias: Option<&[f32]>,
    out: *mut f32,
    [m, n, k]: [usize; 3],
    cols: Range<usize>,
) {
    let xp = |t: usize| unsafe { x.as_ptr().add(t * k) };
    let store = |t: usize, j: usize, v: f32| unsafe { *out.add(t * n + j) = v + bias.map_or(0.0, |b| b[j]) };
    macro_rules! run {
        ($t:literal, $r:literal, $t0:expr, $j:expr) => {{
            let xs: [*const f32; $t] = std::array::from_fn(|i| xp($t0 + i));
            // SAFETY: token rows t0 .. t0 + T and weight rows j .. j + R exist.
            let res = unsafe { block::<F, $t, $r>(p, xs, $j) };
            for (dt, row) in res.iter().enumerate() {
                for (r, &v) in row.iter().enumerate() {
                    store($t0 + dt, $j + r, v);
                }
            }
        }};
    }
    let mut j = cols.start;
    while j < cols.end {
        if cols.end - j < ROWS {
            for t in 0..m {
                run!(1, 1, t, j);
            }
            j += 1;
            continue;
        }
        let mut t = 0;
        while t + TOKENS <= m {
            run!(4, 4, t, j);
            t += TOKENS;
        }
        // The last 1–3 token rows in one pass, each weight step decoded once for all of them.
        match m - t {
            0 => {}
            1 => run!(1, 4, t, j),
            2 => run!(2, 4, t, j),
            _ => run!(3, 4, t, j),
        }
        j += ROWS;
    }
}
