//! The raft thread: one thread owns the [`Peer`] and runs the textbook loop — take a message
//! (raft traffic, a proposal, a read, a heartbeat), tick on a timer, handle the `Ready`. Others
//! hold a [`Handle`] and get answers on oneshots; the state each member has applied is
//! published on a watch channel ([`View`]) for the watch streams and the status.
//!
//! The leader also runs [`Duties`] on every tick: it declares silent nodes dead, makes new
//! placement epochs (first placement, re-placement after a death or a drain, a node joining,
//! the balancer), activates a pending epoch once its nodes have loaded it, and retires the
//! previous epoch once routers have moved on. Each duty is a logged proposal; one is in flight
//! at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use raft::prelude::Message;
use raft::{SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::CoordinatorError;
use crate::peer::{Peer, ProposalId};
use crate::planner::{self, Assignment, ExpertKey, NodeCapacity, NodeId};
use crate::state::{ClusterState, Command, EpochState, NodeState, Outcome};

/// The raft tick: elections take [`crate::peer::ELECTION_TICKS`] to 2× that many ticks.
pub const TICK: Duration = Duration::from_millis(50);

/// How long a new leader waits before it counts expert nodes' silence, and before it retires an
/// epoch on the routers' word (it has not heard their reports yet).
const LEADER_GRACE: Duration = Duration::from_secs(3);
const ROUTER_REPORT_GRACE: Duration = Duration::from_millis(1500);

/// How long a proposal or a read may wait for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The leader's placement policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A node silent this long is declared dead.
    pub node_timeout: Duration,
    /// The first placement waits for this many registered nodes.
    pub min_nodes: usize,
    /// Replicas per expert where memory allows.
    pub min_replicas: usize,
    /// How often the balancer looks at the load.
    pub balance_interval: Duration,
    /// Rebalance when the busiest node's predicted load exceeds the mean by this factor.
    pub imbalance_threshold: f64,
    /// Fewest routed tokens in the balancer's window before it acts.
    pub balance_min_tokens: f64,
    /// Most replica changes one rebalance makes.
    pub max_moves: usize,
    /// A retiring epoch is freed at the latest this long after its successor activated, even if
    /// some router never reported moving on.
    pub retire_after: Duration,
    /// A node that has not loaded a pending epoch this long after this leader saw it pending
    /// is declared dead (it heartbeats but cannot load).
    pub pending_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            node_timeout: Duration::from_millis(1000),
            min_nodes: 1,
            min_replicas: 2,
            balance_interval: Duration::from_secs(2),
            imbalance_threshold: 1.25,
            balance_min_tokens: 500.0,
            max_moves: 16,
            retire_after: Duration::from_secs(10),
            pending_timeout: Duration::from_secs(120),
        }
    }
}

/// A router's load report, as the raft thread keeps it.
pub struct Load {
    pub router: String,
    pub epoch: u64,
    pub experts: Vec<(ExpertKey, u64)>,
    pub node_rows: Vec<(NodeId, u64)>,
}

pub enum Msg {
    Raft(Message),
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Outcome, CoordinatorError>>,
    },
    ChangeMembers {
        add: BTreeMap<u64, String>,
        remove: Vec<u64>,
        reply: oneshot::Sender<Result<Outcome, CoordinatorError>>,
    },
    Read {
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    Heartbeat {
        node: NodeId,
        loaded_epoch: u64,
        held_bytes: u64,
        reply: oneshot::Sender<Result<bool, CoordinatorError>>,
    },
    Load(Load),
    Unreachable(u64),
    Snapshot {
        to: u64,
        delivered: bool,
    },
    /// Ends the raft thread.
    Stop,
}

/// What one member has applied, and what it knows of raft.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub state: ClusterState,
    /// Routed rows per second per node, as the leader measures it from router reports.
    pub node_load: BTreeMap<NodeId, f64>,
    /// Bytes of expert weights each node holds (as stored: quantized experts count their
    /// packed size), from its last heartbeat to the leader.
    pub node_bytes: BTreeMap<NodeId, u64>,
}

impl View {
    pub fn is_leader(&self) -> bool {
        self.id == self.leader_id
    }

