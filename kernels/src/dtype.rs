//! Checkpoint element types and borrowed weight matrices.

use half::{bf16, f16};

use crate::quant;

/// The element types a checkpoint tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Raw bytes (MXFP4 blocks and their E8M0 scales).
    U8,
    /// FP8 `float8_e4m3fn`.
    F8E4M3,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::F8E4M3 => 1,
        }
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U8 => "U8",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    /// Whether values of this type are numbers a dense product reads directly.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

/// A row-major weight matrix `[rows, cols]` borrowed in its stored format.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// MXFP4: per row, `cols / 32` blocks of 16 bytes (32 E2M1 values, the low nibble first)
    /// and one E8M0 scale byte per block.
    Mxfp4 {
        blocks: &'a [u8],
        scales: &'a [u8],
        cols: usize,
    },
    /// FP8 e4m3 values with one `f32` scale per `block[0] × block[1]` block (edge blocks
    /// partial).
    Fp8 {
        values: &'a [u8],
        scales: &'a [f32],
        cols: usize,
        block: [usize; 2],
    },
}

impl<'a> Weights<'a> {
    /// Elements of the matrix.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::Mxfp4 { blocks, .. } => blocks.len() * 2,
            Weights::Fp8 { values, .. } => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the values are quantized (scaled blocks, decoded on the fly).
    pub fn is_quantized(&self) -> bool {
        matches!(self, Weights::Mxfp4 { .. } | Weights::Fp8 { .. })
    }

    /// Converts elements `range` (row-major) into `out` as `f32`.
    pub fn to_f32_into(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        match *self {
            Weights::F32(w) => out.copy_from_slice(&w[range]),
            Weights::F16(w) => w[range].iter().zip(out).for_each(|(a, o)| *o = a.to_f32()),
            Weights::BF16(w) => w[range].iter().zip(out).for_each(|(a, o)| *o = a.to_f32()),
            Weights::Mxfp4 { blocks, scales, .. } => quant::mxfp4_into(blocks, scales, range, out),
            Weights::Fp8 { values, scales, cols, block } => quant::fp8_into(values, scales, cols, block, range, out),
        }
    }

    /// The whole matrix as `f32` (small tensors only: norms, biases, gates).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.to_f32_into(0..self.len(), &mut out);
        out
    }

    /// Bytes of storage (with scales), for memory-traffic accounting.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weights::F32(w) => w.len() * 4,
            Weights::F16(w) => w.len() * 2,
            Weights::BF16(w) => w.len() * 2,
            Weights::Mxfp4 { blocks, scales, .. } => blocks.len() + scales.len(),
            Weights::Fp8 { values, scales, .. } => values.len() + scales.len() * 4,
        }
    }
}
