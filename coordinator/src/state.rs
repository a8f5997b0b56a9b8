//! [`ClusterState`]: the replicated state machine. Every coordinator applies the same
//! committed [`Command`]s in the same order and so holds the same state: the coordinator
//! members, the model being served, the expert nodes and the placement epochs.
//!
//! Only decisions are logged (a node joined, was declared dead or drains; a new epoch; an
//! epoch activated or retired). Heartbeats and load reports never reach the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::planner::{Assignment, NodeId};

/// The model the cluster serves, as the first expert node to register described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub model_type: String,
    pub num_layers: u32,
    pub moe_layers: Vec<u32>,
    pub num_experts: u32,
    pub hidden_size: u32,
    pub expert_bytes: u64,
}

impl ModelShape {
    /// Every (layer, expert) that must be placed.
    pub fn experts(&self) -> Vec<(u32, u32)> {
        self.moe_layers.iter().flat_map(|&l| (0..self.num_experts).map(move |e| (l, e))).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Registered; in no active epoch yet.
    Joining,
    /// In the active epoch.
    Serving,
    /// Its experts are being moved away; it gets no new ones.
    Draining,
    /// Missed its heartbeats (or was replaced): holds nothing, gets nothing.
    Dead,
}

impl NodeState {
    /// Whether the planner may give the node experts.
    pub fn eligible(self) -> bool {
        matches!(self, NodeState::Joining | NodeState::Serving)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::Dead => "dead",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub address: String,
    /// Bytes of expert weights it may hold (`u64::MAX`: no limit).
    pub budget: u64,
    pub state: NodeState,
    /// Why it was declared dead or drained.
    pub reason: Option<String>,
    /// The fingerprint of the certificate it registered with (`None` in plaintext): only that
    /// certificate may heartbeat for it.
    #[serde(default)]
    pub owner: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EpochState {
    Retiring,
    Active,
    Pending,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub state: EpochState,
    #[serde(with = "assignment_as_list")]
    pub assignment: Assignment,
    pub reason: String,
}

/// A logged decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    RegisterNode {
        address: String,
        budget: u64,
        model: ModelShape,
        /// The registering connection's certificate fingerprint (`None` in plaintext).
        #[serde(default)]
        owner: Option<String>,
    },
    DeclareDead {
        node: NodeId,
        reason: String,
    },
    Drain {
        node: NodeId,
    },
    /// Replaces the tenants (checked first: a bad list changes nothing).
    SetTenants {
        tenants: Vec<crate::tenants::TenantSpec>,
    },
    /// A new epoch, made from the newest epoch `base` (refused if another came first). It
    /// replaces a pending epoch.
    ProposeEpoch {
        base: u64,
        #[serde(with = "assignment_as_list")]
        assignment: Assignment,
        reason: String,
    },
    /// Every node of the pending epoch `epoch` has loaded its experts: routers switch to it.
    ActivateEpoch {
        epoch: u64,
    },
    /// Routers have moved on from every epoch below `below`: their replicas can go.
    RetireEpochs {
        below: u64,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Node(NodeId),
    Epoch(u64),
    Done,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Coordinators: raft id → address.
    pub members: BTreeMap<u64, String>,
    pub model: Option<ModelShape>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub next_node: NodeId,
    /// The live epochs: at most one retiring, one active and one pending.
    pub epochs: BTreeMap<u64, EpochRecord>,
    /// The newest epoch number ever made.
    pub last_epoch: u64,
    /// Who may call the routers' APIs, and how much (`SetTenants`; empty: open).
    #[serde(default)]
    pub tenants: Vec<crate::tenants::TenantSpec>,
}

impl ClusterState {
    pub fn apply(&mut self, command: Command) -> Result<Outcome, String> {
        match command {
            Command::RegisterNode { address, budget, model, owner } => self.register(address, budget, model, owner),
            Command::DeclareDead { node, reason } => {
                let record = self.node_mut(node)?;
                if record.state != NodeState::Dead {
                    record.state = NodeState::Dead;
                    record.reason = Some(reason);
                }
                Ok(Outcome::Done)
            }
            Command::SetTenants { tenants } => {
                crate::tenants::validate(&tenants)?;
                self.tenants = tenants;
                Ok(Outcome::Done)
            }
            Command::Drain { node } => {
                let record = self.node_mut(node)?;
                match record.state {
                    NodeState::Joining | NodeState::Serving => {
                        record.state = NodeState::Draining;
                        record.reason = Some("drained by request".into());
                        Ok(Outcome::Node(node))
                    }
                    NodeState::Draining => Ok(Outcome::Node(node)),
                    NodeState::Dead => Err(format!("expert node {node} is dead; there is nothing to drain")),
                }
            }
            Command::ProposeEpoch { base, assignment, reason } => self.propose_epoch(base, assignment, reason),
            Command::ActivateEpoch { epoch } => self.activate(epoch),
            Command::RetireEpochs { below } => {
                self.epochs.retain(|&n, e| n >= below || e.state != EpochState::Retiring);
                Ok(Outcome::Done)
            }
        }
    }