    /// The leader's id and address, if known.
    pub fn leader(&self) -> Option<(u64, String)> {
        (self.leader_id != 0).then(|| self.state.members.get(&self.leader_id).map(|a| (self.leader_id, a.clone())))?
    }

    /// max / mean of the measured load over nodes that serve.
    pub fn imbalance(&self) -> f64 {
        planner::max_over_mean(
            self.state
                .nodes
                .iter()
                .filter(|(_, r)| r.state == NodeState::Serving)
                .map(|(id, _)| self.node_load.get(id).copied().unwrap_or(0.0)),
        )
    }
}

/// The way into the raft thread.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Msg>,
    pub view: watch::Receiver<Arc<View>>,
}

impl Handle {
    pub fn send(&self, msg: Msg) -> Result<(), CoordinatorError> {
        self.tx.send(msg).map_err(|_| CoordinatorError::ShuttingDown)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CoordinatorError>>) -> Msg,
    ) -> Result<T, CoordinatorError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    pub async fn propose(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        self.ask(|reply| Msg::Propose { command, reply }).await
    }

    pub async fn change_members(
        &self,
        add: BTreeMap<u64, String>,
        remove: Vec<u64>,
    ) -> Result<Outcome, CoordinatorError> {
        self.ask(|reply| Msg::ChangeMembers { add, remove, reply }).await
    }

    pub async fn heartbeat(&self, node: NodeId, loaded_epoch: u64, held_bytes: u64) -> Result<bool, CoordinatorError> {
        self.ask(|reply| Msg::Heartbeat { node, loaded_epoch, held_bytes, reply }).await
    }

    /// The state as of now: a ReadIndex round, then this member's view once it has applied
    /// up to the read index.
    pub async fn read(&self) -> Result<Arc<View>, CoordinatorError> {
        self.ask(|reply| Msg::Read { reply }).await?;
        Ok(self.view.borrow().clone())
    }
}

/// Starts the raft thread over `peer`; its outgoing raft messages go to `outbox`.
/// The raft thread itself: joined at shutdown; `failed` resolves if it stops on an error.
pub struct Thread {
    pub join: std::thread::JoinHandle<()>,
    pub failed: oneshot::Receiver<CoordinatorError>,
}

pub fn start(
    peer: Peer,
    policy: Policy,
    outbox: mpsc::UnboundedSender<Vec<Message>>,
) -> std::io::Result<(Handle, Thread)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (publish, view) = watch::channel(Arc::new(View::default()));
    let mut thread = RaftThread {
        peer,
        duties: Duties::new(policy),
        outbox,
        publish,
        proposals: HashMap::new(),
        reads: HashMap::new(),
        ready_reads: Vec::new(),
        next_read: 0,
        role: (StateRole::Follower, 0, 0),
    };
    let (failed_tx, failed) = oneshot::channel();
    let join = std::thread::Builder::new().name(format!("raft-{}", thread.peer.id())).spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| thread.run(rx)));
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                CoordinatorError::Rejected(format!("the raft loop panicked: {}", what.unwrap_or_default()))
            }
        };
        // Storage that cannot be written must not go on acknowledging raft messages.
        tracing::error!("the raft loop stopped: {error}");
        let _ = failed_tx.send(error);
    })?;
    Ok((Handle { tx, view }, Thread { join, failed }))
}

type Reply = oneshot::Sender<Result<Outcome, CoordinatorError>>;

struct RaftThread {
    peer: Peer,
    duties: Duties,
    outbox: mpsc::UnboundedSender<Vec<Message>>,
    publish: watch::Sender<Arc<View>>,
    proposals: HashMap<ProposalId, (Reply, Instant)>,
    reads: HashMap<u64, (oneshot::Sender<Result<(), CoordinatorError>>, Instant)>,
    ready_reads: Vec<(u64, oneshot::Sender<Result<(), CoordinatorError>>)>,
    next_read: u64,
    /// Role, term and known leader as last published.
    role: (StateRole, u64, u64),
}

