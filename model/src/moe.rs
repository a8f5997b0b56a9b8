//! Mixture-of-experts blocks, split as the cluster splits them: the router (gate) turns
//! hidden states into `(token, expert, weight)` assignments ([`route`]); the experts take
//! activations plus assignments and return the weighted sum per token ([`run_experts`]) and
//! never see the gate. In one process both run here; in a cluster the router runs the gate
//! and expert nodes run the experts.

use rayon::prelude::*;
use switchyard_kernels::cpu::{activation, routing};

use crate::config::{ExpertActivation, Routing};
use crate::error::{ModelError, Result};
use crate::layers::{Exec, Linear, SwiGluMlp};

/// Where a MoE layer's experts run: in this process ([`LocalExperts`]) or on expert nodes
/// (the router's dispatcher). The forward pass hands over the gate's decisions and gets back
/// the weighted sums; it never sees where the experts live.
pub trait Experts: Send + Sync {
    /// Returns, per row of `x` (`hidden` wide), the weighted sum of the outputs of the experts
    /// `assignments` routes it to in MoE layer `layer`.
    fn run(&self, layer: usize, x: &[f32], hidden: usize, assignments: &[Assignment]) -> Result<Vec<f32>>;
}

/// The experts loaded in this process, per layer (`None` where not held; dense layers have
/// none).
pub struct LocalExperts<'a> {
    pub layers: Vec<&'a [Option<Expert>]>,
    pub exec: &'a Exec,
}

impl Experts for LocalExperts<'_> {
    fn run(&self, layer: usize, x: &[f32], hidden: usize, assignments: &[Assignment]) -> Result<Vec<f32>> {
        let experts = self.layers.get(layer).copied().unwrap_or_default();
        run_experts(experts, x, hidden, assignments, self.exec).map_err(|expert| ModelError::ExpertUnavailable {
            layer,
            expert: expert as usize,
            reason: "not loaded in this process".into(),
        })
    }
}

/// One expert's feed-forward.
#[derive(Clone, Debug)]
pub enum Expert {
    /// Separate gate and up projections, SwiGLU.
    SwiGlu(SwiGluMlp),
    /// gpt-oss: one projection to interleaved `[g0, u0, g1, u1, ...]`, biases, clamped SwiGLU.
    Interleaved { gate_up: Linear, down: Linear, alpha: f32, limit: f32 },
}

impl Expert {
    /// Runs the expert over `m` rows of `x` (all tokens routed to it, as one matmul each).
    pub fn forward(&self, x: &[f32], m: usize, exec: &Exec) -> Vec<f32> {
        match self {
            Expert::SwiGlu(mlp) => mlp.forward(x, m, exec),
            Expert::Interleaved { gate_up, down, alpha, limit } => {
                let gu = gate_up.forward(x, m, exec);
                let mut act = vec![0.0; gu.len() / 2];
                activation::clamped_swiglu_interleaved(&gu, *alpha, *limit, &mut act);
                down.forward(&act, m, exec)
            }
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Expert::SwiGlu(mlp) => mlp.size_in_bytes(),
            Expert::Interleaved { gate_up, down, .. } => gate_up.size_in_bytes() + down.size_in_bytes(),
        }
    }

    pub fn activation(&self) -> ExpertActivation {
        match self {
            Expert::SwiGlu(_) => ExpertActivation::SwiGlu,
            Expert::Interleaved { alpha, limit, .. } => {
                ExpertActivation::ClampedSwiGlu { alpha: *alpha, limit: *limit }
            }
        }
    }
}

