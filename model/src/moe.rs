//! Mixture-of-experts blocks, split as the cluster splits them: the gate turns hidden states
//! into `(token, expert, weight)` assignments ([`route`]); the experts take activations plus
//! assignments and return the weighted sum per token ([`ExpertLayer::run`]) and never see
//! the gate. In one process both run here; in a cluster the router runs the gate and expert
//! nodes run the experts — the same [`ExpertLayer`] code, on whichever backend they use.
//!
//! An expert layer runs every routed expert once over all of its rows: rows are grouped by
//! expert ([`Grouping`]), each projection is one grouped product over every expert's rows,
//! and the outputs are summed back per token in expert order (the order transformers adds
//! them).

use switchyard_kernels::backend::{Combine, Grouped, TopK};
use switchyard_kernels::cpu::activation;
use switchyard_kernels::cpu::routing::{self, GroupScore};
use switchyard_kernels::{Backend, Tensor, Weight};

use crate::config::{ExpertActivation, GroupScoring, Routing};
use crate::error::{ModelError, Result};
use crate::layers::{Exec, Mlp};

/// Where a MoE layer's experts run: in this process (the model's own [`ExpertLayer`]s) or on
/// expert nodes (the router's dispatcher). The forward pass hands over the gate's decisions
/// and gets back the weighted sums; it never sees where the experts live.
pub trait Experts: Send + Sync {
    /// Returns, per row of `x` (on `exec`'s backend), the weighted sum of the outputs of the
    /// experts `assignments` routes it to in MoE layer `layer`, on the same backend.
    fn run(&self, exec: &Exec, layer: usize, x: &Tensor, assignments: &[Assignment]) -> Result<Tensor>;
}

/// One routing decision: token `token` (row of the batch) goes to `expert` with `weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// One expert's feed-forward weights.
#[derive(Clone, Debug)]
pub enum Expert {
    /// Separate gate and up projections, SwiGLU.
    SwiGlu { gate: Weight, up: Weight, down: Weight },
    /// gpt-oss: one projection to interleaved `[g0, u0, g1, u1, ...]` (with biases), then the
    /// clamped SwiGLU.
    Interleaved { gate_up: Weight, down: Weight },
}

impl Expert {
    /// The projections in the order [`ExpertLayer`] groups them.
    fn projections(&self) -> Vec<&Weight> {
        match self {
            Expert::SwiGlu { gate, up, down } => vec![gate, up, down],
            Expert::Interleaved { gate_up, down } => vec![gate_up, down],
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.projections().iter().map(|w| w.size_in_bytes()).sum()
    }

    /// A copy on `backend` (on the CPU: the same bytes, shared).
    pub fn upload(&self, backend: &dyn Backend) -> Result<Expert> {
        let up = |w: &Weight| backend.upload_weight(w);
        Ok(match self {
            Expert::SwiGlu { gate, up: u, down } => Expert::SwiGlu { gate: up(gate)?, up: up(u)?, down: up(down)? },
            Expert::Interleaved { gate_up, down } => Expert::Interleaved { gate_up: up(gate_up)?, down: up(down)? },
        })
    }
}

/// The experts of one MoE layer held here, by expert id (`None`: not held), and their
/// projections grouped for the products.
pub struct ExpertLayer {
    activation: ExpertActivation,
    slots: Vec<Option<Expert>>,
    /// Per projection (SwiGLU: gate, up, down; interleaved: gate_up, down), every slot.
    grouped: Vec<Grouped>,
}

impl ExpertLayer {
    /// A layer of `slots` (their weights on `backend`).
    pub fn new(backend: &dyn Backend, activation: ExpertActivation, slots: Vec<Option<Expert>>) -> Result<Self> {
        let mut layer = ExpertLayer { activation, slots, grouped: Vec::new() };
        layer.regroup(backend)?;
        Ok(layer)
    }

    fn projections(&self) -> usize {
        match self.activation {
            ExpertActivation::SwiGlu => 3,
            ExpertActivation::ClampedSwiGlu { .. } => 2,
        }
    }

    /// Rebuilds the grouped projections from the slots.
    fn regroup(&mut self, backend: &dyn Backend) -> Result<()> {
        let n = self.projections();
        if let Some(e) = self.slots.iter().flatten().find(|e| e.projections().len() != n) {
            return Err(ModelError::InvalidRequest(format!(
                "an expert with {} projections in a layer of {n}-projection experts",
                e.projections().len()
            )));
        }
        self.grouped = (0..n)
            .map(|p| {
                let slots = self.slots.iter().map(|s| s.as_ref().map(|e| e.projections()[p].clone())).collect();
                backend.group(slots)
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(())
    }

    /// Puts `expert` in `slot` (`None` frees it), then regroups. The tables are rebuilt once
    /// per call: pass every change of a placement together.
    pub fn update(&mut self, backend: &dyn Backend, changes: Vec<(usize, Option<Expert>)>) -> Result<()> {
        for (slot, expert) in changes {
            let n = self.slots.len();
            *self.slots.get_mut(slot).ok_or_else(|| {
                ModelError::InvalidRequest(format!("expert {slot} does not exist: the layer has {n} experts"))
            })? = expert;
        }
        self.regroup(backend)
    }

    /// Experts per layer of the model (held or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn is_held(&self, expert: usize) -> bool {
        self.slots.get(expert).is_some_and(Option::is_some)
    }

    /// The ids of the experts held.
    pub fn held(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(e, _)| e)
    }

