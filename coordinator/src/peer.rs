//! [`Peer`]: one raft member: raft-rs's `RawNode` over [`DiskStorage`], and the
//! [`ClusterState`] its committed entries build. It does no I/O of its own beyond storage:
//! [`Peer::handle_ready`] returns the messages to send, so the same code runs under the
//! coordinator's network loop ([`crate::node`]) and under the tests' in-memory network.

use std::collections::BTreeMap;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{Config, RawNode, ReadState, StateRole};

use crate::error::CoordinatorError;
use crate::state::{ClusterState, Command, Outcome};
use crate::storage::DiskStorage;

/// Take a snapshot (and compact the log) after this many applied entries.
pub const SNAPSHOT_EVERY: u64 = 1000;

/// Raft timing in ticks; the coordinator ticks every [`crate::TICK`].
pub const ELECTION_TICKS: usize = 10;
pub const HEARTBEAT_TICKS: usize = 2;

/// A proposal's identity, carried in its entry's context so the member that proposed it can
/// answer the caller once it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId {
    pub proposer: u64,
    pub seq: u64,
}

impl ProposalId {
    fn encode(self) -> Vec<u8> {
        [self.proposer.to_le_bytes(), self.seq.to_le_bytes()].concat()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let proposer = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let seq = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(ProposalId { proposer, seq })
    }
}

/// What one round of [`Peer::handle_ready`] produced.
#[derive(Default)]
pub struct ReadyOutput {
    pub messages: Vec<Message>,
    /// Proposals of this member that were applied, with their outcomes.
    pub applied: Vec<(ProposalId, Result<Outcome, String>)>,
    /// ReadIndex answers: the read with this context may be served once `applied_index()`
    /// reaches the index.
    pub reads: Vec<ReadState>,
    /// Whether the state machine changed.
    pub changed: bool,
}

pub struct Peer {
    pub raw: RawNode<DiskStorage>,
    pub state: ClusterState,
    applied: u64,
    next_seq: u64,
}

impl Peer {
    /// Opens member `id`: from `dir` if given (restarting from what is there), else in memory.
    /// `voters` is the group's first configuration, used only when there is no state yet;
    /// `addresses` are the members' addresses known from the command line.
    pub fn open(
        id: u64,
        dir: Option<&Path>,
        voters: &[u64],
        addresses: &BTreeMap<u64, String>,
        logger: &slog::Logger,
    ) -> Result<Peer, CoordinatorError> {
        let (mut storage, found) = match dir {
            Some(dir) => DiskStorage::open(dir, voters)?,
            None => (DiskStorage::in_memory(voters), false),
        };
        let state = if !found {
            // The first configuration's addresses go into the initial snapshot: they are part
            // of the replicated state from the start, and never read from flags again.
            let state = ClusterState { members: addresses.clone(), ..ClusterState::default() };
            storage.set_initial_state(serde_json::to_vec(&state).expect("state encodes"))?;
            state
        } else if storage.snapshot_data().is_empty() {
            ClusterState::default()
        } else {
            serde_json::from_slice(storage.snapshot_data()).map_err(|e| CoordinatorError::Corrupt {
                path: dir.map(Path::to_path_buf).unwrap_or_default(),
                reason: format!("the snapshot's state machine does not decode: {e}"),
            })?
        };
        // Entries after the snapshot are applied again (apply is deterministic), so the state
        // machine and the conf state both restart from the snapshot.
        let applied = storage.snapshot_index();
        let config = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        config.validate()?;
        let raw = RawNode::new(&config, storage, logger)?;
        // Proposal numbers start from the clock, so a restarted member never answers a new
        // caller with the outcome of a proposal it made before the restart.
        let next_seq =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Ok(Peer { raw, state, applied, next_seq })
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// The voters, ascending.
    pub fn voters(&self) -> Vec<u64> {
        let mut voters = self.raw.store().conf_state().voters.clone();
        voters.sort_unstable();
        voters
    }

    /// Proposes `command`; its outcome comes back from [`Peer::handle_ready`] under the id.
    pub fn propose(&mut self, command: &Command) -> Result<ProposalId, CoordinatorError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let id = ProposalId { proposer: self.id(), seq: self.next_seq() };
        let data = serde_json::to_vec(command).expect("commands encode");
        self.raw.propose(id.encode(), data).map_err(|e| CoordinatorError::Dropped(e.to_string()))?;
        Ok(id)
    }