/// One routing decision: token `token` (row of the batch) goes to `expert` with `weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// Runs the gate over `m` rows of `h`: the top-k experts of each token and their weights,
/// token-major, each token's experts best first.
pub fn route(gate: &Linear, routing: Routing, top_k: usize, h: &[f32], m: usize, exec: &Exec) -> Vec<Assignment> {
    let logits = gate.forward(h, m, exec);
    let e = gate.out_features();
    let mut out = Vec::with_capacity(m * top_k);
    for (t, row) in logits.chunks_exact(e).enumerate() {
        match routing {
            Routing::SoftmaxTopK { renormalize } => {
                let mut probs = row.to_vec();
                routing::softmax(&mut probs);
                let idx = routing::top_k(&probs, top_k);
                let sum: f32 = if renormalize { idx.iter().map(|&i| probs[i]).sum() } else { 1.0 };
                out.extend(idx.iter().map(|&i| Assignment {
                    token: t as u32,
                    expert: i as u32,
                    weight: probs[i] / sum,
                }));
            }
            Routing::TopKSoftmax => {
                let idx = routing::top_k(row, top_k);
                let mut vals: Vec<f32> = idx.iter().map(|&i| row[i]).collect();
                routing::softmax(&mut vals);
                out.extend(idx.iter().zip(vals).map(|(&i, w)| Assignment {
                    token: t as u32,
                    expert: i as u32,
                    weight: w,
                }));
            }
        }
    }
    out
}

/// Runs the experts of `assignments` over the rows of `x` (`hidden` wide) and returns, per
/// row, the weighted sum of its experts' outputs. `experts[e]` is `None` for an expert this
/// process does not hold; assigning a token to it is an error the caller must prevent.
///
/// Every expert runs once, over all rows routed to it; experts run in parallel and their
/// outputs are added in expert order (the order transformers adds them).
pub fn run_experts(
    experts: &[Option<Expert>],
    x: &[f32],
    hidden: usize,
    assignments: &[Assignment],
    exec: &Exec,
) -> Result<Vec<f32>, u32> {
    let rows = x.len() / hidden;
    let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); experts.len()];
    for a in assignments {
        let list = by_expert.get_mut(a.expert as usize).ok_or(a.expert)?;
        list.push((a.token, a.weight));
    }
    let hit: Vec<usize> = (0..experts.len()).filter(|&e| !by_expert[e].is_empty()).collect();
    if let Some(&missing) = hit.iter().find(|&&e| experts[e].is_none()) {
        return Err(missing as u32);
    }
    let outputs: Vec<Vec<f32>> = hit
        .par_iter()
        .map(|&e| {
            let list = &by_expert[e];
            let mut gathered = Vec::with_capacity(list.len() * hidden);
            for &(t, _) in list {
                gathered.extend_from_slice(&x[t as usize * hidden..(t as usize + 1) * hidden]);
            }
            experts[e].as_ref().expect("checked above").forward(&gathered, list.len(), exec)
        })
        .collect();
    let mut out = vec![0.0f32; rows * hidden];
    for (&e, y) in hit.iter().zip(&outputs) {
        for (&(t, w), row) in by_expert[e].iter().zip(y.chunks_exact(hidden)) {
            let dst = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
            for (d, &v) in dst.iter_mut().zip(row) {
                *d += v * w;
            }
        }
    }
    Ok(out)
}

/// A MoE feed-forward block: gate, experts, and Qwen2-MoE's optional shared expert.
#[derive(Clone, Debug)]
pub struct MoeBlock {
    pub gate: Linear,
    pub routing: Routing,
    pub top_k: usize,
    pub experts: Vec<Option<Expert>>,
    pub shared: Option<SharedExpert>,
}

/// Qwen2-MoE's shared expert: every token goes through it, scaled by `σ(gate · x)`.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub mlp: SwiGluMlp,
    pub gate: Linear,
}

impl SharedExpert {
    pub fn forward(&self, h: &[f32], m: usize, exec: &Exec) -> Vec<f32> {
        let mut y = self.mlp.forward(h, m, exec);
        let g = self.gate.forward(h, m, exec);
        let hidden = y.len() / m.max(1);
        for (row, &g) in y.chunks_exact_mut(hidden).zip(&g) {
            let s = activation::sigmoid(g);
            row.iter_mut().for_each(|v| *v *= s);
        }
        y
    }
}
