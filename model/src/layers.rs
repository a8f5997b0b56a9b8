//! The dense building blocks: linear layers, attention projections and the SwiGLU MLP.

use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard_kernels::cpu::{self, Precision, activation};

use crate::checkpoint::Tensor;

/// How a forward pass executes: the product [`Precision`], and a count of the weight bytes it
/// streams (the benchmark's bandwidth floor).
#[derive(Default, Debug)]
pub struct Exec {
    pub precision: Precision,
    streamed: AtomicUsize,
}

impl Exec {
    pub fn new(precision: Precision) -> Self {
        Exec { precision, streamed: AtomicUsize::new(0) }
    }

    pub fn add(&self, bytes: usize) {
        self.streamed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Weight bytes streamed since the last call.
    pub fn take(&self) -> usize {
        self.streamed.swap(0, Ordering::Relaxed)
    }
}

/// `y = x · Wᵀ + b` with `W` `[out, in]` in its checkpoint dtype.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias: bias.map(|b| b.to_f32_vec()) }
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// `m` rows of `x` → a new `[m, out]` buffer.
    pub fn forward(&self, x: &[f32], m: usize, exec: &Exec) -> Vec<f32> {
        let mut out = vec![0.0; m * self.out_features()];
        self.forward_into(x, m, &mut out, exec);
        out
    }

    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32], exec: &Exec) {
        let (n, k) = (self.out_features(), self.in_features());
        exec.add(self.weight.size_in_bytes());
        cpu::linear_with(x, self.weight.weights(), self.bias.as_deref(), out, [m, n, k], exec.precision);
    }

    pub fn size_in_bytes(&self) -> usize {
        self.weight.size_in_bytes()
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))` (dense layers, Qwen2-MoE's shared expert,
/// and the experts of every architecture but gpt-oss).
#[derive(Clone, Debug)]
pub struct SwiGluMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGluMlp {
    pub fn forward(&self, x: &[f32], m: usize, exec: &Exec) -> Vec<f32> {
        let gate = self.gate.forward(x, m, exec);
        let up = self.up.forward(x, m, exec);
        let mut act = vec![0.0; gate.len()];
        activation::swiglu(&gate, &up, &mut act);
        self.down.forward(&act, m, exec)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.up.size_in_bytes() + self.down.size_in_bytes()
    }
}

/// The attention block's weights.
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub sinks: Option<Vec<f32>>,
    pub sliding_window: Option<usize>,
}
