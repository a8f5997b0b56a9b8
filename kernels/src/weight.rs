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
use crate::{DType, Device, Weights, quant};

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    /// gpt-oss's MXFP4: E2M1 values in blocks of 32 along each row, one E8M0 scale a block
    /// (see [`crate::quant`]).
    Mxfp4,
    /// FP8 e4m3 with one `f32` scale per `block[0] × block[1]` block.
    Fp8 {
        block: [usize; 2],
    },
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::BF16 => "BF16",
            Format::Mxfp4 => "MXFP4",
            Format::Fp8 { .. } => "FP8",
        }
    }

    /// The element type of a dense format; `None` for the quantized ones.
    pub fn dtype(self) -> Option<DType> {
        match self {
            Format::F32 => Some(DType::F32),
            Format::F16 => Some(DType::F16),
            Format::BF16 => Some(DType::BF16),
            Format::Mxfp4 | Format::Fp8 { .. } => None,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.dtype().is_none()
    }

    /// Checks a `[rows, cols]` matrix can be stored this way, naming what cannot.
    pub fn check(self, rows: usize, cols: usize) -> Result<()> {
        let op = "Format::check";
        match self {
            Format::Mxfp4 if !cols.is_multiple_of(quant::MXFP4_BLOCK) => Err(KernelError::Unsupported {
                op,
                message: format!("an MXFP4 row of {cols} values is not a whole number of 32-value blocks"),
            }),
            Format::Fp8 { block } if block[0] == 0 || block[1] == 0 => {
                Err(KernelError::Unsupported { op, message: format!("FP8 scale blocks of {}x{}", block[0], block[1]) })
            }
            _ if rows.checked_mul(cols).is_none() => {
                Err(KernelError::Unsupported { op, message: format!("a matrix of {} is too large", Shape(rows, cols)) })
            }
            _ => Ok(()),
        }
    }

    /// Bytes of a `[rows, cols]` matrix's values.
    pub fn data_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Format::Mxfp4 => rows * cols / 2,
            Format::Fp8 { .. } => rows * cols,
            dense => rows * cols * dense.dtype().expect("a dense format").size_in_bytes(),
        }
    }

    /// Bytes of a `[rows, cols]` matrix's scales (none for dense formats).
    pub fn scale_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Format::Mxfp4 => rows * cols / quant::MXFP4_BLOCK,
            Format::Fp8 { block } => quant::blocks_along(rows, block[0]) * quant::blocks_along(cols, block[1]) * 4,
            _ => 0,
        }
    }

    /// The alignment the values must have to be read in place.
    pub fn align(self) -> usize {
        self.dtype().map_or(1, DType::size_in_bytes)
    }

    /// `values` in this dense format, little-endian.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Format::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Format::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            Format::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            Format::Mxfp4 | Format::Fp8 { .. } => panic!("{} is quantized: use the quant module", self.name()),
        }
    }
}

impl From<DType> for Format {
    /// The dense format of a float dtype.
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => Format::F32,
            DType::F16 => Format::F16,
            DType::BF16 => Format::BF16,
            DType::U8 | DType::F8E4M3 => panic!("{} is not a dense weight dtype", d.name()),
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

/// A weight matrix `[rows, cols]` (out × in, as `nn.Linear` stores it), its scales where the
/// format is quantized, and its bias.
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
    Host {
        values: HostBytes,
        scales: Option<HostBytes>,
    },
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
    /// A weight of a dense format in host memory; checks the bytes against the format and
    /// shape.
    pub fn host(format: Format, rows: usize, cols: usize, data: HostBytes, bias: Option<Vec<f32>>) -> Result<Self> {
        Self::host_with_scales(format, rows, cols, (data, None), bias)
    }

    /// A weight in host memory, `(values, scales)`; checks both against the format and shape
    /// (scales only and always for a quantized format).
    pub fn host_with_scales(
        format: Format,
        rows: usize,
        cols: usize,
        (values, scales): (HostBytes, Option<HostBytes>),
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        let op = "Weight::host";
        format.check(rows, cols)?;
        let what = |bytes: usize| format!("{bytes} bytes ({} {})", format.name(), Shape(rows, cols));
        let want = format.data_bytes(rows, cols);
        if values.len() != want {
            return Err(KernelError::shape(op, "values", what(want), format!("{} bytes", values.len())));
        }
        if !(values.as_bytes().as_ptr() as usize).is_multiple_of(format.align()) {
            return Err(KernelError::Unsupported {
                op,
                message: format!("{} values must be {}-byte aligned", format.name(), format.align()),
            });
        }
        match (&scales, format.scale_bytes(rows, cols)) {
            (None, 0) => {}
            (None, want) => return Err(KernelError::shape(op, "scales", what(want), "none")),
            (Some(s), want) if s.len() != want => {
                return Err(KernelError::shape(op, "scales", what(want), format!("{} bytes", s.len())));
            }
            (Some(s), _) if !(s.as_bytes().as_ptr() as usize).is_multiple_of(4) => {
                return Err(KernelError::Unsupported { op, message: "scales must be 4-byte aligned".into() });
            }
            (Some(_), _) => {}
        }
        if let Some(b) = &bias
            && b.len() != rows
        {
            return Err(KernelError::shape(op, "bias", format!("{rows} values"), format!("{} values", b.len())));
        }
        let data = WeightData::Host { values, scales };
        Ok(Weight { format, rows, cols, data, bias: bias.map(|b| BiasData::Host(Arc::from(b))) })
    }

