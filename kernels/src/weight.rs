//! [`Weight`]: a linear layer's parameters as data — the matrix's bytes, its storage
//! [`Format`] and shape, and an optional `f32` bias — on one device.
//!
//! The format is the only thing the products dispatch on (`Backend::linear`,
//! `Backend::grouped_linear`): adding a storage format (MXFP4 blocks with E8M0 scales, FP8
//! with 2-D block scales) adds a [`Format`] entry, its scales beside the data here, and a
//! kernel per backend; the model's code does not change.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{KernelError, Result};
use crate::tensor::Shape;
use crate::{DType, Device, Weights};

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
}

impl Format {
    pub fn name(self) -> &'static str {
        self.dtype().name()
    }

    /// The element type of a dense format.
    pub fn dtype(self) -> DType {
        match self {
            Format::F32 => DType::F32,
            Format::F16 => DType::F16,
            Format::BF16 => DType::BF16,
        }
    }

    /// Bytes of a `[rows, cols]` matrix's data.
    pub fn data_bytes(self, rows: usize, cols: usize) -> usize {
        rows * cols * self.dtype().size_in_bytes()
    }

    /// The alignment the data must have to be read in place.
    pub fn align(self) -> usize {
        self.dtype().size_in_bytes()
    }

    /// `values` in this format, little-endian.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Format::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Format::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            Format::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

impl From<DType> for Format {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => Format::F32,
            DType::F16 => Format::F16,
            DType::BF16 => Format::BF16,
        }
    }
}

/// Bytes in host memory shared with their owner (a memory-mapped checkpoint, an aligned
/// buffer): cloning shares, never copies.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

/// An 8-byte-aligned owned buffer.
struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

impl HostBytes {
    /// Bytes `range` of `owner`.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(KernelError::OutOfRange {
                op: "HostBytes::new",
                message: format!("bytes {range:?} of a {len}-byte buffer"),
            });
        }
        Ok(HostBytes { owner, range })
    }

    /// An 8-byte-aligned copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` holds at least `bytes.len()` bytes and does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        HostBytes { owner: Arc::new(Aligned { words, len: bytes.len() }), range: 0..bytes.len() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// A weight matrix `[rows, cols]` (out × in, as `nn.Linear` stores it) and its bias.
#[derive(Clone)]
pub struct Weight {
    format: Format,
    rows: usize,
    cols: usize,
    pub(crate) data: WeightData,
    pub(crate) bias: Option<BiasData>,
}

#[derive(Clone)]
pub(crate) enum WeightData {
    Host(HostBytes),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::GpuMatrix>),
}

#[derive(Clone)]
pub(crate) enum BiasData {
    Host(Arc<[f32]>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaSlice<f32>>, usize),
}

impl Weight {
    /// A weight in host memory; checks the bytes against the format and shape.
    pub fn host(format: Format, rows: usize, cols: usize, data: HostBytes, bias: Option<Vec<f32>>) -> Result<Self> {
        let op = "Weight::host";
        let want = format.data_bytes(rows, cols);
        if data.len() != want {
            let got = format!("{} bytes", data.len());
            return Err(KernelError::shape(
                op,
                "data",
                format!("{want} bytes ({} {})", format.name(), Shape(rows, cols)),
                got,
            ));
        }
        if !(data.as_bytes().as_ptr() as usize).is_multiple_of(format.align()) {
            return Err(KernelError::Unsupported {
                op,
                message: format!("{} data must be {}-byte aligned", format.name(), format.align()),
            });
        }
        if let Some(b) = &bias
            && b.len() != rows
        {
            return Err(KernelError::shape(op, "bias", format!("{rows} values"), format!("{} values", b.len())));
        }
        Ok(Weight {
            format,
            rows,
            cols,
            data: WeightData::Host(data),
            bias: bias.map(|b| BiasData::Host(Arc::from(b))),
        })
    }