    fn node_mut(&mut self, node: NodeId) -> Result<&mut NodeRecord, String> {
        self.nodes.get_mut(&node).ok_or_else(|| format!("there is no expert node {node}"))
    }

    fn register(
        &mut self,
        address: String,
        budget: u64,
        model: ModelShape,
        owner: Option<String>,
    ) -> Result<Outcome, String> {
        // Another certificate cannot take over a live node's address (and so its experts).
        if let Some((id, _)) = self
            .nodes
            .iter()
            .find(|(_, r)| r.address == address && r.state != NodeState::Dead && r.owner.is_some() && r.owner != owner)
        {
            return Err(format!(
                "{address} is expert node {id}, registered with another certificate; it can register again once \
                 that node is declared dead"
            ));
        }
        match &self.model {
            Some(ours) if *ours != model => {
                return Err(format!(
                    "the node at {address} serves a different model ({} with {} layers, {} experts, {} bytes per expert); the cluster serves {} with {} layers, {} experts, {} bytes per expert",
                    model.model_type,
                    model.num_layers,
                    model.num_experts,
                    model.expert_bytes,
                    ours.model_type,
                    ours.num_layers,
                    ours.num_experts,
                    ours.expert_bytes
                ));
            }
            Some(_) => {}
            None => self.model = Some(model),
        }
        // A node process that comes back on the same address has lost what it held.
        for record in self.nodes.values_mut() {
            if record.address == address && record.state != NodeState::Dead {
                record.state = NodeState::Dead;
                record.reason = Some("registered again (restarted)".into());
            }
        }
        self.next_node += 1;
        let id = self.next_node;
        self.nodes.insert(id, NodeRecord { address, budget, state: NodeState::Joining, reason: None, owner });
        Ok(Outcome::Node(id))
    }

    fn propose_epoch(&mut self, base: u64, assignment: Assignment, reason: String) -> Result<Outcome, String> {
        if base != self.last_epoch {
            return Err(format!("epoch {base} is no longer the newest (epoch {} is)", self.last_epoch));
        }
        for (&(layer, expert), nodes) in &assignment {
            if nodes.is_empty() {
                return Err(format!("layer {layer} expert {expert} has no replica"));
            }
            for n in nodes {
                match self.nodes.get(n) {
                    Some(r) if r.state.eligible() => {}
                    Some(r) => return Err(format!("expert node {n} is {}", r.state.as_str())),
                    None => return Err(format!("there is no expert node {n}")),
                }
            }
        }
        if let Some(model) = &self.model {
            let missing = model.experts().into_iter().find(|k| !assignment.contains_key(k));
            if let Some((layer, expert)) = missing {
                return Err(format!("layer {layer} expert {expert} is placed on no node"));
            }
        }
        self.epochs.retain(|_, e| e.state != EpochState::Pending);
        self.last_epoch += 1;
        self.epochs.insert(self.last_epoch, EpochRecord { state: EpochState::Pending, assignment, reason });
        Ok(Outcome::Epoch(self.last_epoch))
    }

    fn activate(&mut self, epoch: u64) -> Result<Outcome, String> {
        match self.epochs.get(&epoch) {
            Some(e) if e.state == EpochState::Pending => {}
            Some(e) if e.state == EpochState::Active => return Ok(Outcome::Epoch(epoch)),
            _ => return Err(format!("epoch {epoch} is not pending")),
        }
        // Only the epoch routers are leaving stays as retiring; older ones go.
        self.epochs.retain(|_, e| e.state != EpochState::Retiring);
        for e in self.epochs.values_mut() {
            if e.state == EpochState::Active {
                e.state = EpochState::Retiring;
            }
        }
        let record = self.epochs.get_mut(&epoch).expect("checked above");
        record.state = EpochState::Active;
        for nodes in record.assignment.values() {
            for n in nodes {
                if let Some(r) = self.nodes.get_mut(n)
                    && r.state == NodeState::Joining
                {
                    r.state = NodeState::Serving;
                }
            }
        }
        Ok(Outcome::Epoch(epoch))
    }

    pub fn epoch_in(&self, state: EpochState) -> Option<(u64, &EpochRecord)> {
        self.epochs.iter().rev().find(|(_, e)| e.state == state).map(|(&n, e)| (n, e))
    }

    pub fn active(&self) -> Option<(u64, &EpochRecord)> {
        self.epoch_in(EpochState::Active)
    }

    pub fn pending(&self) -> Option<(u64, &EpochRecord)> {
        self.epoch_in(EpochState::Pending)
    }

    /// The newest epoch (pending, else active): what the next plan starts from.
    pub fn newest(&self) -> Option<(u64, &EpochRecord)> {
        self.epochs.iter().next_back().map(|(&n, e)| (n, e))
    }

    /// Nodes in `state`.
    pub fn nodes_in(&self, state: NodeState) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().filter(move |(_, r)| r.state == state).map(|(&id, _)| id)
    }
}

/// JSON maps need string keys: an [`Assignment`] travels as `[[layer, expert, [nodes]], …]`.
mod assignment_as_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::planner::{Assignment, NodeId};

