//! Products over weight rows widened to `f32` a few at a time: every format, quantized ones
//! included, on CPUs with AVX2 and FMA (without AVX-512, or for formats the AVX-512 kernels do
//! not read).
//!
//! A block of [`ROWS`] weight rows is decoded into a buffer of `ROWS × k` floats (MXFP4
//! through a byte shuffle over the E2M1 table, FP8 by moving its bits into an `f32`, bf16 and
//! f16 by widening), then multiplied with every token row by an FMA microkernel. The weights
//! are read from memory once per call, in their stored size, and the tensor is never decoded
//! whole. (Decoding each chunk in registers straight into the products, without the buffer,
//! measured no faster for single-token decode on a 2-core AVX2 machine.)

use std::arch::x86_64::*;
use std::ops::Range;

use crate::Weights;
use crate::quant::{MXFP4_BLOCK, MXFP4_BLOCK_BYTES, blocks_along};

/// Weight rows decoded together.
const ROWS: usize = 4;

/// Whether this CPU has what the kernels here need (and they are wanted).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("SWITCHYARD_NO_AVX2").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Output columns `cols` of `x[m, k] · Wᵀ (+ bias)` into `out` (`m × n`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C ([`available`]); `out` points to `m × n` writable floats of
/// which no other thread writes columns `cols`; `x` holds `m × k` values and `w` `n × k`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn columns(
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    out: *mut f32,
    [m, n, k]: [usize; 3],
    cols: Range<usize>,
) {
    let mut buf = vec![0.0f32; ROWS * k];
    let mut j = cols.start;
    while j < cols.end {
        let rows = (cols.end - j).min(ROWS);
        for r in 0..rows {
            // SAFETY: row j + r < n of w, which holds n × k values; the buffer row holds k.
            unsafe { decode_row(w, j + r, k, &mut buf[r * k..(r + 1) * k]) };
        }
        let mut t = 0;
        while t < m {
            let tokens = (m - t).min(2);
            // SAFETY: tokens t .. t + tokens are rows of x; rows 0 .. rows of the buffer are
            // decoded; out[t', j'] lies inside m × n.
            let sums = unsafe { block(x.as_ptr().add(t * k), tokens, &buf, rows, k) };
            for (dt, row) in sums.iter().enumerate().take(tokens) {
                for (r, &v) in row.iter().enumerate().take(rows) {
                    unsafe { *out.add((t + dt) * n + j + r) = v + bias.map_or(0.0, |b| b[j + r]) };
                }
            }
            t += tokens;
        }
        j += rows;
    }
}

/// Dot products of `tokens` (1 or 2) rows of `x` (from `x`, `k` apart) with `rows` (≤ 4)
/// decoded rows of `buf`.
#[target_feature(enable = "avx2,fma")]
unsafe fn block(x: *const f32, tokens: usize, buf: &[f32], rows: usize, k: usize) -> [[f32; ROWS]; 2] {
    let mut acc = [[_mm256_setzero_ps(); ROWS]; 2];
    let k8 = k / 8 * 8;
    let w = buf.as_ptr();
    let mut i = 0;
    while i < k8 {
        // SAFETY: i + 8 <= k inside every row of x and of the buffer.
        unsafe {
            let wv = [
                _mm256_loadu_ps(w.add(i)),
                _mm256_loadu_ps(w.add(k + i)),
                _mm256_loadu_ps(w.add(2 * k + i)),
                _mm256_loadu_ps(w.add(3 * k + i)),
            ];
            for (t, acc) in acc.iter_mut().enumerate().take(tokens) {
                let xv = _mm256_loadu_ps(x.add(t * k + i));
                for (a, &w) in acc.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, w, *a);
                }
            }
        }
        i += 8;
    }
    let mut res = [[0.0f32; ROWS]; 2];
    for t in 0..tokens {
        for r in 0..rows {
            let mut s = hsum(acc[t][r]);
            for j in k8..k {
                // SAFETY: j < k inside the rows.
                s += unsafe { *x.add(t * k + j) * buf[r * k + j] };
            }
            res[t][r] = s;
        }
    }
    res
}

