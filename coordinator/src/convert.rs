//! The coordinator's state ⇄ protobuf, and reading a [`v1::Placement`] on the other side.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_proto::v1;

use crate::planner::{Assignment, ExpertKey, NodeId};
use crate::state::{ClusterState, EpochState, ModelShape, NodeState};

impl From<&v1::ModelShape> for ModelShape {
    fn from(m: &v1::ModelShape) -> Self {
        ModelShape {
            model_type: m.model_type.clone(),
            num_layers: m.num_layers,
            moe_layers: m.moe_layers.clone(),
            num_experts: m.num_experts,
            hidden_size: m.hidden_size,
            expert_bytes: m.expert_bytes,
        }
    }
}

impl From<&ModelShape> for v1::ModelShape {
    fn from(m: &ModelShape) -> Self {
        v1::ModelShape {
            model_type: m.model_type.clone(),
            num_layers: m.num_layers,
            moe_layers: m.moe_layers.clone(),
            num_experts: m.num_experts,
            hidden_size: m.hidden_size,
            expert_bytes: m.expert_bytes,
        }
    }
}

fn node_state(s: NodeState) -> v1::NodeState {
    match s {
        NodeState::Joining => v1::NodeState::Joining,
        NodeState::Serving => v1::NodeState::Serving,
        NodeState::Draining => v1::NodeState::Draining,
        NodeState::Dead => v1::NodeState::Dead,
    }
}

fn epoch_state(s: EpochState) -> v1::EpochState {
    match s {
        EpochState::Retiring => v1::EpochState::Retiring,
        EpochState::Active => v1::EpochState::Active,
        EpochState::Pending => v1::EpochState::Pending,
    }
}

pub fn placement(state: &ClusterState) -> v1::Placement {
    v1::Placement {
        epochs: state
            .epochs
            .iter()
            .map(|(&number, e)| v1::Epoch {
                number,
                state: epoch_state(e.state) as i32,
                experts: e
                    .assignment
                    .iter()
                    .map(|(&(layer, expert), nodes)| v1::ExpertReplicas { layer, expert, nodes: nodes.clone() })
                    .collect(),
                reason: e.reason.clone(),
            })
            .collect(),
        nodes: state
            .nodes
            .iter()
            .map(|(&id, r)| v1::RegisteredNode {
                id,
                address: r.address.clone(),
                state: node_state(r.state) as i32,
                memory_budget: if r.budget == u64::MAX { 0 } else { r.budget },
            })
            .collect(),
        model: state.model.as_ref().map(Into::into),
        tenants: state.tenants.iter().map(tenant).collect(),
    }
}

pub fn tenant(t: &crate::tenants::TenantSpec) -> v1::Tenant {
    v1::Tenant {
        name: t.name.clone(),
        api_key_sha256: t.api_key_sha256.clone(),
        requests_per_minute: t.requests_per_minute,
        tokens_per_minute: t.tokens_per_minute,
        max_concurrent: t.max_concurrent,
        priority: t.priority,
        metrics: t.metrics,
    }
}

pub fn tenant_spec(t: &v1::Tenant) -> crate::tenants::TenantSpec {
    crate::tenants::TenantSpec {
        name: t.name.clone(),
        api_key_sha256: t.api_key_sha256.clone(),
        requests_per_minute: t.requests_per_minute,
        tokens_per_minute: t.tokens_per_minute,
        max_concurrent: t.max_concurrent,
        priority: t.priority,
        metrics: t.metrics,
    }
}

fn assignment(epoch: &v1::Epoch) -> Assignment {
    epoch.experts.iter().map(|x| ((x.layer, x.expert), x.nodes.clone())).collect()
}

/// The epoch routers dispatch under: its number and assignment.
pub fn active(p: &v1::Placement) -> Option<(u64, Assignment)> {
    p.epochs.iter().find(|e| e.state() == v1::EpochState::Active).map(|e| (e.number, assignment(e)))
}

/// The newest epoch number in `p` (0: none).
pub fn newest_epoch(p: &v1::Placement) -> u64 {
    p.epochs.iter().map(|e| e.number).max().unwrap_or(0)
}

/// Every expert the epochs that `epochs` accepts give `node` (all of them: what it must hold).
pub fn held_by(p: &v1::Placement, node: NodeId, epochs: impl Fn(&v1::Epoch) -> bool) -> BTreeSet<ExpertKey> {
    p.epochs
        .iter()
        .filter(|e| epochs(e))
        .flat_map(|e| e.experts.iter())
        .filter(|x| x.nodes.contains(&node))
        .map(|x| (x.layer, x.expert))
        .collect()
}

/// Node id → address.
pub fn addresses(p: &v1::Placement) -> BTreeMap<NodeId, String> {
    p.nodes.iter().map(|n| (n.id, n.address.clone())).collect()
}

pub fn node_state_name(s: i32) -> &'static str {
    match v1::NodeState::try_from(s).unwrap_or(v1::NodeState::Unspecified) {
        v1::NodeState::Joining => "joining",
        v1::NodeState::Serving => "serving",
        v1::NodeState::Draining => "draining",
        v1::NodeState::Dead => "dead",
        v1::NodeState::Unspecified => "unknown",
    }
}

pub fn epoch_state_name(s: i32) -> &'static str {
    match v1::EpochState::try_from(s).unwrap_or(v1::EpochState::Unspecified) {
        v1::EpochState::Retiring => "retiring",
        v1::EpochState::Active => "active",
        v1::EpochState::Pending => "pending",
        v1::EpochState::Unspecified => "unknown",
    }
}
