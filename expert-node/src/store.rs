//! The experts placed on this node.
//!
//! - [`Catalog`]: what the node knows of its model without holding anything (the spec, the
//!   checkpoint, the bytes of one expert, the memory budget). Shared, read-only. It checks a
//!   placement and reads the experts it adds from the checkpoint into host memory.
//! - [`ExpertStore`]: the experts held, on the node's backend. It has one owner, the compute
//!   thread, which installs placements and runs dispatches one after another; everyone else
//!   reads the [`Held`] snapshot it publishes after each change.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use switchyard_kernels::{Backend, Device};
use switchyard_model::ModelSpec;
use switchyard_model::config::LayerMlp;
use switchyard_model::layers::Exec;
use switchyard_model::loader::{ExpertWeights, check_experts, load_experts};
use switchyard_model::moe::{Assignment, Expert, ExpertLayer};
use switchyard_proto::tensor;
use switchyard_proto::v1::{DispatchRequest, ExpertId, Tensor};
use tokio::sync::watch;

use crate::error::NodeError;

/// The node's model, as far as placing experts needs it.
pub struct Catalog {
    dir: PathBuf,
    spec: ModelSpec,
    budget: Option<usize>,
    /// Bytes of one expert's weights.
    expert_bytes: usize,
}

impl Catalog {
    /// Reads `dir`'s config, checks that every expert the coordinators could place here is in
    /// the checkpoint with its shape and format (the headers only: nothing is paged in), and
    /// measures one expert. A broken checkpoint fails here, naming the tensor, before the node
    /// serves or registers.
    pub fn open(dir: &Path, budget: Option<usize>) -> Result<Self, NodeError> {
        let spec = ModelSpec::from_dir(dir)?;
        let expert_bytes = check_experts(dir)?;
        Ok(Catalog { dir: dir.to_path_buf(), spec, budget, expert_bytes })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn model_type(&self) -> &'static str {
        self.spec.arch.model_type()
    }

    pub fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    pub fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// Whether `experts` experts fit the memory budget.
    pub fn fits(&self, experts: usize) -> bool {
        self.budget.is_none_or(|b| experts * self.expert_bytes <= b)
    }

    /// Checks every (layer, expert) of `target` is an expert of the model and the set fits the
    /// memory budget.
    pub fn check(&self, target: &BTreeSet<(u32, u32)>) -> Result<(), NodeError> {
        let s = &self.spec;
        for &(layer, expert) in target {
            if layer as usize >= s.num_layers
                || expert as usize >= s.num_experts
                || s.layer_mlps[layer as usize] != LayerMlp::Moe
            {
                return Err(NodeError::Placement(format!(
                    "layer {layer} expert {expert} is not an expert of this model"
                )));
            }
        }
        let needed = target.len() * self.expert_bytes;
        match self.budget {
            Some(budget) if needed > budget => Err(NodeError::OverBudget { needed, budget, experts: target.len() }),
            _ => Ok(()),
        }
    }

    /// Reads the experts `wanted` from the checkpoint into host memory (every page touched, so
    /// the first dispatch does not wait on the disk). Blocking.
    pub fn read(&self, wanted: &BTreeSet<(u32, u32)>) -> Result<ExpertWeights, NodeError> {
        let weights = load_experts(&self.dir, &|l, e| wanted.contains(&(l as u32, e as u32)), &mut |_, _| {})?;
        weights.layers.par_iter().flatten().flatten().for_each(page_in);
        Ok(weights)
    }
}

/// Reads one byte of every page of an expert's host weights.
fn page_in(expert: &Expert) {
    let weights: Vec<&switchyard_kernels::Weight> = match expert {
        Expert::SwiGlu { gate, up, down } => vec![gate, up, down],
        Expert::Interleaved { gate_up, down } => vec![gate_up, down],
    };
    for (values, scales) in weights.iter().filter_map(|w| w.host_bytes()) {
        for bytes in std::iter::once(values).chain(scales) {
            std::hint::black_box(bytes.iter().step_by(4096).fold(0u8, |a, &b| a ^ b));
        }
    }
}

/// What the node holds: published by the store after every change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    pub ids: Vec<ExpertId>,
    pub bytes: usize,
}

impl Held {
    /// The held (layer, expert) pairs.
    pub fn set(&self) -> BTreeSet<(u32, u32)> {
        self.ids.iter().map(|x| (x.layer, x.expert)).collect()
    }
}