#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Row `j` (of `k` values) of `w` into `out`.
///
/// # Safety
/// AVX2 and F16C are present; `w` has a row `j` of `k` values; `out` holds `k`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_row(w: Weights<'_>, j: usize, k: usize, out: &mut [f32]) {
    let o = out.as_mut_ptr();
    let k8 = k / 8 * 8;
    match w {
        Weights::F32(v) => out.copy_from_slice(&v[j * k..(j + 1) * k]),
        Weights::F16(v) => {
            let row = &v[j * k..(j + 1) * k];
            let p = row.as_ptr().cast::<u16>();
            for i in (0..k8).step_by(8) {
                // SAFETY: i + 8 <= k inside the row and the output.
                unsafe { _mm256_storeu_ps(o.add(i), _mm256_cvtph_ps(_mm_loadu_si128(p.add(i).cast()))) };
            }
            row[k8..].iter().zip(&mut out[k8..]).for_each(|(a, o)| *o = a.to_f32());
        }
        Weights::BF16(v) => {
            let row = &v[j * k..(j + 1) * k];
            let p = row.as_ptr().cast::<u16>();
            for i in (0..k8).step_by(8) {
                // SAFETY: as above; bf16 is the top half of an f32.
                unsafe {
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(i).cast()));
                    _mm256_storeu_ps(o.add(i), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)));
                }
            }
            row[k8..].iter().zip(&mut out[k8..]).for_each(|(a, o)| *o = a.to_f32());
        }
        // SAFETY: forwarded.
        Weights::Mxfp4 { blocks, scales, .. } => unsafe { decode_mxfp4_row(blocks, scales, j, k, o) },
        Weights::Fp8 { values, scales, cols, block } => {
            let row = &values[j * k..(j + 1) * k];
            let per_row = blocks_along(cols, block[1]);
            let scale_row = &scales[(j / block[0]) * per_row..(j / block[0] + 1) * per_row];
            // SAFETY: forwarded; the row's scales are in range.
            unsafe { decode_fp8_row(row, scale_row, block[1], o) };
        }
    }
}

/// Twice the E2M1 values, as bytes: `shuffle_epi8` looks a nibble up in it.
const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// One MXFP4 row (`k / 32` blocks) into `out`.
///
/// # Safety
/// AVX2 is present; row `j` exists in `blocks`/`scales`; `out` holds `k` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_mxfp4_row(blocks: &[u8], scales: &[u8], j: usize, k: usize, out: *mut f32) {
    let per_row = k / MXFP4_BLOCK;
    let table = unsafe { _mm_loadu_si128(E2M1_X2.as_ptr().cast()) };
    let low = _mm_set1_epi8(0x0f);
    for b in 0..per_row {
        let block = j * per_row + b;
        // Half the scale: the table holds twice each value.
        let scale = _mm256_set1_ps(crate::quant::e8m0(scales[block]) * 0.5);
        // SAFETY: the block's 16 bytes are inside `blocks`; 32 outputs inside `out`.
        unsafe {
            let bytes = _mm_loadu_si128(blocks.as_ptr().add(block * MXFP4_BLOCK_BYTES).cast());
            let lo = _mm_and_si128(bytes, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low);
            // Value 2i is byte i's low nibble, value 2i + 1 its high one.
            let first = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo, hi));
            let second = _mm_shuffle_epi8(table, _mm_unpackhi_epi8(lo, hi));
            let o = out.add(b * MXFP4_BLOCK);
            for (q, half) in [first, second].into_iter().enumerate() {
                let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half));
                let c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(half)));
                _mm256_storeu_ps(o.add(16 * q), _mm256_mul_ps(a, scale));
                _mm256_storeu_ps(o.add(16 * q + 8), _mm256_mul_ps(c, scale));
            }
        }
    }
}

/// One FP8 row into `out`, each value times its column block's scale (`scales`, one per
/// `bc` columns).
///
/// # Safety
/// AVX2 is present; `out` holds `row.len()` floats; `scales` covers the row's column blocks.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_fp8_row(row: &[u8], scales: &[f32], bc: usize, out: *mut f32) {
    let k = row.len();
    // An e4m3 byte's exponent and mantissa bits, moved to an f32's, times 2^120: exact for
    // normal and subnormal values alike (the NaN byte decodes as 480; checkpoints hold none).
    let rebias = _mm256_set1_ps(f32::from_bits((120 + 127) << 23));
    let magnitude = _mm256_set1_epi32(0x7f);
    let sign = _mm256_set1_epi32(0x80);
    let mut i = 0;
    while i < k {
        let scale = scales[i / bc];
        let end = ((i / bc + 1) * bc).min(k);
        let s = _mm256_set1_ps(scale);
        while i + 8 <= end {
            // SAFETY: i + 8 <= k inside the row and the output.
            unsafe {
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.as_ptr().add(i).cast()));
                let bits = _mm256_slli_epi32::<20>(_mm256_and_si256(v, magnitude));
                let value = _mm256_mul_ps(_mm256_castsi256_ps(bits), rebias);
                let signed =
                    _mm256_or_ps(value, _mm256_castsi256_ps(_mm256_slli_epi32::<24>(_mm256_and_si256(v, sign))));
                _mm256_storeu_ps(out.add(i), _mm256_mul_ps(signed, s));
            }
            i += 8;
        }
        while i < end {
            // SAFETY: i < k.
            unsafe { *out.add(i) = crate::quant::FP8_E4M3[row[i] as usize] * scale };
            i += 1;
        }
    }
}