    pub fn serialize<S: Serializer>(a: &Assignment, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<(u32, u32, &Vec<NodeId>)> = a.iter().map(|(&(l, e), n)| (l, e, n)).collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Assignment, D::Error> {
        let list: Vec<(u32, u32, Vec<NodeId>)> = Vec::deserialize(d)?;
        Ok(list.into_iter().map(|(l, e, n)| ((l, e), n)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            model_type: "mixtral".into(),
            num_layers: 2,
            moe_layers: vec![0, 1],
            num_experts: 2,
            hidden_size: 8,
            expert_bytes: 100,
        }
    }

    fn everywhere(nodes: &[NodeId]) -> Assignment {
        shape().experts().into_iter().map(|k| (k, nodes.to_vec())).collect()
    }

    fn register(s: &mut ClusterState, address: &str) -> NodeId {
        let cmd = Command::RegisterNode { address: address.into(), budget: u64::MAX, model: shape(), owner: None };
        match s.apply(cmd).unwrap() {
            Outcome::Node(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn epochs_go_pending_active_retiring_and_round_trip_through_json() {
        let mut s = ClusterState::default();
        let a = register(&mut s, "n1");
        let b = register(&mut s, "n2");
        let first = Command::ProposeEpoch { base: 0, assignment: everywhere(&[a]), reason: "first".into() };
        assert_eq!(s.apply(first).unwrap(), Outcome::Epoch(1));
        assert_eq!(s.nodes[&a].state, NodeState::Joining);
        s.apply(Command::ActivateEpoch { epoch: 1 }).unwrap();
        assert_eq!(s.nodes[&a].state, NodeState::Serving);
        // A stale base is refused: two leaders' plans cannot both land.
        let stale = Command::ProposeEpoch { base: 0, assignment: everywhere(&[b]), reason: "late".into() };
        assert!(s.apply(stale).unwrap_err().contains("no longer the newest"));
        let second = Command::ProposeEpoch { base: 1, assignment: everywhere(&[a, b]), reason: "join".into() };
        s.apply(second).unwrap();
        assert_eq!(s.active().unwrap().0, 1);
        assert_eq!(s.pending().unwrap().0, 2);
        s.apply(Command::ActivateEpoch { epoch: 2 }).unwrap();
        assert_eq!(s.epochs[&1].state, EpochState::Retiring);
        assert_eq!(s.nodes[&b].state, NodeState::Serving);
        s.apply(Command::RetireEpochs { below: 2 }).unwrap();
        assert_eq!(s.epochs.keys().copied().collect::<Vec<_>>(), vec![2]);
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<ClusterState>(&json).unwrap(), s);
    }

    #[test]
    fn refuses_bad_epochs_other_models_and_marks_restarted_nodes_dead() {
        let mut s = ClusterState::default();
        let a = register(&mut s, "n1");
        let mut partial = everywhere(&[a]);
        partial.remove(&(1, 1));
        let e = s.apply(Command::ProposeEpoch { base: 0, assignment: partial, reason: String::new() }).unwrap_err();
        assert_eq!(e, "layer 1 expert 1 is placed on no node");
        let e = s.apply(Command::ProposeEpoch { base: 0, assignment: everywhere(&[9]), reason: String::new() });
        assert_eq!(e.unwrap_err(), "there is no expert node 9");
        let mut other = shape();
        other.num_experts = 4;
        let e =
            s.apply(Command::RegisterNode { address: "n2".into(), budget: 1, model: other, owner: None }).unwrap_err();
        assert!(e.contains("serves a different model"), "{e}");
        let again = register(&mut s, "n1");
        assert_ne!(again, a);
        assert_eq!(s.nodes[&a].state, NodeState::Dead);
        let e = s.apply(Command::ProposeEpoch { base: 0, assignment: everywhere(&[a]), reason: String::new() });
        assert_eq!(e.unwrap_err(), format!("expert node {a} is dead"));
    }

    #[test]
    fn another_certificate_cannot_take_over_a_live_nodes_address() {
        let mut s = ClusterState::default();
        let owned = |owner: &str| Command::RegisterNode {
            address: "n1".into(),
            budget: u64::MAX,
            model: shape(),
            owner: Some(owner.into()),
        };
        let Outcome::Node(a) = s.apply(owned("aa")).unwrap() else { panic!() };
        let e = s.apply(owned("bb")).unwrap_err();
        assert!(e.contains(&format!("n1 is expert node {a}, registered with another certificate")), "{e}");
        assert_eq!(s.nodes[&a].state, NodeState::Joining, "the live node keeps its address");
        // The same certificate may come back (a restart), and a dead node's address is free.
        let Outcome::Node(b) = s.apply(owned("aa")).unwrap() else { panic!() };
        s.apply(Command::DeclareDead { node: b, reason: "gone".into() }).unwrap();
        assert!(matches!(s.apply(owned("bb")).unwrap(), Outcome::Node(_)));
    }
}
