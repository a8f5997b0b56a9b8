//! The quantized weight formats as the Hub ships them, decoded to `f32`, and the quantizers
//! that make them (tests and random checkpoints).
//!
//! - **MXFP4** (gpt-oss experts): each row is cut into blocks of [`MXFP4_BLOCK`] values; a
//!   block is 16 bytes of E2M1 values (sign, 2 exponent bits, 1 mantissa bit), two to a byte
//!   with the low nibble first, and one E8M0 scale byte, `2^(s - 127)`.
//! - **FP8** (DeepSeek-V3, Qwen3-FP8, Kimi-K2): `float8_e4m3fn` values (bias 7, no
//!   infinities, `S.1111.111` is NaN) with one `f32` scale per `b0 × b1` block of the matrix
//!   (`weight_scale_inv`, which multiplies despite its name); edge blocks are partial.
//!
//! A decoded value is the table value times its scale, in `f32`: the same number transformers
//! gets when it dequantizes the checkpoint.

use std::ops::Range;

/// Values per MXFP4 block (and scale).
pub const MXFP4_BLOCK: usize = 32;
/// Bytes of one MXFP4 block's values.
pub const MXFP4_BLOCK_BYTES: usize = MXFP4_BLOCK / 2;

/// The 16 E2M1 values by nibble.
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// An E8M0 scale: `2^(s - 127)` (255, NaN in the OCP spec, is taken as `2^128`, infinity, as
/// `ldexp` gives it).
#[inline]
pub const fn e8m0(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(1 << 22),
        255 => f32::INFINITY,
        s => f32::from_bits((s as u32) << 23),
    }
}

/// The 256 `float8_e4m3fn` values by byte.
pub static FP8_E4M3: [f32; 256] = fp8_table();

const fn fp8_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut b = 0;
    while b < 256 {
        let (e, m) = ((b >> 3) & 0xf, b & 7);
        let magnitude = if e == 15 && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0 // m/8 · 2^-6
        } else {
            f32::from_bits((((e + 120) as u32) << 23) | ((m as u32) << 20))
        };
        t[b] = if b & 0x80 != 0 { -magnitude } else { magnitude };
        b += 1;
    }
    t
}

/// Elements `range` of an MXFP4 matrix (row-major element indices; rows are whole blocks) into
/// `out`.
pub fn mxfp4_into(blocks: &[u8], scales: &[u8], range: Range<usize>, out: &mut [f32]) {
    for (o, i) in out.iter_mut().zip(range) {
        let b = i / MXFP4_BLOCK;
        let byte = blocks[b * MXFP4_BLOCK_BYTES + (i % MXFP4_BLOCK) / 2];
        let nibble = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
        *o = E2M1[nibble as usize] * e8m0(scales[b]);
    }
}

/// Scale blocks along a dimension of `n` for blocks of `b`.
pub fn blocks_along(n: usize, b: usize) -> usize {
    n.div_ceil(b)
}

/// Elements `range` of an FP8 matrix of `cols` columns with `block`-sized scale blocks into
/// `out`.
pub fn fp8_into(values: &[u8], scales: &[f32], cols: usize, block: [usize; 2], range: Range<usize>, out: &mut [f32]) {
    let per_row = blocks_along(cols, block[1]);
    for (o, i) in out.iter_mut().zip(range) {
        let (r, c) = (i / cols, i % cols);
        *o = FP8_E4M3[values[i] as usize] * scales[(r / block[0]) * per_row + c / block[1]];
    }
}

/// MXFP4 blocks and scales of a row-major `[rows, cols]` matrix (`cols` a multiple of 32):
/// each block's scale is the smallest power of two that brings its largest magnitude within
/// 6, and each value rounds to the nearest E2M1 value (ties to the lower nibble).
pub fn quantize_mxfp4(values: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(cols.is_multiple_of(MXFP4_BLOCK) && values.len().is_multiple_of(cols.max(1)));
    let n_blocks = values.len() / MXFP4_BLOCK;
    let (mut blocks, mut scales) = (vec![0u8; n_blocks * MXFP4_BLOCK_BYTES], vec![0u8; n_blocks]);
    for (b, chunk) in values.chunks_exact(MXFP4_BLOCK).enumerate() {
        let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // 2^e with amax / 2^e <= 6.
        let e = if amax > 0.0 { (amax / 6.0).log2().ceil() as i32 } else { 0 };
        let s = (e + 127).clamp(1, 254);
        scales[b] = s as u8;
        let scale = e8m0(s as u8);
        for (j, &v) in chunk.iter().enumerate() {
            let nibble = nearest(&E2M1, v / scale) as u8;
            blocks[b * MXFP4_BLOCK_BYTES + j / 2] |= if j % 2 == 0 { nibble } else { nibble << 4 };
        }
    }
    (blocks, scales)
}