    /// `values` (row-major `[rows, cols]`) stored as `format` (quantized ones quantized), in
    /// host memory.
    pub fn from_f32(format: Format, rows: usize, cols: usize, values: &[f32], bias: Option<Vec<f32>>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(values.len()) {
            let got = format!("{} values", values.len());
            return Err(KernelError::shape("Weight::from_f32", "values", Shape(rows, cols), got));
        }
        format.check(rows, cols)?;
        let parts = match format {
            Format::Mxfp4 => {
                let (blocks, scales) = quant::quantize_mxfp4(values, cols);
                (HostBytes::copy_of(&blocks), Some(HostBytes::copy_of(&scales)))
            }
            Format::Fp8 { block } => {
                let (q, scales) = quant::quantize_fp8(values, cols, block);
                let scales: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                (HostBytes::copy_of(&q), Some(HostBytes::copy_of(&scales)))
            }
            dense => (HostBytes::copy_of(&dense.encode(values)), None),
        };
        Self::host_with_scales(format, rows, cols, parts, bias)
    }

    /// Rows `rows` of this host matrix, in that order, with their bias entries, as a new host
    /// weight (a copy). An FP8 matrix's rows keep their scales as blocks one row tall
    /// (`[1, block[1]]`), so any selection is exact.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Weight> {
        let op = "select_rows";
        let Some((values, scales)) = self.host_bytes() else {
            return Err(KernelError::WrongDevice { op, arg: "weight", expected: Device::Cpu, got: self.device() });
        };
        if let Some(&r) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(KernelError::OutOfRange { op, message: format!("row {r} of {}", self.rows) });
        }
        let row_bytes = self.format.data_bytes(1, self.cols);
        let data: Vec<u8> = rows.iter().flat_map(|&r| &values[r * row_bytes..(r + 1) * row_bytes]).copied().collect();
        let (format, scales) = match (self.format, scales) {
            (Format::Fp8 { block }, Some(s)) => {
                let per_row = quant::blocks_along(self.cols, block[1]) * 4;
                let picked: Vec<u8> = rows
                    .iter()
                    .flat_map(|&r| &s[(r / block[0]) * per_row..(r / block[0] + 1) * per_row])
                    .copied()
                    .collect();
                (Format::Fp8 { block: [1, block[1]] }, Some(HostBytes::copy_of(&picked)))
            }
            (Format::Mxfp4, Some(s)) => {
                let per_row = self.format.scale_bytes(1, self.cols);
                let picked: Vec<u8> = rows.iter().flat_map(|&r| &s[r * per_row..(r + 1) * per_row]).copied().collect();
                (Format::Mxfp4, Some(HostBytes::copy_of(&picked)))
            }
            (format, _) => (format, None),
        };
        let bias = self.host_bias().map(|b| rows.iter().map(|&r| b[r]).collect());
        Self::host_with_scales(format, rows.len(), self.cols, (HostBytes::copy_of(&data), scales), bias)
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
            WeightData::Host { .. } => Device::Cpu,
            #[cfg(feature = "cuda")]
            WeightData::Cuda(m) => Device::Cuda(m.ordinal),
        }
    }

    /// Bytes of the matrix as stored, scales included (what a product streams).
    pub fn size_in_bytes(&self) -> usize {
        self.format.data_bytes(self.rows, self.cols) + self.format.scale_bytes(self.rows, self.cols)
    }

    /// The stored values and scales, where they are in host memory.
    pub fn host_bytes(&self) -> Option<(&[u8], Option<&[u8]>)> {
        match &self.data {
            WeightData::Host { values, scales } => Some((values.as_bytes(), scales.as_ref().map(HostBytes::as_bytes))),
            #[cfg(feature = "cuda")]
            WeightData::Cuda(_) => None,
        }
    }

    /// The matrix as a typed view, where it is in host memory.
    pub fn view(&self) -> Option<Weights<'_>> {
        let (b, scales) = self.host_bytes()?;
        let n = self.rows * self.cols;
        // SAFETY: construction checked the lengths and the alignments for the format (values
        // to their element size, scales to 4 bytes); every bit pattern is a valid f32, f16,
        // bf16 or byte.
        Some(unsafe {
            match self.format {
                Format::F32 => Weights::F32(std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), n)),
                Format::F16 => Weights::F16(std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), n)),
                Format::BF16 => Weights::BF16(std::slice::from_raw_parts(b.as_ptr().cast::<bf16>(), n)),
                Format::Mxfp4 => Weights::Mxfp4 { blocks: b, scales: scales?, cols: self.cols },
                Format::Fp8 { block } => {
                    let s = scales?;
                    let scales = std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len() / 4);
                    Weights::Fp8 { values: b, scales, cols: self.cols, block }
                }
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

    #[test]
    fn selected_rows_keep_their_values_bias_and_scales() {
        // FP8 in 2 x 3 blocks over 5 x 7 (partial edge blocks): rows picked across blocks.
        let values: Vec<f32> = (0..35).map(|i| (i as f32 - 17.0) * 0.37).collect();
        let bias: Vec<f32> = (0..5).map(|i| i as f32).collect();
        let rows = [4, 1, 2, 1];
        for format in [Format::F32, Format::BF16, Format::Fp8 { block: [2, 3] }] {
            let w = Weight::from_f32(format, 5, 7, &values, Some(bias.clone())).unwrap();
            let all = w.view().unwrap().to_f32_vec();
            let picked = w.select_rows(&rows).unwrap();
            let want: Vec<f32> = rows.iter().flat_map(|&r| all[r * 7..(r + 1) * 7].to_vec()).collect();
            assert_eq!(picked.view().unwrap().to_f32_vec(), want, "{}", format.name());
            assert_eq!(picked.host_bias().unwrap(), &[4.0, 1.0, 2.0, 1.0]);
        }
        let w = Weight::from_f32(Format::F32, 5, 7, &values, None).unwrap();
        assert!(w.select_rows(&[5]).unwrap_err().to_string().contains("row 5 of 5"));
    }
}