    /// `values` (row-major `[rows, cols]`) stored as `format`, in host memory.
    pub fn from_f32(format: Format, rows: usize, cols: usize, values: &[f32], bias: Option<Vec<f32>>) -> Result<Self> {
        if values.len() != rows * cols {
            let got = format!("{} values", values.len());
            return Err(KernelError::shape("Weight::from_f32", "values", Shape(rows, cols), got));
        }
        Self::host(format, rows, cols, HostBytes::copy_of(&format.encode(values)), bias)
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn from_parts(
        format: Format,
        rows: usize,
        cols: usize,
        data: WeightData,
        bias: Option<BiasData>,
    ) -> Self {
        Weight { format, rows, cols, data, bias }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// Where the matrix is.
    pub fn device(&self) -> Device {
        match &self.data {
            WeightData::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            WeightData::Cuda(m) => Device::Cuda(m.ordinal),
        }
    }

    /// Bytes of the matrix as stored (what a product streams).
    pub fn size_in_bytes(&self) -> usize {
        self.format.data_bytes(self.rows, self.cols)
    }

    /// The stored bytes, where they are in host memory.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            WeightData::Host(bytes) => Some(bytes.as_bytes()),
            #[cfg(feature = "cuda")]
            WeightData::Cuda(_) => None,
        }
    }

    /// The matrix as a typed view, where it is in host memory.
    pub fn view(&self) -> Option<Weights<'_>> {
        let b = self.host_bytes()?;
        let n = self.rows * self.cols;
        // SAFETY: construction checked the length and the alignment for the format; every
        // bit pattern is a valid f32, f16 or bf16.
        Some(unsafe {
            match self.format {
                Format::F32 => Weights::F32(std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), n)),
                Format::F16 => Weights::F16(std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), n)),
                Format::BF16 => Weights::BF16(std::slice::from_raw_parts(b.as_ptr().cast::<bf16>(), n)),
            }
        })
    }

    /// The bias, where it is in host memory.
    pub fn host_bias(&self) -> Option<&[f32]> {
        match &self.bias {
            Some(BiasData::Host(b)) => Some(b),
            _ => None,
        }
    }

    pub(crate) fn host_parts(&self, op: &'static str, arg: &'static str) -> Result<(Weights<'_>, Option<&[f32]>)> {
        let wrong = || KernelError::WrongDevice { op, arg, expected: Device::Cpu, got: self.device() };
        let view = self.view().ok_or_else(wrong)?;
        let bias = match &self.bias {
            None => None,
            Some(BiasData::Host(b)) => Some(&b[..]),
            #[cfg(feature = "cuda")]
            Some(BiasData::Cuda(..)) => return Err(wrong()),
        };
        Ok((view, bias))
    }

    /// Checks the matrix takes inputs of `cols` values.
    pub(crate) fn expect_cols(&self, op: &'static str, arg: &'static str, cols: usize) -> Result<()> {
        if self.cols != cols {
            return Err(KernelError::shape(op, arg, format!("[_, {cols}]"), Shape(self.rows, self.cols)));
        }
        Ok(())
    }
}

/// A weight's matrix and bias on a CUDA device, shared.
#[cfg(feature = "cuda")]
pub(crate) type CudaParts<'a> = (&'a Arc<crate::cuda::GpuMatrix>, Option<&'a Arc<crate::cuda::CudaSlice<f32>>>);

#[cfg(feature = "cuda")]
impl Weight {
    /// The matrix and bias, where they are on CUDA device `ordinal`.
    pub(crate) fn cuda_parts(&self, op: &'static str, arg: &'static str, ordinal: usize) -> Result<CudaParts<'_>> {
        let wrong = || KernelError::WrongDevice { op, arg, expected: Device::Cuda(ordinal), got: self.device() };
        let matrix = match &self.data {
            WeightData::Cuda(m) if m.ordinal == ordinal => m,
            _ => return Err(wrong()),
        };
        let bias = match &self.bias {
            None => None,
            Some(BiasData::Cuda(b, n)) if *n == ordinal => Some(b),
            Some(_) => return Err(wrong()),
        };
        Ok((matrix, bias))
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bias = if self.has_bias() { " + bias" } else { "" };
        write!(f, "Weight({} {}{bias} on {})", self.format.name(), Shape(self.rows, self.cols), self.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_checked_against_format_and_shape() {
        let w = Weight::from_f32(Format::BF16, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Some(vec![0.5, 0.25])).unwrap();
        assert_eq!(w.size_in_bytes(), 12);
        assert_eq!(w.view().unwrap().to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let short = HostBytes::copy_of(&[0u8; 10]);
        let e = Weight::host(Format::BF16, 2, 3, short, None).unwrap_err().to_string();
        assert!(e.contains("expected 12 bytes (BF16 [2, 3])"), "{e}");
        assert!(Weight::from_f32(Format::F32, 2, 3, &[0.0; 6], Some(vec![0.0; 3])).is_err());
        let odd = HostBytes::new(Arc::new(vec![0u8; 13]), 1..13).unwrap();
        assert!(Weight::host(Format::F32, 1, 3, odd, None).is_err());
    }
}
