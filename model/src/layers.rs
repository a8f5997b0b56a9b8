//! The dense building blocks, on whatever backend the model runs on: [`Exec`] (the backend,
//! the product precision and a count of the weight bytes read), the SwiGLU [`Mlp`] and the
//! attention block's weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard_kernels::cpu::Precision;
use switchyard_kernels::{Backend, CpuBackend, Tensor, Weight};

use crate::error::Result;

/// How a forward pass executes: on which [`Backend`], at which product [`Precision`], and a
/// count of the weight bytes it streams (the benchmark's bandwidth floor).
pub struct Exec {
    pub backend: Arc<dyn Backend>,
    pub precision: Precision,
    streamed: AtomicUsize,
}

impl Exec {
    pub fn new(backend: Arc<dyn Backend>, precision: Precision) -> Self {
        Exec { backend, precision, streamed: AtomicUsize::new(0) }
    }

    /// Host memory, exact (`f32`) products.
    pub fn cpu() -> Self {
        Self::new(Arc::new(CpuBackend), Precision::F32)
    }

    /// The backend's operations.
    pub fn ops(&self) -> &dyn Backend {
        &*self.backend
    }

    /// `x · Wᵀ (+ bias)`, counting the weight's bytes.
    pub fn linear(&self, x: &Tensor, w: &Weight) -> Result<Tensor> {
        self.add(w.size_in_bytes());
        Ok(self.backend.linear(x, w, self.precision)?)
    }

    pub fn add(&self, bytes: usize) {
        self.streamed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Weight bytes streamed since the last call.
    pub fn take(&self) -> usize {
        self.streamed.swap(0, Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Exec({}, {:?})", self.backend.describe(), self.precision)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))` (dense layers and shared experts).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

impl Mlp {
    pub fn forward(&self, exec: &Exec, x: &Tensor) -> Result<Tensor> {
        let gate = exec.linear(x, &self.gate)?;
        let up = exec.linear(x, &self.up)?;
        let act = exec.ops().swiglu(&gate, &up)?;
        exec.linear(&act, &self.down)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.up.size_in_bytes() + self.down.size_in_bytes()
    }
}

/// The attention block's weights.
#[derive(Debug)]
pub struct AttentionWeights {
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub o: Weight,
    /// Per head (`head_dim` wide) or over the whole projection.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// One logit per query head (gpt-oss).
    pub sinks: Option<Tensor>,
    pub sliding_window: Option<usize>,
}

impl AttentionWeights {
    pub fn size_in_bytes(&self) -> usize {
        self.q.size_in_bytes() + self.k.size_in_bytes() + self.v.size_in_bytes() + self.o.size_in_bytes()
    }
}
