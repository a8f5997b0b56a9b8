//! Compute backends for Switchyard.
//!
//! The model is written once against the [`Backend`] trait: the operations of a forward pass
//! over [`Tensor`]s (`f32` activations on one device, carrying their shape) and [`Weight`]s (a matrix's bytes, its storage [`Format`] and shape, and a bias).
//! [`open`] gives the backend of a [`Device`]: [`CpuBackend`] (host memory), or
//! [`CudaBackend`] (feature `cuda`; without it, a stub that cannot be opened). Activations
//! are always `f32`; weights keep their checkpoint format and are widened on the fly, so a
//! bf16 checkpoint stays bf16 in memory while every sum accumulates in `f32`.
//!
//! # Layout
//! - [`backend`]: the [`Backend`] trait, its CPU and CUDA implementations, and the data its
//!   operations take (gates, grouped expert weights, the paged KV cache's batches).
//! - [`tensor`]: the [`Tensor`] type.
//! - [`weight`]: [`Weight`], [`Format`], [`HostBytes`].
//! - [`dtype`]: checkpoint element types and [`Weights`], a typed borrowed host matrix.
//! - [`quant`]: the MXFP4 and FP8 formats: decoding, and quantizers for tests.
//! - [`device`]: [`Device`] names (`cpu`, `cuda:N`) and what this build supports.
//! - [`cpu`]: the CPU kernels on plain slices: products, norms, RoPE, attention, routing.
//! - `cuda` (feature `cuda`): the CUDA kernels: device memory, cuBLAS, NVRTC-compiled sources.
//! - [`error`]: the error type, [`KernelError`].

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod quant;
pub mod tensor;
pub mod weight;

pub use backend::{Backend, CpuBackend, CudaBackend, open};
pub use device::Device;
pub use dtype::{DType, Weights};
pub use error::KernelError;
pub use tensor::Tensor;
pub use weight::{Format, HostBytes, Weight};