    /// Proposes adding (`id → address`) and removing voters in one joint change.
    pub fn propose_members(
        &mut self,
        add: &BTreeMap<u64, String>,
        remove: &[u64],
    ) -> Result<ProposalId, CoordinatorError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let mut changes = Vec::new();
        for &node_id in add.keys() {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(ConfChangeType::AddNode);
            c.node_id = node_id;
            changes.push(c);
        }
        for &node_id in remove {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(ConfChangeType::RemoveNode);
            c.node_id = node_id;
            changes.push(c);
        }
        if changes.is_empty() {
            return Err(CoordinatorError::Config("a membership change must add or remove a member".into()));
        }
        let mut after: Vec<u64> = self.voters().into_iter().filter(|v| !remove.contains(v)).collect();
        after.extend(add.keys().filter(|id| !after.contains(id)).collect::<Vec<_>>());
        if after.is_empty() {
            return Err(CoordinatorError::Config("the change would remove every coordinator".into()));
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(changes.into());
        let id = ProposalId { proposer: self.id(), seq: self.next_seq() };
        let context = MembersContext { proposal: id.encode(), add: add.clone() };
        self.raw
            .propose_conf_change(serde_json::to_vec(&context).expect("context encodes"), cc)
            .map_err(|e| CoordinatorError::Dropped(e.to_string()))?;
        Ok(id)
    }

    /// Asks for a ReadIndex under `context`; the answer comes in [`ReadyOutput::reads`].
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.raw.read_index(context);
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub fn not_leader(&self) -> CoordinatorError {
        let leader = self.leader_id();
        let address = (leader != 0).then(|| self.state.members.get(&leader).cloned()).flatten();
        CoordinatorError::NotLeader { leader: address.map(|a| (leader, a)) }
    }

