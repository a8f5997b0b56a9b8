//! Linear layers: `out[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)`, the shape of a Hugging Face
//! `nn.Linear` weight.
//!
//! Weights are read in their stored dtype and widened to `f32` in registers, so a bf16
//! checkpoint is streamed from memory at two bytes a weight. With few rows (decode) every
//! weight is converted once per token group straight from memory; with many rows (prefill)
//! each block of four weight rows is widened once into a small buffer and reused by every
//! token. Work is split across the rayon pool by blocks of output columns. Quantized weights
//! (MXFP4, FP8) are decoded in registers by the AVX-512 kernels of `quant512` where the CPU
//! has them, by the AVX2 ones of `widen` otherwise.
//!
//! With [`Precision::Bf16Products`], prefill-sized products (at least
//! [`BF16_PRODUCT_MIN_ROWS`] rows) against bf16 weights use the AVX-512 BF16 dot-product unit
//! where the CPU has it: activations are rounded to bf16 once per call and each instruction
//! does 32 multiply-adds with `f32` accumulation (as llama.cpp does for every bf16 product).
//! The default, [`Precision::F32`], keeps `f32` activations everywhere, so results match an
//! `f32` reference (transformers upcasting the checkpoint) to about 1e-5.

use crate::Weights;

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 16;
/// Token rows handled together by the microkernel.
const TOKEN_BLOCK: usize = 4;
/// Weight rows handled together by the microkernel.
const ROW_BLOCK: usize = 4;
/// From this many rows on, bf16 weights are multiplied with bf16-rounded activations.
pub const BF16_PRODUCT_MIN_ROWS: usize = 32;

/// How activations enter products with bf16 weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// `f32` activations in every product (the reference numerics).
    #[default]
    F32,
    /// Prefill-sized products round activations to bf16 and use the BF16 dot-product unit.
    Bf16Products,
}

/// `out[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])` with `f32` activations.
///
/// # Panics
/// If a slice is shorter than its stated shape.
pub fn linear(x: &[f32], w: Weights<'_>, bias: Option<&[f32]>, out: &mut [f32], m: usize, n: usize, k: usize) {
    linear_with(x, w, bias, out, [m, n, k], Precision::F32)
}