    /// Bytes of the experts held.
    pub fn size_in_bytes(&self) -> usize {
        self.slots.iter().flatten().map(Expert::size_in_bytes).sum()
    }

    /// Per row of `x`, the weighted sum of the outputs of the experts `assignments` routes it
    /// to. An assignment to an expert not held here is [`ModelError::ExpertUnavailable`].
    pub fn run(&self, exec: &Exec, layer: usize, x: &Tensor, assignments: &[Assignment]) -> Result<Tensor> {
        let ops = exec.ops();
        let g = Grouping::new(assignments, self.slots.len(), x.rows()).map_err(|e| match e {
            GroupingError::Expert(expert) => ModelError::ExpertUnavailable {
                layer,
                expert: expert as usize,
                reason: "the model has no such expert".into(),
            },
            GroupingError::Token(token) => ModelError::InvalidRequest(format!(
                "an assignment names token row {token} but there are {} rows",
                x.rows()
            )),
        })?;
        if let Some(e) = g.counts.iter().enumerate().position(|(e, &c)| c > 0 && !self.is_held(e)) {
            return Err(ModelError::ExpertUnavailable { layer, expert: e, reason: "not held here".into() });
        }
        if g.perm.is_empty() {
            return Ok(ops.zeros(x.rows(), x.cols())?);
        }
        for (slot, _) in self.slots.iter().zip(&g.counts).filter(|(_, c)| **c > 0) {
            exec.add(slot.as_ref().map_or(0, Expert::size_in_bytes));
        }
        let project = |p: usize, input: &Tensor| ops.grouped_linear(input, &self.grouped[p], &g.counts, exec.precision);
        let rows = ops.gather_rows(x, &g.perm)?;
        let y = match self.activation {
            ExpertActivation::SwiGlu => {
                let act = ops.swiglu(&project(0, &rows)?, &project(1, &rows)?)?;
                project(2, &act)?
            }
            ExpertActivation::ClampedSwiGlu { alpha, limit } => {
                let act = ops.clamped_swiglu(&project(0, &rows)?, alpha, limit)?;
                project(1, &act)?
            }
        };
        Ok(ops.combine_rows(&y, &g.combine)?)
    }
}

/// A layer's routed rows grouped by expert: the row order of the grouped products, and how
/// their outputs sum back into token rows.
#[derive(Debug, PartialEq)]
pub struct Grouping {
    /// Rows per expert, in expert order.
    pub counts: Vec<usize>,
    /// The token row of each grouped row (expert by expert; within an expert, in order).
    pub perm: Vec<u32>,
    /// Per token, its grouped rows and weights, in expert order.
    pub combine: Combine,
}

#[derive(Debug, PartialEq)]
pub enum GroupingError {
    /// An expert id beyond the layer's experts.
    Expert(u32),
    /// A token row beyond the batch.
    Token(u32),
}

impl Grouping {
    /// Groups `assignments` over `experts` experts and `tokens` rows.
    pub fn new(assignments: &[Assignment], experts: usize, tokens: usize) -> Result<Self, GroupingError> {
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); experts];
        for a in assignments {
            if a.token as usize >= tokens {
                return Err(GroupingError::Token(a.token));
            }
            by_expert.get_mut(a.expert as usize).ok_or(GroupingError::Expert(a.expert))?.push((a.token, a.weight));
        }
        let counts = by_expert.iter().map(Vec::len).collect();
        let perm = by_expert.iter().flatten().map(|&(t, _)| t).collect();
        let mut per_token: Vec<Vec<(u32, f32)>> = vec![Vec::new(); tokens];
        for (row, &(t, w)) in by_expert.iter().flatten().enumerate() {
            per_token[t as usize].push((row as u32, w));
        }
        let mut combine = Combine { start: Vec::with_capacity(tokens + 1), ..Default::default() };
        combine.start.push(0);
        for entries in &per_token {
            combine.src.extend(entries.iter().map(|e| e.0));
            combine.weight.extend(entries.iter().map(|e| e.1));
            combine.start.push(combine.src.len() as u32);
        }
        Ok(Grouping { counts, perm, combine })
    }
}

/// Runs the gate over the rows of `h`: the top-k experts of each token and their weights,
/// token-major, each token's experts best first. `choice_bias` (DeepSeek-V3's
/// `e_score_correction_bias`) is added to the scores for choosing only.
pub fn route(
    exec: &Exec,
    gate: &Weight,
    (routing, choice_bias): (Routing, Option<&[f32]>),
    top_k: usize,
    h: &Tensor,
) -> Result<Vec<Assignment>> {
    let logits = exec.linear(h, gate)?;
    let picked = match routing.gate() {
        Some(kernel) => exec.ops().top_k_gate(&logits, top_k, kernel)?,
        None => group_limited(&exec.ops().download(&logits)?, logits.cols(), routing, choice_bias, top_k)?,
    };
    Ok(picked
        .ids
        .iter()
        .zip(&picked.weights)
        .enumerate()
        .map(|(i, (&expert, &weight))| Assignment { token: (i / top_k) as u32, expert, weight })
        .collect())
}

