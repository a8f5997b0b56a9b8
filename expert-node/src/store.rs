//! [`ExpertStore`]: the experts placed on this node, and the checks and compute of one
//! dispatch. Synchronous; it runs on the compute thread.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use rayon::prelude::*;
use switchyard_kernels::Device;
use switchyard_model::layers::Exec;
use switchyard_model::loader::load_experts;
use switchyard_model::moe::Expert;
use switchyard_model::moe::{Assignment, run_experts};
use switchyard_model::{Arch, ModelSpec};
use switchyard_proto::tensor;
use switchyard_proto::v1::{DispatchRequest, ExpertId, Tensor};

use crate::error::NodeError;
use crate::placement::ExpertSet;

pub struct ExpertStore {
    dir: PathBuf,
    spec: ModelSpec,
    exec: Exec,
    budget: Option<usize>,
    /// Bytes of one expert's weights.
    expert_bytes: usize,
    /// Swapped whole when the placement changes; dispatches read it.
    held: RwLock<Held>,
    /// The GPU holding the experts (`--device cuda:N`); `None`: RAM.
    #[cfg(feature = "cuda")]
    gpu: Option<std::sync::Arc<switchyard_kernels::cuda::Gpu>>,
}

struct Held {
    layers: Vec<Vec<Option<Expert>>>,
    ids: Vec<ExpertId>,
    bytes: usize,
    /// The same experts in device memory, where the store has a GPU.
    #[cfg(feature = "cuda")]
    device: Option<switchyard_model::gpu::GpuExperts>,
}

impl Held {
    fn new(layers: Vec<Vec<Option<Expert>>>) -> Self {
        let ids = layers
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
        let bytes = layers.iter().flatten().flatten().map(Expert::size_in_bytes).sum();
        Held {
            layers,
            ids,
            bytes,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }
}

impl ExpertStore {
    /// Maps the experts of `set` from the checkpoint in `dir`, refuses the placement if they
    /// exceed `budget` bytes, then reads them into memory so the first dispatch does not page
    /// them in.
    pub fn load(
        dir: &Path,
        set: &ExpertSet,
        budget: Option<usize>,
        device: Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, NodeError> {
        let store = ExpertStore::open(dir, budget)?.on_device(device)?;
        set.validate(store.spec.num_layers, store.spec.num_experts).map_err(NodeError::Placement)?;
        let weights = load_experts(dir, &|l, e| set.contains(l, e), progress)?;
        let held = Held::new(weights.layers);
        if held.ids.is_empty() {
            return Err(NodeError::EmptyPlacement);
        }
        store.check_budget(held.bytes, held.ids.len())?;
        let held = store.resident(held)?;
        *store.held.write().expect("held lock") = held;
        Ok(store)
    }

    /// Keeps the experts on `device` from now on (`cpu`: in RAM, the default).
    pub fn on_device(self, device: Device) -> Result<Self, NodeError> {
        match device.ensure_available().map_err(|e| NodeError::Device(e.to_string()))? {
            Device::Cpu => Ok(self),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = switchyard_kernels::cuda::Gpu::open(n).map_err(|e| NodeError::Device(e.to_string()))?;
                Ok(ExpertStore { gpu: Some(gpu), ..self })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("ensure_available refuses CUDA in a build without it"),
        }
    }

    fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Makes freshly loaded experts ready to serve: copied to the GPU where the store has
    /// one, otherwise read once so the first dispatch does not page them in.
    fn resident(&self, held: Held) -> Result<Held, NodeError> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            let layers: Vec<&[Option<Expert>]> = held.layers.iter().map(Vec::as_slice).collect();
            let device = switchyard_model::gpu::GpuExperts::upload(gpu, &layers, self.exec.precision)?;
            return Ok(Held { device: Some(device), ..held });
        }
        page_in(&held, &self.spec, &self.exec);
        Ok(held)
    }

