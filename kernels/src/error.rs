//! Errors raised by the kernels crate.

/// What a kernel call or a device request could not do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The device string could not be parsed.
    #[error("unknown device `{0}`: expected `cpu` or `cuda:N`")]
    UnknownDevice(String),
    /// The device exists as a name but this build has no backend for it.
    #[error("device `{0}` is not available: the CUDA backend is not part of this build")]
    NotCompiledWithCuda(String),
}