impl RaftThread {
    fn run(&mut self, rx: Receiver<Msg>) -> Result<(), CoordinatorError> {
        let mut next_tick = Instant::now() + TICK;
        self.publish_view();
        loop {
            match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(Msg::Stop) => return Ok(()),
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                next_tick += TICK;
                self.peer.raw.tick();
                self.expire();
                if self.peer.is_leader()
                    && let Some(command) = self.duties.next(&self.peer.state)
                {
                    match self.peer.propose(&command) {
                        Ok(id) => self.duties.in_flight = Some((id, Instant::now())),
                        Err(e) => tracing::debug!("leader duty not proposed: {e}"),
                    }
                }
            }
            let out = self.peer.handle_ready()?;
            if !out.messages.is_empty() {
                let _ = self.outbox.send(out.messages);
            }
            for (id, outcome) in out.applied {
                if self.duties.in_flight.is_some_and(|(d, _)| d == id) {
                    self.duties.in_flight = None;
                    if let (Ok(Outcome::Epoch(e)), Some((active, _))) = (&outcome, self.peer.state.active())
                        && *e == active
                    {
                        self.duties.activated_at = Some((active, Instant::now()));
                    }
                }
                if let Some((reply, _)) = self.proposals.remove(&id) {
                    let _ = reply.send(outcome.map_err(CoordinatorError::Rejected));
                }
            }
            for read in out.reads {
                let ctx =
                    u64::from_le_bytes(read.request_ctx.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default());
                if let Some((reply, _)) = self.reads.remove(&ctx) {
                    self.ready_reads.push((read.index, reply));
                }
            }
            let applied = self.peer.applied_index();
            for (_, reply) in self.ready_reads.extract_if(.., |(index, _)| *index <= applied) {
                let _ = reply.send(Ok(()));
            }
            let role = (self.peer.raw.raft.state, self.peer.term(), self.peer.leader_id());
            if role != self.role {
                self.role_changed(role);
            }
            if out.changed || role != self.role || self.duties.load_changed {
                self.role = role;
                self.duties.load_changed = false;
                self.publish_view();
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Raft(m) => {
                let known = self.peer.state.members.contains_key(&m.from) || self.peer.voters().contains(&m.from);
                if m.to != self.peer.id() || !known {
                    tracing::warn!(
                        from = m.from,
                        to = m.to,
                        "raft message for another member or from a stranger dropped"
                    );
                    return;
                }
                if let Err(e) = self.peer.raw.step(m) {
                    tracing::debug!("raft message dropped: {e}");
                }
            }
            Msg::Propose { command, reply } => match self.peer.propose(&command) {
                Ok(id) => {
                    self.proposals.insert(id, (reply, Instant::now()));
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            Msg::ChangeMembers { add, remove, reply } => match self.peer.propose_members(&add, &remove) {
                Ok(id) => {
                    self.proposals.insert(id, (reply, Instant::now()));
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            Msg::Read { reply } => {
                if self.peer.leader_id() == 0 {
                    let _ = reply.send(Err(self.peer.not_leader()));
                    return;
                }
                self.next_read += 1;
                self.reads.insert(self.next_read, (reply, Instant::now()));
                self.peer.read_index(self.next_read.to_le_bytes().to_vec());
            }
            Msg::Heartbeat { node, loaded_epoch, held_bytes, reply } => {
                let answer = if !self.peer.is_leader() {
                    Err(self.peer.not_leader())
                } else {
                    let known = self.peer.state.nodes.get(&node).is_some_and(|r| r.state != NodeState::Dead);
                    if known {
                        self.duties.last_seen.insert(node, Instant::now());
                        self.duties.loaded.insert(node, loaded_epoch);
                        self.duties.held_bytes.insert(node, held_bytes);
                    }
                    Ok(known)
                };
                let _ = reply.send(answer);
            }
            Msg::Load(load) => self.duties.record(load),
            Msg::Unreachable(to) => self.peer.raw.report_unreachable(to),
            Msg::Snapshot { to, delivered } => {
                let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.peer.raw.report_snapshot(to, status);
            }
            Msg::Stop => {}
        }
    }

    /// Leadership moved: proposals made here may never be applied; their callers retry.
    fn role_changed(&mut self, (role, term, leader): (StateRole, u64, u64)) {
        if (role, term) == (self.role.0, self.role.1) {
            tracing::info!(term, leader, "coordinator leader known");
            return;
        }
        tracing::info!(?role, term, leader, "coordinator role changed");
        if role != StateRole::Leader {
            for (_, (reply, _)) in self.proposals.drain() {
                let _ = reply.send(Err(CoordinatorError::Dropped("leadership changed".into())));
            }
        }
        if role == StateRole::Leader {
            self.duties.became_leader(&self.peer.state);
        }
    }

    /// Fails answers that waited too long.
    fn expire(&mut self) {
        let now = Instant::now();
        for (_, (reply, _)) in self.proposals.extract_if(|_, (_, at)| now - *at > ANSWER_TIMEOUT) {
            let _ = reply.send(Err(CoordinatorError::Dropped("not committed in time".into())));
        }
        for (_, (reply, _)) in self.reads.extract_if(|_, (_, at)| now - *at > ANSWER_TIMEOUT) {
            let _ = reply.send(Err(self.peer.not_leader()));
        }
        if self.duties.in_flight.is_some_and(|(_, at)| now - at > ANSWER_TIMEOUT) {
            self.duties.in_flight = None;
        }
    }

    fn publish_view(&self) {
        let view = View {
            id: self.peer.id(),
            leader_id: self.peer.leader_id(),
            term: self.peer.term(),
            commit: self.peer.commit_index(),
            applied: self.peer.applied_index(),
            voters: self.peer.voters(),
            state: self.peer.state.clone(),
            node_load: if self.peer.is_leader() { self.duties.node_rate.clone() } else { BTreeMap::new() },
            node_bytes: if self.peer.is_leader() {
                self.duties.held_bytes.iter().map(|(&n, &b)| (n, b)).collect()
            } else {
                BTreeMap::new()
            },
        };
        self.publish.send_replace(Arc::new(view));
    }
}

/// The leader's volatile bookkeeping: none of it is logged, and a new leader starts afresh.
struct Duties {
    policy: Policy,
    /// The duty proposed and not yet applied.
    in_flight: Option<(ProposalId, Instant)>,
    leader_since: Instant,
    last_seen: HashMap<NodeId, Instant>,
    /// The newest epoch each node has loaded.
    loaded: HashMap<NodeId, u64>,
    /// The expert bytes each node last reported holding.
    held_bytes: HashMap<NodeId, u64>,
    /// Routers: the epoch each last reported, and when.
    routers: HashMap<String, (u64, Instant)>,
    activated_at: Option<(u64, Instant)>,
    /// Tokens per expert, decayed by half every balance interval.
    expert_load: BTreeMap<ExpertKey, f64>,
    window_rows: BTreeMap<NodeId, u64>,
    /// Nodes routers have reported answering dispatches (this leader's knowledge): balancing
    /// never leaves an expert only on nodes outside them.
    served: BTreeSet<NodeId>,
    window_start: Instant,
    node_rate: BTreeMap<NodeId, f64>,
    load_changed: bool,
    /// A load window closed since the balancer last looked.
    balance_due: bool,
    /// The pending epoch, and since when this leader has seen it pending.
    pending_since: Option<(u64, Instant)>,
}

impl Duties {
    fn new(policy: Policy) -> Self {
        let now = Instant::now();
        Duties {
            policy,
            in_flight: None,
            leader_since: now,
            last_seen: HashMap::new(),
            loaded: HashMap::new(),
            held_bytes: HashMap::new(),
            routers: HashMap::new(),
            activated_at: None,
            expert_load: BTreeMap::new(),
            window_rows: BTreeMap::new(),
            served: BTreeSet::new(),
            window_start: now,
            node_rate: BTreeMap::new(),
            load_changed: false,
            balance_due: false,
            pending_since: None,
        }
    }

    fn became_leader(&mut self, state: &ClusterState) {
        let now = Instant::now();
        self.in_flight = None;
        self.leader_since = now;
        // Every node gets a grace to find the new leader before it counts as silent: its
        // heartbeats may be stuck on a connection to the old leader for a call timeout.
        let grace = now + LEADER_GRACE;
        self.last_seen = state.nodes.keys().map(|&n| (n, grace)).collect();
        self.loaded.clear();
        self.pending_since = None;
        self.activated_at = state.active().map(|(e, _)| (e, now));
        self.window_start = now;
        self.window_rows.clear();
    }

    fn record(&mut self, load: Load) {
        self.routers.insert(load.router, (load.epoch, Instant::now()));
        for (key, tokens) in load.experts {
            *self.expert_load.entry(key).or_default() += tokens as f64;
        }
        for (node, rows) in load.node_rows {
            *self.window_rows.entry(node).or_default() += rows;
            if rows > 0 {
                self.served.insert(node);
            }
        }
    }

    /// The next decision to propose, if any (one at a time).
    fn next(&mut self, state: &ClusterState) -> Option<Command> {
        let now = Instant::now();
        if now - self.window_start >= self.policy.balance_interval {
            self.close_window(now);
        }
        if self.in_flight.is_some() {
            return None;
        }
        // A node silent too long is dead, unless every node is silent at once: then it is more
        // likely this leader that cannot hear them, and declaring them all dead would stop the
        // cluster.
        let live: Vec<NodeId> =
            state.nodes.iter().filter(|(_, r)| r.state != NodeState::Dead).map(|(&n, _)| n).collect();
        let silent: Vec<(NodeId, Duration)> = live
            .iter()
            .map(|&n| (n, now.saturating_duration_since(*self.last_seen.entry(n).or_insert(now))))
            .filter(|(_, quiet)| *quiet > self.policy.node_timeout)
            .collect();
        if let Some(&(node, quiet)) = silent.first() {
            if silent.len() * 2 <= live.len() || live.len() == 1 {
                let reason = format!("no heartbeat for {} ms", quiet.as_millis());
                return Some(Command::DeclareDead { node, reason });
            }
            tracing::warn!(
                silent = silent.len(),
                nodes = live.len(),
                "most expert nodes are silent; declaring none dead"
            );
        }
        let newest = state.newest();
        let gone = |a: &Assignment| {
            a.values().flatten().find(|n| state.nodes.get(n).is_none_or(|r| !r.state.eligible())).copied()
        };
        if let Some((epoch, pending)) = state.pending() {
            if let Some(node) = gone(&pending.assignment) {
                let reason = format!("node {node} is {} (replacing pending epoch {epoch})", node_state(state, node));
                return self.replan(state, reason, None, 0);
            }
            let since = match self.pending_since {
                Some((e, at)) if e == epoch => at,
                _ => self.pending_since.insert((epoch, now)).1,
            };
            let waiting = pending.assignment.values().flatten().find(|n| self.loaded.get(n).is_none_or(|&l| l < epoch));
            return match waiting {
                None => Some(Command::ActivateEpoch { epoch }),
                // A node that heartbeats but cannot load its experts would hold the epoch back
                // for good: it is taken out, and the epoch re-planned without it.
                Some(&node) if now - since > self.policy.pending_timeout => Some(Command::DeclareDead {
                    node,
                    reason: format!("did not load epoch {epoch} within {} s", self.policy.pending_timeout.as_secs()),
                }),
                Some(_) => None,
            };
        }
        match newest {
            None => {
                let eligible = state.nodes.values().filter(|r| r.state.eligible()).count();
                if state.model.is_some() && eligible >= self.policy.min_nodes.max(1) {
                    return self.replan(state, format!("first placement over {eligible} nodes"), None, 0);
                }
                return None;
            }
            Some((_, active)) => {
                if let Some(node) = gone(&active.assignment) {
                    return self.replan(state, format!("node {node} is {}", node_state(state, node)), None, 0);
                }
                let placed: std::collections::BTreeSet<NodeId> =
                    active.assignment.values().flatten().copied().collect();
                // A joining node the planner cannot use (too small, say) must not block the
                // duties below: fall through when the plan gives it nothing.
                let retiring = state.epoch_in(EpochState::Retiring).is_some();
                if let Some(joined) = state.nodes_in(NodeState::Joining).find(|n| !placed.contains(n))
                    && !retiring
                    && let Some(command) =
                        self.replan(state, format!("node {joined} joined"), None, self.policy.max_moves)
                {
                    return Some(command);
                }
            }
        }
        if let Some((retiring, _)) = state.epoch_in(EpochState::Retiring) {
            let (active, _) = state.active()?;
            // Routers report every 500 ms: a new leader first hears from them before it
            // decides they have all moved on.
            if now - self.leader_since < ROUTER_REPORT_GRACE {
                return None;
            }
            let fresh = |at: Instant| now - at < self.policy.balance_interval * 2;
            let moved_on = self.routers.values().filter(|(_, at)| fresh(*at)).all(|(e, _)| *e >= active);
            let overdue = self.activated_at.is_none_or(|(e, at)| e != active || now - at > self.policy.retire_after);
            if moved_on || overdue {
                return Some(Command::RetireEpochs { below: retiring + 1 });
            }
        }
        if std::mem::take(&mut self.balance_due) && state.epoch_in(EpochState::Retiring).is_none() {
            let command = self.balance(state);
            for load in self.expert_load.values_mut() {
                *load *= 0.5;
            }
            return command;
        }
        None
    }

    /// A rebalance, if the predicted load is skewed past the threshold and a plan evens it.
    fn balance(&mut self, state: &ClusterState) -> Option<Command> {
        let (_, active) = state.active()?;
        if self.expert_load.values().sum::<f64>() < self.policy.balance_min_tokens {
            return None;
        }
        let nodes: Vec<NodeId> = state.nodes.iter().filter(|(_, r)| r.state.eligible()).map(|(&n, _)| n).collect();
        let before = planner::imbalance(&active.assignment, &self.expert_load, &nodes);
        if before <= self.policy.imbalance_threshold {
            return None;
        }
        let load = self.expert_load.clone();
        let command = self.replan(state, String::new(), Some(&load), self.policy.max_moves)?;
        let Command::ProposeEpoch { base, assignment, .. } = command else { return None };
        let after = planner::imbalance(&assignment, &load, &nodes);
        if after > before * 0.95 {
            return None;
        }
        let added = planner::added_replicas(&active.assignment, &assignment);
        let measured = planner::max_over_mean(nodes.iter().map(|n| self.node_rate.get(n).copied().unwrap_or(0.0)));
        let reason = format!(
            "rebalance: measured imbalance {measured:.2}; predicted {before:.2} -> {after:.2}, {added} replicas added"
        );
        Some(Command::ProposeEpoch { base, assignment, reason })
    }

    /// Closes the load window: node rates for the status, and maybe a rebalance.
    fn close_window(&mut self, now: Instant) {
        let seconds = (now - self.window_start).as_secs_f64().max(1e-3);
        self.node_rate = self.window_rows.iter().map(|(&n, &rows)| (n, rows as f64 / seconds)).collect();
        self.window_rows.clear();
        self.window_start = now;
        self.load_changed = true;
        self.balance_due = true;
    }

    /// A new epoch from the newest one: survivors keep what they hold, the rest is re-placed.
    fn replan(
        &self,
        state: &ClusterState,
        reason: String,
        load: Option<&BTreeMap<ExpertKey, f64>>,
        max_moves: usize,
    ) -> Option<Command> {
        let model = state.model.as_ref()?;
        let experts = model.experts();
        let nodes: Vec<NodeCapacity> = state
            .nodes
            .iter()
            .filter(|(_, r)| r.state.eligible())
            .map(|(&id, r)| NodeCapacity { id, budget: r.budget })
            .collect();
        let (base, current) = state.newest().map_or((0, Assignment::new()), |(n, e)| (n, e.assignment.clone()));
        let empty = BTreeMap::new();
        let input = planner::PlanInput {
            experts: &experts,
            expert_bytes: model.expert_bytes,
            nodes: &nodes,
            current: &current,
            load: load.unwrap_or(&empty),
            min_replicas: self.policy.min_replicas,
            max_moves,
            proven: &self.served,
        };
        match planner::plan(&input) {
            Ok(assignment) => {
                if assignment == current {
                    return None;
                }
                Some(Command::ProposeEpoch { base, assignment, reason })
            }
            Err(e) => {
                tracing::error!("cannot place the experts ({reason}): {e}");
                None
            }
        }
    }
}

fn node_state(state: &ClusterState, node: NodeId) -> &'static str {
    state.nodes.get(&node).map_or("gone", |r| r.state.as_str())
}