/// DeepSeek's routing of rows of gate `logits` (`experts` each), on the host: a few hundred
/// values per token.
fn group_limited(logits: &[f32], experts: usize, routing: Routing, bias: Option<&[f32]>, k: usize) -> Result<TopK> {
    let Routing::GroupLimited { scoring, groups, topk_group, renormalize, scale } = routing else {
        unreachable!("only group-limited routing runs on the host")
    };
    if bias.is_some_and(|b| b.len() != experts) {
        return Err(ModelError::InvalidRequest(format!("a choice bias for other than {experts} experts")));
    }
    let mut out = TopK { k, ids: Vec::with_capacity(logits.len() / experts * k), weights: Vec::new() };
    let group_score = match scoring {
        GroupScoring::Sigmoid => GroupScore::TopTwoSum,
        GroupScoring::Softmax => GroupScore::Max,
    };
    let (mut scores, mut choice) = (vec![0.0f32; experts], vec![0.0f32; experts]);
    for row in logits.chunks_exact(experts) {
        match scoring {
            GroupScoring::Sigmoid => scores.iter_mut().zip(row).for_each(|(s, &x)| *s = activation::sigmoid(x)),
            GroupScoring::Softmax => {
                scores.copy_from_slice(row);
                routing::softmax(&mut scores);
            }
        }
        match bias {
            Some(b) => choice.iter_mut().zip(scores.iter().zip(b)).for_each(|(c, (s, b))| *c = s + b),
            None => choice.copy_from_slice(&scores),
        }
        let picked = routing::group_limited(&choice, groups, topk_group, group_score, k);
        let sum: f32 = if renormalize { picked.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20 } else { 1.0 };
        out.ids.extend(picked.iter().map(|&e| e as u32));
        out.weights.extend(picked.iter().map(|&e| scores[e] / sum * scale));
    }
    Ok(out)
}

/// A MoE feed-forward block: gate, experts, and an optional shared expert.
pub struct MoeBlock {
    pub gate: Weight,
    pub routing: Routing,
    /// Added to the gate's scores for choosing experts only (DeepSeek-V3).
    pub choice_bias: Option<Vec<f32>>,
    pub top_k: usize,
    pub experts: ExpertLayer,
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// The block over the rows of `h`, with its experts run by `remote` where given (else the
    /// ones held here).
    pub fn forward(&self, exec: &Exec, layer: usize, h: &Tensor, remote: Option<&dyn Experts>) -> Result<Tensor> {
        let assignments = route(exec, &self.gate, (self.routing, self.choice_bias.as_deref()), self.top_k, h)?;
        let mut y = match remote {
            Some(experts) => experts.run(exec, layer, h, &assignments)?,
            None => self.experts.run(exec, layer, h, &assignments)?,
        };
        if let Some(shared) = &self.shared {
            exec.ops().add(&mut y, &shared.forward(exec, h)?)?;
        }
        Ok(y)
    }

    /// Bytes of the gate, the experts held and the shared expert.
    pub fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes()
            + self.experts.size_in_bytes()
            + self
                .shared
                .as_ref()
                .map_or(0, |s| s.mlp.size_in_bytes() + s.gate.as_ref().map_or(0, Weight::size_in_bytes))
    }
}

/// A shared expert: every token goes through it, scaled by `σ(gate · x)` where it has a gate
/// (Qwen2-MoE; DeepSeek's has none).
pub struct SharedExpert {
    pub mlp: Mlp,
    pub gate: Option<Weight>,
}

impl SharedExpert {
    pub fn forward(&self, exec: &Exec, h: &Tensor) -> Result<Tensor> {
        let mut y = self.mlp.forward(exec, h)?;
        if let Some(gate) = &self.gate {
            let g = exec.linear(h, gate)?;
            exec.ops().scale_rows_sigmoid(&mut y, &g)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_orders_rows_by_expert_and_sums_in_expert_order() {
        let a = |token, expert, weight| Assignment { token, expert, weight };
        let g = Grouping::new(&[a(0, 2, 0.7), a(0, 0, 0.3), a(1, 2, 1.0)], 3, 2).unwrap();
        assert_eq!(g.counts, vec![1, 0, 2]);
        assert_eq!(g.perm, vec![0, 0, 1]);
        // Token 0: expert 0's row (0) first, then expert 2's (1); token 1: expert 2's row 2.
        assert_eq!(g.combine, Combine { start: vec![0, 2, 3], src: vec![0, 1, 2], weight: vec![0.3, 0.7, 1.0] });
        assert_eq!(Grouping::new(&[a(0, 3, 1.0)], 3, 2), Err(GroupingError::Expert(3)));
        assert_eq!(Grouping::new(&[a(2, 0, 1.0)], 3, 2), Err(GroupingError::Token(2)));
    }
}
