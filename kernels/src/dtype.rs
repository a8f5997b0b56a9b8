//! Weight dtypes and borrowed weight matrices.

use half::{bf16, f16};

/// The element types a checkpoint tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// A row-major weight matrix `[rows, cols]` borrowed in its stored dtype.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            Weights::F32(_) => DType::F32,
            Weights::F16(_) => DType::F16,
            Weights::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` of the flat storage (for example one row block of a matrix).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Weights<'a> {
        match *self {
            Weights::F32(w) => Weights::F32(&w[range]),
            Weights::F16(w) => Weights::F16(&w[range]),
            Weights::BF16(w) => Weights::BF16(&w[range]),
        }
    }

    /// Converts elements `range` into `out` as `f32`.
    pub fn to_f32_into(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[range]),
            Weights::F16(w) => w[range].iter().zip(out).for_each(|(a, o)| *o = a.to_f32()),
            Weights::BF16(w) => w[range].iter().zip(out).for_each(|(a, o)| *o = a.to_f32()),
        }
    }

    /// The whole matrix as `f32` (small tensors only: norms, biases, gates).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.to_f32_into(0..self.len(), &mut out);
        out
    }

    /// Bytes of storage, for memory-traffic accounting.
    pub fn size_in_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}
