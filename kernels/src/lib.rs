//! Compute backends for Switchyard.
//!
//! The model code calls these kernels with plain slices: activations are always `f32`,
//! weights are borrowed in their checkpoint dtype ([`Weights`]) and converted on the fly,
//! so a bf16 checkpoint stays bf16 in memory while every sum accumulates in `f32`.
//!
//! # Layout
//! - [`dtype`]: the weight dtypes and [`Weights`], a typed borrowed matrix.
//! - [`device`]: [`Device`] parsing (`cpu`, `cuda:N`) and what this build supports.
//! - [`cpu`]: the CPU backend: linear layers, norms, RoPE, attention, routing, activations.
//! - `cuda` (feature `cuda`): the CUDA backend: device memory, cuBLAS, NVRTC-compiled kernels.
//! - [`error`]: the error type, [`KernelError`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;

pub use device::Device;
pub use dtype::{DType, Weights};
pub use error::KernelError;