/// [`linear`] with a choice of [`Precision`]; `shape` is `[m, n, k]`.
pub fn linear_with(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    shape: [usize; 3],
    precision: Precision,
) {
    let [m, n, k] = shape;
    assert!(x.len() >= m * k, "linear: x has {} values, expected {m}x{k}", x.len());
    assert!(w.len() >= n * k, "linear: weight has {} values, expected {n}x{k}", w.len());
    assert!(out.len() >= m * n, "linear: out has {} values, expected {m}x{n}", out.len());
    if let Some(b) = bias {
        assert!(b.len() >= n, "linear: bias has {} values, expected {n}", b.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Weights::BF16(wb) = w
        && precision == Precision::Bf16Products
        && m >= BF16_PRODUCT_MIN_ROWS
        && avx512::has_bf16_products()
    {
        let xb: Vec<half::bf16> = x[..m * k].iter().map(|&v| half::bf16::from_f32(v)).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        split_columns(n, m * n * k, |cols| {
            // SAFETY: AVX-512 BF16 is present; tasks write disjoint column ranges of `out`.
            unsafe { avx512::bf16_products(&xb, wb, bias, out_ptr.get(), m, n, k, cols) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::quant512::reads(&w) {
        super::quant512::check(&w, n, k);
        let x = super::quant512::prepare(&x[..m * k], &w);
        let out_ptr = SendPtr(out.as_mut_ptr());
        split_columns(n, m * n * k, |cols| {
            // SAFETY: the kernel reads `w` on this CPU; tasks write disjoint column ranges.
            unsafe { super::quant512::columns(&x, w, bias, out_ptr.get(), [m, n, k], cols) }
        });
        return;
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    split_columns(n, m * n * k, |cols| {
        // SAFETY: tasks write disjoint column ranges of `out`, whose size was checked above.
        unsafe { columns(x, w, bias, out_ptr, m, n, k, cols) }
    });
}

/// Runs `f` over blocks of output columns `0..n`, in parallel when `work` is large enough.
fn split_columns(n: usize, work: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = rayon::current_num_threads();
    if work < PARALLEL_THRESHOLD || threads == 1 {
        f(0..n);
        return;
    }
    // A few blocks per thread so an uneven split still keeps every core busy.
    let blocks = threads * 4;
    let chunk = n.div_ceil(blocks).next_multiple_of(ROW_BLOCK).max(ROW_BLOCK);
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    use rayon::prelude::*;
    starts.par_iter().for_each(|&start| f(start..(start + chunk).min(n)));
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to worker threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Takes the whole wrapper, so closures capture it (and its `Send`) rather than the field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Computes output columns `cols` for all `m` rows.
///
/// # Safety
/// `out` must point to `m * n` writable floats and no other thread may write `cols`.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out: SendPtr,
    m: usize,
    n: usize,
    k: usize,
    cols: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx512() && !w.is_quantized() {
            // SAFETY: the CPU supports AVX-512F (checked at run time).
            unsafe { avx512::columns(x, w, bias, out.0, m, n, k, cols) };
            return;
        }
        if super::widen::available() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time); forwarded.
            unsafe { super::widen::columns(x, w, bias, out.0, [m, n, k], cols) };
            return;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { portable_columns(x, w, bias, out.0, m, n, k, cols) };
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_columns(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    cols: std::ops::Range<usize>,
) {
    let mut row = vec![0.0f32; k];
    for j in cols {
        w.to_f32_into(j * k..(j + 1) * k, &mut row);
        let b = bias.map_or(0.0, |b| b[j]);
        for t in 0..m {
            let v = dot(&x[t * k..(t + 1) * k], &row) + b;
            // SAFETY: `t < m`, `j < n`, and column `j` belongs to this caller.
            unsafe { *out.add(t * n + j) = v };
        }
    }
}

/// `f32` dot product with eight independent partial sums (vectorises without intrinsics).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{ROW_BLOCK, TOKEN_BLOCK};
    use crate::Weights;

    /// Whether the CPU has the AVX-512 BF16 dot-product instructions (and they are wanted).
    pub(super) fn has_bf16_products() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| super::super::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16"))
    }

    /// `T` token rows · `R` weight rows, both bf16, 32 multiply-adds per instruction.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block_bf16<const T: usize, const R: usize>(
        x: [*const u16; T],
        w: [*const u16; R],
        k: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let k32 = k / 32 * 32;
        let mut i = 0;
        while i < k32 {
            let mut wv = [unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()) }; R];
            for r in 0..R {
                wv[r] =
                    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w[r].add(i) as *const _)) };
            }
            for t in 0..T {
                let xv =
                    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x[t].add(i) as *const _)) };
                for r in 0..R {
                    acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
                }
            }
            i += 32;
        }
        let mut res = [[0.0f32; R]; T];
        for t in 0..T {
            for r in 0..R {
                let mut s = _mm512_reduce_add_ps(acc[t][r]);
                for j in k32..k {
                    s += unsafe { bf16::from_bits(*x[t].add(j)).to_f32() * bf16::from_bits(*w[r].add(j)).to_f32() };
                }
                res[t][r] = s;
            }
        }
        res
    }

    /// Output columns `cols` of `x · Wᵀ (+ bias)` with bf16 activations `x` and weights `w`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_products(
        x: &[bf16],
        w: &[bf16],
        bias: Option<&[f32]>,
        out: *mut f32,
        m: usize,
        n: usize,
        k: usize,
        cols: std::ops::Range<usize>,
    ) {
        let xp = |t: usize| unsafe { (x.as_ptr() as *const u16).add(t * k) };
        let wp = |j: usize| unsafe { (w.as_ptr() as *const u16).add(j * k) };
        let store = |t: usize, j: usize, v: f32| unsafe { *out.add(t * n + j) = v + bias.map_or(0.0, |b| b[j]) };
        let mut j = cols.start;
        while j < cols.end {
            if cols.end - j < ROW_BLOCK {
                for t in 0..m {
                    let [[v]] = unsafe { block_bf16::<1, 1>([xp(t)], [wp(j)], k) };
                    store(t, j, v);
                }
                j += 1;
                continue;
            }
            let wr = [wp(j), wp(j + 1), wp(j + 2), wp(j + 3)];
            let mut t = 0;
            while t + TOKEN_BLOCK <= m {
                let res =
                    unsafe { block_bf16::<TOKEN_BLOCK, ROW_BLOCK>([xp(t), xp(t + 1), xp(t + 2), xp(t + 3)], wr, k) };
                for (dt, row) in res.iter().enumerate() {
                    for (r, &v) in row.iter().enumerate() {
                        store(t + dt, j + r, v);
                    }
                }
                t += TOKEN_BLOCK;
            }
            while t < m {
                let [row] = unsafe { block_bf16::<1, ROW_BLOCK>([xp(t)], wr, k) };
                for (r, &v) in row.iter().enumerate() {
                    store(t, j + r, v);
                }
                t += 1;
            }
            j += ROW_BLOCK;
        }
    }

    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    /// Loads 16 weights at element offset `i` and widens them to `f32`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const D: u8>(p: *const u8, i: usize) -> __m512 {
        unsafe {
            match D {
                F32 => _mm512_loadu_ps((p as *const f32).add(i)),
                F16 => _mm512_cvtph_ps(_mm256_loadu_si256((p as *const u16).add(i) as *const __m256i)),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    (p as *const u16).add(i) as *const __m256i,
                )))),
            }
        }
    }

    #[inline]
    unsafe fn load1<const D: u8>(p: *const u8, i: usize) -> f32 {
        unsafe {
            match D {
                F32 => *(p as *const f32).add(i),
                F16 => f16::from_bits(*(p as *const u16).add(i)).to_f32(),
                _ => bf16::from_bits(*(p as *const u16).add(i)).to_f32(),
            }
        }
    }

    /// Dot products of `T` token rows with `R` weight rows over `k` elements. With `ahead`
    /// non-zero, the bytes `ahead` past each row's are prefetched as it is read (the next
    /// block of rows, so the weights stream in faster than the hardware prefetcher alone
    /// brings them).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const D: u8, const T: usize, const R: usize>(
        x: [*const f32; T],
        w: [*const u8; R],
        k: usize,
        ahead: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let k16 = k / 16 * 16;
        let elem = if D == F32 { 4 } else { 2 };
        let mut i = 0;
        while i < k16 {
            if ahead != 0 && (i * elem).is_multiple_of(64) {
                for &row in &w {
                    // A prefetch never faults, past the matrix included.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead + i * elem).cast());
                }
            }
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = unsafe { load16::<D>(w[r], i) };
            }
            for t in 0..T {
                let xv = unsafe { _mm512_loadu_ps(x[t].add(i)) };
                for r in 0..R {
                    acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
                }
            }
            i += 16;
        }
        let mut res = [[0.0f32; R]; T];
        for t in 0..T {
            for r in 0..R {
                let mut s = _mm512_reduce_add_ps(acc[t][r]);
                for j in k16..k {
                    s += unsafe { *x[t].add(j) * load1::<D>(w[r], j) };
                }
                res[t][r] = s;
            }
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(
        x: &[f32],
        w: Weights<'_>,
        bias: Option<&[f32]>,
        out: *mut f32,
        m: usize,
        n: usize,
        k: usize,
        cols: std::ops::Range<usize>,
    ) {
        unsafe {
            match w {
                Weights::F32(w) => typed::<F32>(x, w.as_ptr() as *const u8, bias, out, m, n, k, cols),
                Weights::F16(w) => typed::<F16>(x, w.as_ptr() as *const u8, bias, out, m, n, k, cols),
                Weights::BF16(w) => typed::<BF16>(x, w.as_ptr() as *const u8, bias, out, m, n, k, cols),
                Weights::Mxfp4 { .. } | Weights::Fp8 { .. } => {
                    unreachable!("quantized formats take the widening kernels")
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn typed<const D: u8>(
        x: &[f32],
        w: *const u8,
        bias: Option<&[f32]>,
        out: *mut f32,
        m: usize,
        n: usize,
        k: usize,
        cols: std::ops::Range<usize>,
    ) {
        let elem = if D == F32 { 4 } else { 2 };
        let row_ptr = |j: usize| unsafe { w.add(j * k * elem) };
        let xp = |t: usize| unsafe { x.as_ptr().add(t * k) };
        let store = |t: usize, j: usize, v: f32| {
            let b = bias.map_or(0.0, |b| b[j]);
            unsafe { *out.add(t * n + j) = v + b };
        };
        // Many token rows (two token blocks or more): widen each block of weight rows once
        // into a buffer, then reuse it; fewer rows widen in registers as they go.
        let widen = D != F32 && m >= 2 * TOKEN_BLOCK;
        // Read straight from memory, each block of rows prefetches the next one.
        let next = ROW_BLOCK * k * elem;
        let mut buf = if widen { vec![0.0f32; ROW_BLOCK * k] } else { Vec::new() };

        let mut j = cols.start;
        while j < cols.end {
            let rows = (cols.end - j).min(ROW_BLOCK);
            if rows < ROW_BLOCK {
                for jj in j..j + rows {
                    for t in 0..m {
                        let [[v]] = unsafe { block::<D, 1, 1>([xp(t)], [row_ptr(jj)], k, 0) };
                        store(t, jj, v);
                    }
                }
                break;
            }
            let wr: [*const u8; ROW_BLOCK] = if widen {
                for r in 0..ROW_BLOCK {
                    let src = row_ptr(j + r) as *const u16;
                    for e in 0..k {
                        let bits = unsafe { *src.add(e) };
                        buf[r * k + e] =
                            if D == F16 { f16::from_bits(bits).to_f32() } else { bf16::from_bits(bits).to_f32() };
                    }
                }
                let b = buf.as_ptr() as *const u8;
                [b, unsafe { b.add(k * 4) }, unsafe { b.add(2 * k * 4) }, unsafe { b.add(3 * k * 4) }]
            } else {
                [row_ptr(j), row_ptr(j + 1), row_ptr(j + 2), row_ptr(j + 3)]
            };
            let mut t = 0;
            while t + TOKEN_BLOCK <= m {
                let res = if widen {
                    unsafe { block::<F32, TOKEN_BLOCK, ROW_BLOCK>([xp(t), xp(t + 1), xp(t + 2), xp(t + 3)], wr, k, 0) }
                } else {
                    unsafe { block::<D, TOKEN_BLOCK, ROW_BLOCK>([xp(t), xp(t + 1), xp(t + 2), xp(t + 3)], wr, k, next) }
                };
                for (dt, row) in res.iter().enumerate() {
                    for (r, &v) in row.iter().enumerate() {
                        store(t + dt, j + r, v);
                    }
                }
                t += TOKEN_BLOCK;
            }
            // The last 1–3 token rows in one pass, so each weight vector is loaded and
            // widened once for all of them (decode batches give experts a few rows each).
            macro_rules! tail {
                ($n:literal) => {{
                    let xs: [*const f32; $n] = std::array::from_fn(|i| xp(t + i));
                    let res = if widen {
                        unsafe { block::<F32, $n, ROW_BLOCK>(xs, wr, k, 0) }
                    } else {
                        unsafe { block::<D, $n, ROW_BLOCK>(xs, wr, k, next) }
                    };
                    for (dt, row) in res.iter().enumerate() {
                        for (r, &v) in row.iter().enumerate() {
                            store(t + dt, j + r, v);
                        }
                    }
                }};
            }
            match m - t {
                0 => {}
                1 => tail!(1),
                2 => tail!(2),
                _ => tail!(3),
            }
            j += ROW_BLOCK;
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::{Format, Weight};

    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for t in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += x[t * k + i] as f64 * w[j * k + i] as f64;
                }
                out[t * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every format that can store an `n × k` matrix.
    fn formats(k: usize) -> Vec<Format> {
        // FP8 blocks 32 and 64 wide take the AVX-512 kernel (edge blocks and a `k % 32` tail
        // included); 5 wide, the AVX2 one.
        let mut f = vec![
            Format::F32,
            Format::BF16,
            Format::F16,
            Format::Fp8 { block: [3, 5] },
            Format::Fp8 { block: [3, 32] },
            Format::Fp8 { block: [2, 64] },
        ];
        if k.is_multiple_of(32) {
            f.push(Format::Mxfp4);
        }
        f
    }

    /// Each kernel this CPU has, as a name and a function computing columns `0..n`.
    type Kernel = fn(&[f32], Weights<'_>, Option<&[f32]>, &mut [f32], [usize; 3]);
    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut k: Vec<(&'static str, Kernel)> = vec![
            ("dispatch", |x, w, b, out, [m, n, k]| linear(x, w, b, out, m, n, k)),
            ("portable", |x, w, b, out, [m, n, k]| unsafe {
                portable_columns(x, w, b, out.as_mut_ptr(), m, n, k, 0..n)
            }),
        ];
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::widen::available() {
            k.push(("avx2", |x, w, b, out, [m, n, k]| unsafe {
                crate::cpu::widen::columns(x, w, b, out.as_mut_ptr(), [m, n, k], 0..n)
            }));
        }
        // Quantized formats it reads; the others go through the dispatch.
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::quant512::available() {
            k.push(("avx512 quantized", |x, w, b, out, [m, n, k]| {
                if crate::cpu::quant512::reads(&w) {
                    crate::cpu::quant512::check(&w, n, k);
                    let x = crate::cpu::quant512::prepare(&x[..m * k], &w);
                    unsafe { crate::cpu::quant512::columns(&x, w, b, out.as_mut_ptr(), [m, n, k], 0..n) }
                } else {
                    linear(x, w, b, out, m, n, k)
                }
            }));
        }
        k
    }

    /// Every FP8 byte but the NaNs (subnormals included), with block scales that are not powers
    /// of two, in Hub-sized 128-wide blocks (four kernel steps a scale) and partial edge blocks,
    /// through every kernel against an f64 reference.
    #[test]
    fn every_fp8_value_in_hub_sized_blocks_matches_the_reference() {
        use crate::quant::{FP8_E4M3, blocks_along};
        let (n, k) = (9, 300);
        let bytes: Vec<u8> =
            (0..n * k).map(|i| (i * 7 % 256) as u8).map(|b| if b & 0x7f == 0x7f { 0 } else { b }).collect();
        for block in [[128, 128], [5, 128]] {
            let count = blocks_along(n, block[0]) * blocks_along(k, block[1]);
            let scales: Vec<f32> = (0..count).map(|i| 0.37 + 0.11 * i as f32).collect();
            let per_row = blocks_along(k, block[1]);
            let dense: Vec<f32> = (0..n * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    FP8_E4M3[bytes[i] as usize] * scales[(r / block[0]) * per_row + c / block[1]]
                })
                .collect();
            let w = Weights::Fp8 { values: &bytes, scales: &scales, cols: k, block };
            for m in 1..=5 {
                let x = pseudo_random(m * k, 11);
                let want = reference(&x, &dense, None, m, n, k);
                for (name, kernel) in kernels() {
                    let mut got = vec![0.0; m * n];
                    kernel(&x, w, None, &mut got, [m, n, k]);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() < 1e-3 * (1.0 + e.abs()), "{name} {block:?} m={m} [{i}]: {g} vs {e}");
                    }
                }
            }
        }
    }

    /// Every kernel and format against an f64 reference over the stored (decoded) values.
    fn check(m: usize, n: usize, k: usize) {
        let x = pseudo_random(m * k, 1);
        let values = pseudo_random(n * k, 2);
        let bias = pseudo_random(n, 3);
        for format in formats(k) {
            let w = Weight::from_f32(format, n, k, &values, Some(bias.clone())).unwrap();
            let (view, b) = w.host_parts("test", "w").unwrap();
            let want = reference(&x, &view.to_f32_vec(), b, m, n, k);
            for (name, kernel) in kernels() {
                let mut got = vec![0.0; m * n];
                kernel(&x, view, b, &mut got, [m, n, k]);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() < 1e-3 * (1.0 + e.abs()),
                        "{name} {} m={m} n={n} k={k} [{i}]: {g} vs {e}",
                        format.name()
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_and_format_matches_the_reference_across_shapes() {
        // One row (the single-token kernels, with and without a `k % 32` tail) and many.
        let shapes = [
            (1, 1, 1),
            (1, 7, 19),
            (1, 9, 96),
            (1, 5, 200),
            (1, 3, 64),
            (3, 9, 33),
            (4, 8, 64),
            (5, 13, 48),
            (7, 10, 96),
            (6, 5, 200),
        ];
        for &(m, n, k) in shapes.iter().chain(&[(17, 70, 130), (31, 256, 256), (2, 6, 96)]) {
            check(m, n, k);
        }
    }

    #[test]
    fn bf16_products_stay_close_to_f32() {
        // Prefill-sized: activations are rounded to bf16 where the CPU has the BF16 unit.
        let (m, n, k) = (BF16_PRODUCT_MIN_ROWS + 5, 23, 200);
        let x = pseudo_random(m * k, 6);
        let wb: Vec<bf16> = pseudo_random(n * k, 7).iter().map(|&v| bf16::from_f32(v)).collect();
        let w: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let want = reference(&x, &w, None, m, n, k);
        let mut got = vec![0.0; m * n];
        linear_with(&x, Weights::BF16(&wb), None, &mut got, [m, n, k], Precision::Bf16Products);
        for (g, e) in got.iter().zip(&want) {
            // bf16 rounding of x: relative error 2^-9 per term, summed over k random-sign terms.
            assert!((g - e).abs() < 0.05, "{g} vs {e}");
        }
    }
}