    /// A store holding no expert yet; the coordinator's placement fills it ([`Self::place`]).
    pub fn open(dir: &Path, budget: Option<usize>) -> Result<Self, NodeError> {
        let spec = ModelSpec::from_dir(dir)?;
        let first = spec.layer_mlps.iter().position(|m| *m == switchyard_model::config::LayerMlp::Moe);
        let expert_bytes = match first {
            Some(layer) => load_experts(dir, &|l, e| l == layer && e == 0, &mut |_, _| {})?.bytes(),
            None => 0,
        };
        let empty = spec.layer_mlps.iter().map(|_| Vec::new()).collect();
        Ok(ExpertStore {
            dir: dir.to_path_buf(),
            spec,
            exec: Exec::default(),
            budget,
            expert_bytes,
            held: RwLock::new(Held::new(empty)),
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    fn check_budget(&self, needed: usize, experts: usize) -> Result<(), NodeError> {
        match self.budget {
            Some(budget) if needed > budget => Err(NodeError::OverBudget { needed, budget, experts }),
            _ => Ok(()),
        }
    }

    /// Makes the held experts exactly `target`: loads (and pages in) the ones missing, then
    /// swaps them in and drops the ones no longer placed here. Blocking; dispatches keep
    /// running on the old set until the swap.
    pub fn place(&self, target: &BTreeSet<(u32, u32)>) -> Result<(), NodeError> {
        for &(layer, expert) in target {
            if layer as usize >= self.spec.num_layers
                || expert as usize >= self.spec.num_experts
                || self.spec.layer_mlps[layer as usize] != switchyard_model::config::LayerMlp::Moe
            {
                return Err(NodeError::Placement(format!(
                    "layer {layer} expert {expert} is not an expert of this model"
                )));
            }
        }
        self.check_budget(target.len() * self.expert_bytes, target.len())?;
        let missing: BTreeSet<(u32, u32)> = {
            let held = self.held.read().expect("held lock");
            target
                .iter()
                .filter(|&&(l, e)| held.layers[l as usize].get(e as usize).is_none_or(Option::is_none))
                .copied()
                .collect()
        };
        let mut loaded = if missing.is_empty() {
            None
        } else {
            let weights = load_experts(&self.dir, &|l, e| missing.contains(&(l as u32, e as u32)), &mut |_, _| {})?;
            let loaded = Held::new(weights.layers);
            if !self.on_gpu() {
                page_in(&loaded, &self.spec, &self.exec);
            }
            Some(loaded)
        };
        // The new set is assembled beside the old one (which keeps serving), then swapped in.
        let mut layers: Vec<Vec<Option<Expert>>> = self.held.read().expect("held lock").layers.clone();
        for (l, experts) in layers.iter_mut().enumerate() {
            let mut fresh = loaded.as_mut().map(|h| std::mem::take(&mut h.layers[l]));
            if experts.is_empty() {
                experts.resize_with(fresh.as_ref().map_or(0, Vec::len), || None);
            }
            for (e, slot) in experts.iter_mut().enumerate() {
                if !target.contains(&(l as u32, e as u32)) {
                    *slot = None;
                } else if slot.is_none() {
                    *slot = fresh.as_mut().and_then(|f| f.get_mut(e)).and_then(Option::take);
                }
            }
        }
        // On a GPU the whole new set is uploaded (the loaded experts were not paged in).
        let next = if self.on_gpu() { self.resident(Held::new(layers))? } else { Held::new(layers) };
        let mut held = self.held.write().expect("held lock");
        *held = next;
        tracing::info!(experts = held.ids.len(), bytes = held.bytes, "placement applied");
        Ok(())
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn model_type(&self) -> &'static str {
        let arch: Arch = self.spec().arch;
        arch.model_type()
    }

    pub fn held(&self) -> Vec<ExpertId> {
        self.held.read().expect("held lock").ids.clone()
    }

    pub fn bytes(&self) -> usize {
        self.held.read().expect("held lock").bytes
    }

    /// Whether `experts` experts fit the memory budget.
    pub fn fits(&self, experts: usize) -> bool {
        self.budget.is_none_or(|b| experts * self.expert_bytes <= b)
    }

    pub fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    /// Checks `req` and returns, per activation row, the weighted sum of the outputs of the
    /// experts routed to it.
    pub fn dispatch(&self, req: &DispatchRequest) -> Result<Tensor, NodeError> {
        let spec = self.spec();
        let (id, layer) = (req.id, req.layer);
        let held = self.held.read().expect("held lock");
        let experts =
            held.layers.get(layer as usize).ok_or(NodeError::UnknownLayer { id, layer, layers: spec.num_layers })?;
        if spec.layer_mlps[layer as usize] != switchyard_model::config::LayerMlp::Moe {
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
            if expert as usize >= spec.num_experts {
                let message = format!("expert {expert} does not exist: the model has {} experts", spec.num_experts);
                return Err(NodeError::BadRoutes { id, message });
            }
            if !weight.is_finite() {
                let message = format!("route weight {weight} of token row {token} is not finite");
                return Err(NodeError::BadRoutes { id, message });
            }
            if experts.get(expert as usize).is_none_or(Option::is_none) {
                return Err(NodeError::NotHeld { id, layer, expert, epoch: req.epoch });
            }
            assignments.push(Assignment { token, expert, weight });
        }
        #[cfg(feature = "cuda")]
        if let Some(device) = &held.device {
            use switchyard_model::moe::Experts;
            let out = device.run(layer as usize, &x, hidden, &assignments)?;
            return Ok(tensor::from_f32(&out, hidden));
        }
        let out = run_experts(experts, &x, hidden, &assignments, &self.exec).expect("every routed expert is held");
        Ok(tensor::from_f32(&out, hidden))
    }
}

/// Runs every expert of `held` once over a zero row: reads all of their weights.
fn page_in(held: &Held, spec: &ModelSpec, exec: &Exec) {
    let zeros = vec![0.0f32; spec.hidden_size];
    held.layers.par_iter().flatten().flatten().for_each(|x| {
        x.forward(&zeros, 1, exec);
    });
}
