//! Errors raised by the kernels crate. Every variant names the operation and the argument
//! that was wrong, so a caller can tell a bad request from a broken device.

use crate::Device;

/// What a kernel call or a device request could not do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The device string could not be parsed.
    #[error("unknown device `{0}`: expected `cpu` or `cuda:N`")]
    UnknownDevice(String),
    /// The device exists as a name but this build has no backend for it.
    #[error("device `{device}` is not available: this build has no CUDA backend (build with `--features cuda`)")]
    NotCompiledWithCuda { device: String },
    /// This build has the CUDA backend, but the machine lacks CUDA or the device.
    #[error("no CUDA on this machine: {0}")]
    NoCuda(String),
    /// An argument's shape does not fit the operation.
    #[error("{op}: `{arg}` has shape {got}, expected {expected}")]
    Shape { op: &'static str, arg: &'static str, expected: String, got: String },
    /// An argument lives on another device than the backend running the operation.
    #[error("{op}: `{arg}` is in {got} memory but the operation runs on {expected}")]
    WrongDevice { op: &'static str, arg: &'static str, expected: Device, got: Device },
    /// An index argument points outside what it indexes.
    #[error("{op}: {message}")]
    OutOfRange { op: &'static str, message: String },
    /// The operation cannot take this model's shape on this backend.
    #[error("{op}: {message}")]
    Unsupported { op: &'static str, message: String },
    /// The device has not enough free memory for an allocation.
    #[error("{op}: out of memory on {device} allocating {bytes} bytes")]
    OutOfMemory { op: &'static str, device: Device, bytes: usize },
    /// A CUDA driver, cuBLAS or launch error.
    #[error("CUDA: {op}: {message}")]
    Cuda { op: &'static str, message: String },
    /// NVRTC rejected a kernel source.
    #[error("compiling {file} with NVRTC failed:\n{log}")]
    KernelCompile { file: &'static str, log: String },
}

impl KernelError {
    /// Whether the error says the device ran out of memory (another replica may have room).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, KernelError::OutOfMemory { .. })
    }

    /// Whether the device itself failed (a driver or launch error): what it computes can no
    /// longer be trusted and the process should stop serving.
    pub fn is_device_fault(&self) -> bool {
        matches!(self, KernelError::Cuda { .. })
    }

    pub(crate) fn shape(op: &'static str, arg: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        KernelError::Shape { op, arg, expected: expected.to_string(), got: got.to_string() }
    }
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;