    /// Handles one `Ready` in raft-rs's order, with storage made durable before anything that
    /// depends on it: send the leader's messages; install a snapshot; append and fsync the
    /// entries and the hard state; apply the committed entries; then the messages that needed
    /// the entries persisted; advance, and the same for the light ready.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput, CoordinatorError> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut ready = self.raw.ready();
        out.messages.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.state = serde_json::from_slice(&snapshot.data).map_err(|e| CoordinatorError::Corrupt {
                path: Default::default(),
                reason: format!("a snapshot from the leader does not decode: {e}"),
            })?;
            self.applied = snapshot.get_metadata().index;
            self.raw.mut_store().apply_snapshot(snapshot)?;
            out.changed = true;
        }
        self.raw.mut_store().append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(hs.clone())?;
        }
        out.reads.extend(ready.take_read_states());
        let committed = ready.take_committed_entries();
        self.apply(committed, &mut out)?;
        out.messages.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed, &mut out)?;
        self.raw.advance_apply();
        if self.applied >= self.raw.store().snapshot_index() + SNAPSHOT_EVERY {
            let data = serde_json::to_vec(&self.state).expect("state encodes");
            self.raw.mut_store().compact(self.applied, data)?;
        }
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut ReadyOutput) -> Result<(), CoordinatorError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // a new leader's empty entry
                EntryType::EntryNormal => {
                    let outcome = match serde_json::from_slice::<Command>(&entry.data) {
                        Ok(command) => {
                            let outcome = self.state.apply(command.clone());
                            log_decision(&command, &outcome);
                            outcome
                        }
                        Err(e) => Err(format!("undecodable command at index {}: {e}", entry.index)),
                    };
                    out.changed = true;
                    if let Some(id) = ProposalId::decode(&entry.context).filter(|p| p.proposer == self.id()) {
                        out.applied.push((id, outcome));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    // A change raft refuses (one that would leave no voter, say) is skipped on
                    // every member alike, rather than stopping them all.
                    let cs = if entry.get_entry_type() == EntryType::EntryConfChange {
                        let applied = ConfChange::parse_from_bytes(&entry.data)
                            .map_err(raft::Error::from)
                            .and_then(|cc| self.raw.apply_conf_change(&cc));
                        match applied {
                            Ok(cs) => cs,
                            Err(e) => {
                                tracing::error!(index = entry.index, "membership change not applied: {e}");
                                continue;
                            }
                        }
                    } else {
                        let Ok(cc) = ConfChangeV2::parse_from_bytes(&entry.data) else {
                            tracing::error!(index = entry.index, "undecodable membership change skipped");
                            continue;
                        };
                        let cs = match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => cs,
                            Err(e) => {
                                tracing::error!(index = entry.index, "membership change not applied: {e}");
                                continue;
                            }
                        };
                        let removed: Vec<u64> = cc
                            .get_changes()
                            .iter()
                            .filter(|c| c.get_change_type() == ConfChangeType::RemoveNode)
                            .map(|c| c.node_id)
                            .collect();
                        for id in &removed {
                            self.state.members.remove(id);
                        }
                        cs
                    };
                    let context: Option<MembersContext> = serde_json::from_slice(&entry.context).ok();
                    if let Some(context) = &context {
                        self.state.members.extend(context.add.clone());
                    }
                    tracing::info!(voters = ?cs.voters, index = entry.index, "coordinator membership changed");
                    self.raw.mut_store().set_conf_state(cs);
                    if context.as_ref().is_some_and(|c| !c.add.is_empty()) {
                        // A new member starts empty and must catch up from a snapshot that
                        // carries the configuration it is part of: take one here.
                        let data = serde_json::to_vec(&self.state).expect("state encodes");
                        self.raw.mut_store().compact(entry.index, data)?;
                    }
                    out.changed = true;
                    if let Some(id) =
                        context.and_then(|c| ProposalId::decode(&c.proposal)).filter(|p| p.proposer == self.id())
                    {
                        out.applied.push((id, Ok(Outcome::Done)));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The context of a membership change: who proposed it, and the new members' addresses.
#[derive(serde::Serialize, serde::Deserialize)]
struct MembersContext {
    proposal: Vec<u8>,
    add: BTreeMap<u64, String>,
}

fn log_decision(command: &Command, outcome: &Result<Outcome, String>) {
    match (command, outcome) {
        (Command::RegisterNode { address, .. }, Ok(Outcome::Node(id))) => {
            tracing::info!(node = id, %address, "expert node registered")
        }
        (Command::DeclareDead { node, reason }, Ok(_)) => tracing::warn!(node, "expert node declared dead: {reason}"),
        (Command::Drain { node }, Ok(_)) => tracing::info!(node, "expert node draining"),
        (Command::SetTenants { tenants }, Ok(_)) => tracing::info!(tenants = tenants.len(), "tenants replaced"),
        (Command::ProposeEpoch { reason, .. }, Ok(Outcome::Epoch(e))) => {
            tracing::info!(epoch = e, "placement epoch pending: {reason}")
        }
        (Command::ActivateEpoch { epoch }, Ok(_)) => tracing::info!(epoch, "placement epoch active"),
        (Command::RetireEpochs { below }, Ok(_)) => tracing::debug!(below, "placement epochs retired"),
        (_, Err(e)) => tracing::debug!("command refused: {e}"),
        _ => {}
    }
}

/// A slog drain that forwards raft-rs's log records to `tracing`.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{message}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{message}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!(target: "raft", "{message}"),
        }
        Ok(())
    }
}

pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// Encodes a raft message in raft-rs's own encoding (it crosses our wire as opaque bytes).
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes().expect("raft messages encode")
}

pub fn decode_message(bytes: &[u8]) -> Result<Message, raft::Error> {
    Ok(Message::parse_from_bytes(bytes)?)
}