/// FP8 values and `block` scales of a row-major `[rows, cols]` matrix: each block's scale maps
/// its largest magnitude to 448 (the largest e4m3 value), each value rounds to the nearest.
pub fn quantize_fp8(values: &[f32], cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let rows = values.len() / cols.max(1);
    let (br, bc) = (blocks_along(rows, block[0]), blocks_along(cols, block[1]));
    let mut scales = vec![1.0f32; br * bc];
    for (i, s) in scales.iter_mut().enumerate() {
        let (r0, c0) = ((i / bc) * block[0], (i % bc) * block[1]);
        let mut amax = 0.0f32;
        for r in r0..(r0 + block[0]).min(rows) {
            for c in c0..(c0 + block[1]).min(cols) {
                amax = amax.max(values[r * cols + c].abs());
            }
        }
        if amax > 0.0 {
            *s = amax / 448.0;
        }
    }
    let out = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (r, c) = (i / cols, i % cols);
            nearest(&FP8_E4M3, v / scales[(r / block[0]) * bc + c / block[1]]) as u8
        })
        .collect();
    (out, scales)
}

/// The index of the table value nearest to `v` (finite entries only; the lower index on ties).
fn nearest(table: &[f32], v: f32) -> usize {
    let mut best = 0;
    for (i, &t) in table.iter().enumerate() {
        if t.is_finite() && (v - t).abs() < (v - table[best]).abs() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_hold_the_formats_values() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(130), 8.0);
        assert_eq!(e8m0(120), 1.0 / 128.0);
        assert_eq!(FP8_E4M3[0x38], 1.0); // exponent 7, mantissa 0
        assert_eq!(FP8_E4M3[0x7e], 448.0); // the largest finite value
        assert_eq!(FP8_E4M3[0xfe], -448.0);
        assert_eq!(FP8_E4M3[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert!(FP8_E4M3[0x7f].is_nan() && FP8_E4M3[0xff].is_nan());
        assert_eq!(FP8_E4M3[0x3c], 1.5);
    }

    #[test]
    fn mxfp4_decodes_the_low_nibble_first_with_the_blocks_scale() {
        // One row of two blocks: block 0 scaled by 2, block 1 by 1/2.
        let mut blocks = vec![0u8; 32];
        blocks[0] = 0x21; // values 0: 0.5 (nibble 1), 1: 1.0 (nibble 2)
        blocks[16] = 0xf7; // values 32: 6.0 (nibble 7), 33: -6.0 (nibble 15)
        let scales = [128, 126];
        let mut out = vec![0.0; 64];
        mxfp4_into(&blocks, &scales, 0..64, &mut out);
        assert_eq!(&out[..2], &[1.0, 2.0]);
        assert_eq!(&out[32..34], &[3.0, -3.0]);
        let mut part = vec![0.0; 2];
        mxfp4_into(&blocks, &scales, 32..34, &mut part);
        assert_eq!(part, vec![3.0, -3.0]);
    }

    #[test]
    fn quantizers_round_trip_representable_values() {
        let cols = 64;
        let values: Vec<f32> = (0..2 * cols).map(|i| E2M1[i % 16] * if i < 64 { 4.0 } else { 0.25 }).collect();
        let (blocks, scales) = quantize_mxfp4(&values, cols);
        let mut back = vec![0.0; values.len()];
        mxfp4_into(&blocks, &scales, 0..values.len(), &mut back);
        assert_eq!(back, values);

        // FP8 with partial edge blocks: 5 × 7 in blocks of 2 × 3.
        let values: Vec<f32> = (0..35).map(|i| (i as f32 - 17.0) * 0.37).collect();
        let (q, s) = quantize_fp8(&values, 7, [2, 3]);
        assert_eq!(s.len(), 3 * 3);
        let mut back = vec![0.0; 35];
        fp8_into(&q, &s, 7, [2, 3], 0..35, &mut back);
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6, "{a} vs {b}");
        }
    }
}
