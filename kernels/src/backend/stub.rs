//! [`CudaBackend`] in a build without the `cuda` feature: it cannot be opened, and every
//! operation returns [`KernelError::NotCompiledWithCuda`], so code that names it builds and
//! runs everywhere.

use super::{Attention, Backend, Combine, Gate, Grouped, KvBatch, KvLayout, Mla, SeqSpan, TopK};
use crate::cpu::Precision;
use crate::error::{KernelError, Result};
use crate::{Device, Tensor, Weight};

/// A CUDA device; this build has no CUDA backend.
#[derive(Debug)]
pub struct CudaBackend {
    ordinal: usize,
}

impl CudaBackend {
    /// Always fails: this build was made without the `cuda` feature.
    pub fn open(ordinal: usize) -> Result<Self> {
        Err(CudaBackend { ordinal }.missing())
    }

    fn missing(&self) -> KernelError {
        KernelError::NotCompiledWithCuda { device: Device::Cuda(self.ordinal).to_string() }
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn describe(&self) -> String {
        format!("{} (not compiled in)", self.device())
    }

    fn upload(&self, _: &[f32], _: usize, _: usize) -> Result<Tensor> {
        Err(self.missing())
    }

    fn zeros(&self, _: usize, _: usize) -> Result<Tensor> {
        Err(self.missing())
    }

    fn download(&self, _: &Tensor) -> Result<Vec<f32>> {
        Err(self.missing())
    }

    fn upload_weight(&self, _: &Weight) -> Result<Weight> {
        Err(self.missing())
    }

    fn memory(&self) -> Result<Option<(usize, usize)>> {
        Err(self.missing())
    }

    fn read_bandwidth(&self, _: usize, _: usize) -> Result<f64> {
        Err(self.missing())
    }

    fn embed(&self, _: &Weight, _: &[u32]) -> Result<Tensor> {
        Err(self.missing())
    }

    fn linear(&self, _: &Tensor, _: &Weight, _: Precision) -> Result<Tensor> {
        Err(self.missing())
    }

    fn rms_norm(&self, _: &Tensor, _: &Tensor, _: f32) -> Result<Tensor> {
        Err(self.missing())
    }

    fn rms_norm_inplace(&self, _: &mut Tensor, _: &Tensor, _: f32) -> Result<()> {
        Err(self.missing())
    }

    fn rope(&self, _: &mut Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Err(self.missing())
    }

    fn clip(&self, _: &mut Tensor, _: f32) -> Result<()> {
        Err(self.missing())
    }

    fn add(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        Err(self.missing())
    }

    fn swiglu(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        Err(self.missing())
    }

    fn clamped_swiglu(&self, _: &Tensor, _: f32, _: f32) -> Result<Tensor> {
        Err(self.missing())
    }

    fn scale_rows_sigmoid(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        Err(self.missing())
    }

    fn gather_rows(&self, _: &Tensor, _: &[u32]) -> Result<Tensor> {
        Err(self.missing())
    }

    fn top_k_gate(&self, _: &Tensor, _: usize, _: Gate) -> Result<TopK> {
        Err(self.missing())
    }

    fn group(&self, _: Vec<Option<Weight>>) -> Result<Grouped> {
        Err(self.missing())
    }

    fn grouped_linear(&self, _: &Tensor, _: &Grouped, _: &[usize], _: Precision) -> Result<Tensor> {
        Err(self.missing())
    }

    fn combine_rows(&self, _: &Tensor, _: &Combine) -> Result<Tensor> {
        Err(self.missing())
    }

    fn kv_arena(&self, _: KvLayout, _: usize) -> Result<Tensor> {
        Err(self.missing())
    }

    fn kv_batch(&self, _: KvLayout, _: &Tensor, _: &[SeqSpan<'_>]) -> Result<KvBatch> {
        Err(self.missing())
    }

    fn kv_write(&self, _: &mut Tensor, _: &KvBatch, _: usize, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(self.missing())
    }

    fn attention(&self, _: &Tensor, _: &Tensor, _: &KvBatch, _: Attention<'_>) -> Result<Tensor> {
        Err(self.missing())
    }

    fn mla_write(&self, _: &mut Tensor, _: &KvBatch, _: usize, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(self.missing())
    }

    fn mla_attention(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &KvBatch, _: Mla<'_>) -> Result<Tensor> {
        Err(self.missing())
    }

    fn non_finite_rows(&self, _: &Tensor) -> Result<Vec<u32>> {
        Err(self.missing())
    }

    fn greedy(&self, _: &Tensor) -> Result<Vec<(u32, f32)>> {
        Err(self.missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cannot_be_opened_and_says_why() {
        let e = CudaBackend::open(0).unwrap_err().to_string();
        assert!(e.contains("no CUDA backend (build with `--features cuda`)"), "{e}");
        let stub = CudaBackend { ordinal: 1 };
        assert!(matches!(stub.zeros(1, 1), Err(KernelError::NotCompiledWithCuda { .. })));
    }
}