/// The experts held, on the node's backend. Owned by the compute thread.
pub struct ExpertStore {
    catalog: Arc<Catalog>,
    exec: Exec,
    /// Per layer; `None` for dense layers.
    layers: Vec<Option<ExpertLayer>>,
    published: watch::Sender<Held>,
}

impl ExpertStore {
    /// An empty store on `device`, and the receiver of its [`Held`] snapshots.
    pub fn new(catalog: Arc<Catalog>, device: Device) -> Result<(Self, watch::Receiver<Held>), NodeError> {
        let backend = switchyard_kernels::open(device)?;
        let spec = catalog.spec();
        let layers = spec
            .layer_mlps
            .iter()
            .map(|m| match m {
                LayerMlp::Dense => Ok(None),
                LayerMlp::Moe => Ok(Some(ExpertLayer::new(
                    &*backend,
                    spec.activation,
                    (0..spec.num_experts).map(|_| None).collect(),
                )?)),
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        let (published, held) = watch::channel(Held::default());
        let exec = Exec::new(backend, switchyard_kernels::cpu::Precision::F32);
        Ok((ExpertStore { catalog, exec, layers, published }, held))
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn backend(&self) -> &dyn Backend {
        self.exec.ops()
    }

    /// Makes the held experts exactly `target`: frees what it drops, then copies the experts
    /// it adds (read into `loaded` beforehand) to the device one by one, and publishes the new
    /// set. On an error part-way the store holds a subset of `target` (what it kept and what
    /// was copied), published as such.
    pub fn install(&mut self, target: &BTreeSet<(u32, u32)>, mut loaded: ExpertWeights) -> Result<(), NodeError> {
        self.catalog.check(target)?;
        let backend = self.exec.backend.clone();
        let mut result = Ok(());
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let Some(layer) = layer else { continue };
            let mut changes = Vec::new();
            // Frees first, so the device never holds the dropped and the added together.
            for e in layer.held().collect::<Vec<_>>() {
                if !target.contains(&(l as u32, e as u32)) {
                    changes.push((e, None));
                }
            }
            for e in 0..layer.len() {
                if result.is_err() || !target.contains(&(l as u32, e as u32)) || layer.is_held(e) {
                    continue;
                }
                let host = loaded.layers.get_mut(l).and_then(|x| x.get_mut(e)).and_then(Option::take);
                let Some(host) = host else {
                    result =
                        Err(NodeError::Placement(format!("layer {l} expert {e} was not read from the checkpoint")));
                    continue;
                };
                match host.upload(&*backend) {
                    Ok(expert) => changes.push((e, Some(expert))),
                    Err(err) => result = Err(err.into()),
                }
            }
            if let Err(e) = layer.update(&*backend, changes) {
                result = result.and(Err(e.into()));
            }
        }
        self.publish();
        result
    }

    fn publish(&self) {
        let mut held = Held::default();
        for (l, layer) in self.layers.iter().enumerate() {
            if let Some(layer) = layer {
                held.ids.extend(layer.held().map(|e| ExpertId { layer: l as u32, expert: e as u32 }));
                held.bytes += layer.size_in_bytes();
            }
        }
        tracing::info!(experts = held.ids.len(), bytes = held.bytes, "placement applied");
        self.published.send_replace(held);
    }

    /// Checks `req` and returns, per activation row, the weighted sum of the outputs of the
    /// experts routed to it.
    pub fn dispatch(&self, req: &DispatchRequest) -> Result<Tensor, NodeError> {
        let spec = self.catalog.spec();
        let (id, layer) = (req.id, req.layer);
        let experts = match self.layers.get(layer as usize) {
            None => return Err(NodeError::UnknownLayer { id, layer, layers: spec.num_layers }),
            Some(None) => return Err(NodeError::DenseLayer { id, layer }),
            Some(Some(experts)) => experts,
        };
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
            if !experts.is_held(expert as usize) {
                return Err(NodeError::NotHeld { id, layer, expert, epoch: req.epoch });
            }
            assignments.push(Assignment { token, expert, weight });
        }
        let ops = self.exec.ops();
        let x = match ops.device() {
            Device::Cpu => switchyard_kernels::Tensor::host(rows, hidden, x)?,
            Device::Cuda(_) => ops.upload(&x, rows, hidden)?,
        };
        let y = experts.run(&self.exec, layer as usize, &x, &assignments)?;
        let out = match y.as_host() {
            Some(host) => tensor::from_f32(host, hidden),
            None => tensor::from_f32(&ops.download(&y)?, hidden),
        };
        Ok(out)
    }
}
