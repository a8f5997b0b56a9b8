//! Errors raised by the kernels crate.

/// What a kernel call or a device request could not do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The device string could not be parsed.
    #[error("unknown device `{0}`: expected `cpu` or `cuda:N`")]
    UnknownDevice(String),
    /// The device exists as a name but this build has no backend for it.
    #[error("device `{0}` is not available: this build has no CUDA backend (build with `--features cuda`)")]
    NotCompiledWithCuda(String),
    /// This build has the CUDA backend, but the machine lacks CUDA or the device.
    #[error("no CUDA on this machine: {0}")]
    NoCuda(String),
    /// A CUDA driver, cuBLAS or launch error.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// NVRTC rejected a kernel source.
    #[error("compiling {file} with NVRTC failed:\n{log}")]
    KernelCompile { file: &'static str, log: String },
}
