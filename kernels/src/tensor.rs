//! [`Tensor`]: a buffer of `f32` activations on one device, carrying its shape. Every backend
//! operation checks its tensors against what it reads and writes (shape and device) before it
//! touches memory, so a wrong size is an error, never a stray write.
//!
//! Tensors are matrices, `[rows, cols]`: a row is one token's values (or one KV-cache block);
//! a vector is one row. They are made by a [`crate::Backend`] (`upload`, `zeros`, the
//! results of its operations) or, on the host, with [`Tensor::host`].

use std::fmt;

use crate::Device;
use crate::error::{KernelError, Result};

/// A `[rows, cols]` buffer of `f32` values on one device.
pub struct Tensor {
    rows: usize,
    cols: usize,
    pub(crate) data: Data,
}

/// Where a tensor's elements are. Device buffers are at least `rows * cols` long (one element
/// for an empty tensor, as device allocations cannot be empty).
pub(crate) enum Data {
    HostF32(Vec<f32>),
    #[cfg(feature = "cuda")]
    CudaF32(crate::cuda::CudaSlice<f32>, usize),
}

/// A shape for messages: `[rows, cols]`.
pub(crate) struct Shape(pub usize, pub usize);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.0, self.1)
    }
}

impl Tensor {
    /// A host tensor of `rows × cols` values.
    pub fn host(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(KernelError::shape(
                "Tensor::host",
                "values",
                Shape(rows, cols),
                format!("{} values", values.len()),
            ));
        }
        Ok(Tensor { rows, cols, data: Data::HostF32(values) })
    }

    pub(crate) fn from_data(rows: usize, cols: usize, data: Data) -> Self {
        Tensor { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the elements are.
    pub fn device(&self) -> Device {
        match &self.data {
            Data::HostF32(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Data::CudaF32(_, n) => Device::Cuda(*n),
        }
    }

    /// Bytes of the elements.
    pub fn size_in_bytes(&self) -> usize {
        self.len() * 4
    }

    /// The same elements as `rows × cols` (a view change, no copy).
    pub fn reshape(self, rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(self.len()) {
            return Err(KernelError::shape("reshape", "tensor", format!("{} values", rows * cols), self.shape()));
        }
        Ok(Tensor { rows, cols, ..self })
    }

    /// The `f32` values, where they are in host memory.
    pub fn as_host(&self) -> Option<&[f32]> {
        match &self.data {
            Data::HostF32(v) => Some(v),
            #[cfg(feature = "cuda")]
            Data::CudaF32(..) => None,
        }
    }

    /// The `f32` values, where they are in host memory.
    pub fn into_host(self) -> Option<Vec<f32>> {
        match self.data {
            Data::HostF32(v) => Some(v),
            #[cfg(feature = "cuda")]
            Data::CudaF32(..) => None,
        }
    }

    pub(crate) fn shape(&self) -> Shape {
        Shape(self.rows, self.cols)
    }

    /// Checks the shape is `[rows, cols]`.
    pub(crate) fn expect(&self, op: &'static str, arg: &'static str, rows: usize, cols: usize) -> Result<()> {
        if (self.rows, self.cols) != (rows, cols) {
            return Err(KernelError::shape(op, arg, Shape(rows, cols), self.shape()));
        }
        Ok(())
    }

    /// Checks the tensor holds `len` values, whatever its shape.
    pub(crate) fn expect_len(&self, op: &'static str, arg: &'static str, len: usize) -> Result<()> {
        if self.len() != len {
            return Err(KernelError::shape(op, arg, format!("{len} values"), self.shape()));
        }
        Ok(())
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn wrong(&self, op: &'static str, arg: &'static str, on: Device) -> KernelError {
        KernelError::WrongDevice { op, arg, expected: on, got: self.device() }
    }

    // Without the `cuda` feature every tensor is on the host and these cannot fail.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host_f32(&self, op: &'static str, arg: &'static str) -> Result<&[f32]> {
        match &self.data {
            Data::HostF32(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Data::CudaF32(..) => Err(self.wrong(op, arg, Device::Cpu)),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host_f32_mut(&mut self, op: &'static str, arg: &'static str) -> Result<&mut [f32]> {
        let device = self.device();
        match &mut self.data {
            Data::HostF32(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Data::CudaF32(..) => Err(KernelError::WrongDevice { op, arg, expected: Device::Cpu, got: device }),
        }
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    pub(crate) fn cuda_f32(
        &self,
        op: &'static str,
        arg: &'static str,
        ordinal: usize,
    ) -> Result<&crate::cuda::CudaSlice<f32>> {
        match &self.data {
            Data::CudaF32(s, n) if *n == ordinal => Ok(s),
            _ => Err(self.wrong(op, arg, Device::Cuda(ordinal))),
        }
    }

    pub(crate) fn cuda_f32_mut(
        &mut self,
        op: &'static str,
        arg: &'static str,
        ordinal: usize,
    ) -> Result<&mut crate::cuda::CudaSlice<f32>> {
        if !matches!(self.data, Data::CudaF32(_, n) if n == ordinal) {
            return Err(self.wrong(op, arg, Device::Cuda(ordinal)));
        }
        match &mut self.data {
            Data::CudaF32(s, _) => Ok(s),
            _ => unreachable!("checked above"),
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor(f32 {} on {})", self.shape(), self.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert!(Tensor::host(2, 3, vec![0.0; 5]).is_err());
        let t = Tensor::host(2, 3, vec![0.0; 6]).unwrap();
        assert!(t.expect("op", "x", 2, 3).is_ok());
        let e = t.expect("op", "x", 3, 2).unwrap_err().to_string();
        assert_eq!(e, "op: `x` has shape [2, 3], expected [3, 2]");
        let t = t.reshape(3, 2).unwrap();
        assert!(t.reshape(4, 2).is_err());
    }
}
