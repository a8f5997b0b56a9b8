//! [`ExpertStore`]: the experts placed on this node, and the checks and compute of one
//! dispatch. Synchronous; it runs on the compute thread.

use std::path::Path;

use rayon::prelude::*;
use switchyard_model::layers::Exec;
use switchyard_model::loader::{ExpertWeights, load_experts};
use switchyard_model::moe::{Assignment, run_experts};
use switchyard_model::{Arch, ModelSpec};
use switchyard_proto::tensor;
use switchyard_proto::v1::{DispatchRequest, ExpertId, Tensor};

use crate::error::NodeError;
use crate::placement::ExpertSet;

pub struct ExpertStore {
    weights: ExpertWeights,
    exec: Exec,
    held: Vec<ExpertId>,
    bytes: usize,
}

impl ExpertStore {
    /// Maps the experts of `set` from the checkpoint in `dir`, refuses the placement if they
    /// exceed `budget` bytes, then reads them into memory so the first dispatch does not page
    /// them in.
    pub fn load(
        dir: &Path,
        set: &ExpertSet,
        budget: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, NodeError> {
        let spec = ModelSpec::from_dir(dir)?;
        set.validate(spec.num_layers, spec.num_experts).map_err(NodeError::Placement)?;
        let weights = load_experts(dir, &|l, e| set.contains(l, e), progress)?;
        let held: Vec<ExpertId> = weights
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, experts)| {
                experts
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.is_some())
                    .map(move |(e, _)| ExpertId { layer: l as u32, expert: e as u32 })
            })
            .collect();
        if held.is_empty() {
            return Err(NodeError::EmptyPlacement);
        }
        let bytes = weights.bytes();
        if let Some(budget) = budget
            && bytes > budget
        {
            return Err(NodeError::OverBudget { needed: bytes, budget, experts: held.len() });
        }
        let store = ExpertStore { weights, exec: Exec::default(), held, bytes };
        store.page_in();
        Ok(store)
    }

    /// Runs every held expert once over a zero row: reads all of their weights.
    fn page_in(&self) {
        let zeros = vec![0.0f32; self.spec().hidden_size];
        self.weights.layers.par_iter().flatten().flatten().for_each(|x| {
            x.forward(&zeros, 1, &self.exec);
        });
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.weights.spec
    }

    pub fn model_type(&self) -> &'static str {
        let arch: Arch = self.spec().arch;
        arch.model_type()
    }

    pub fn held(&self) -> &[ExpertId] {
        &self.held
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Checks `req` and returns, per activation row, the weighted sum of the outputs of the
    /// experts routed to it.
    pub fn dispatch(&self, req: &DispatchRequest) -> Result<Tensor, NodeError> {
        let spec = self.spec();
        let (id, layer) = (req.id, req.layer);
        let experts = self.weights.layers.get(layer as usize).ok_or(NodeError::UnknownLayer {
            id,
            layer,
            layers: spec.num_layers,
        })?;
        if experts.is_empty() {
            return Err(NodeError::DenseLayer { id, layer });
        }
        let hidden = spec.hidden_size;
        let (x, rows) = tensor::to_f32(req.activations.as_ref(), "activations", hidden)
            .map_err(|source| NodeError::BadTensor { id, source })?;
        let n = req.tokens.len();
        if req.experts.len() != n || req.weights.len() != n {
            let message = format!(
                "routes have {n} tokens, {} experts and {} weights; the three lists must be equally long",
                req.experts.len(),
                req.weights.len()
            );
            return Err(NodeError::BadRoutes { id, message });
        }
        let mut assignments = Vec::with_capacity(n);
        for ((&token, &expert), &weight) in req.tokens.iter().zip(&req.experts).zip(&req.weights) {
            if token as usize >= rows {
                let message = format!("route names token row {token} but the activations have {rows} rows");
                return Err(NodeError::BadRoutes { id, message });
            }
            if expert as usize >= experts.len() {
                let message = format!("expert {expert} does not exist: the model has {} experts", experts.len());
                return Err(NodeError::BadRoutes { id, message });
            }
            if !weight.is_finite() {
                let message = format!("route weight {weight} of token row {token} is not finite");
                return Err(NodeError::BadRoutes { id, message });
            }
            if experts[expert as usize].is_none() {
                return Err(NodeError::NotHeld { id, layer, expert, epoch: req.epoch });
            }
            assignments.push(Assignment { token, expert, weight });
        }
        let out = run_experts(experts, &x, hidden, &assignments, &self.exec).expect("every routed expert is held");
        Ok(tensor::from_f32(&out, hidden))
    }
}
