//! The coordinator's raft group on an in-memory network (after raft-rs's
//! `harness/src/network.rs`): real [`Peer`]s — storage, Ready handling, state machine — joined by
//! a message queue that can drop, delay and partition. Nothing runs on a clock: the test ticks
//! the network, so every run is the same.

use std::collections::{BTreeMap, BTreeSet};

use raft::prelude::{Message, MessageType};
use raft::{ReadState, SnapshotStatus};
use switchyard_coordinator::peer::{self, Peer, ProposalId, SNAPSHOT_EVERY};
use switchyard_coordinator::state::{ClusterState, Command, ModelShape, Outcome};
use tempfile::TempDir;

/// A proposal of a member and its outcome once applied.
type Applied = (ProposalId, Result<Outcome, String>);

/// A tiny xorshift64*, so lossy runs are the same every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct InFlight {
    deliver_at: u64,
    msg: Message,
}

struct Network {
    /// `None`: crashed (its directory, if durable, is kept for a restart).
    peers: BTreeMap<u64, Option<Peer>>,
    dirs: BTreeMap<u64, TempDir>,
    /// The configuration a (re)opened member starts from when its storage is empty.
    initial_voters: BTreeMap<u64, Vec<u64>>,
    /// The first members' addresses, given to every member that opens (`--peers`).
    addresses: BTreeMap<u64, String>,
    queue: Vec<InFlight>,
    now: u64,
    /// Directed links that lose everything.
    cut: BTreeSet<(u64, u64)>,
    drop_percent: u64,
    delay: u64,
    rng: Rng,
    dropped: u64,
    snapshots_delivered: u64,
    /// What each member's Ready handling produced, for the tests to inspect.
    reads: BTreeMap<u64, Vec<ReadState>>,
    applied: BTreeMap<u64, Vec<Applied>>,
    logger: slog::Logger,
}

impl Network {
    /// Members `1..=n` in one group; `durable` gives each a data directory.
    fn new(n: u64, durable: bool) -> Network {
        let mut net = Network {
            peers: BTreeMap::new(),
            dirs: BTreeMap::new(),
            initial_voters: BTreeMap::new(),
            addresses: (1..=n).map(|id| (id, format!("m{id}"))).collect(),
            queue: Vec::new(),
            now: 0,
            cut: BTreeSet::new(),
            drop_percent: 0,
            delay: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            dropped: 0,
            snapshots_delivered: 0,
            reads: BTreeMap::new(),
            applied: BTreeMap::new(),
            logger: peer::logger(),
        };
        let voters: Vec<u64> = (1..=n).collect();
        for id in 1..=n {
            net.add_member(id, &voters, durable);
        }
        net
    }

    /// Starts member `id` (`voters = &[]`: it waits to be added to the group).
    fn add_member(&mut self, id: u64, voters: &[u64], durable: bool) {
        if durable {
            self.dirs.insert(id, tempfile::tempdir().expect("a temporary directory"));
        }
        self.initial_voters.insert(id, voters.to_vec());
        self.peers.insert(id, None);
        self.restart(id);
    }

    fn crash(&mut self, id: u64) {
        let peer = self.peers.get_mut(&id).and_then(Option::take);
        assert!(peer.is_some(), "member {id} is not running");
    }

    /// (Re)opens member `id` from its directory, or empty if it has none.
    fn restart(&mut self, id: u64) {
        assert!(self.peers[&id].is_none(), "member {id} is running");
        let dir = self.dirs.get(&id).map(TempDir::path);
        let peer = Peer::open(id, dir, &self.initial_voters[&id], &self.addresses, &self.logger).expect("member opens");
        self.peers.insert(id, Some(peer));
    }

    fn peer(&self, id: u64) -> &Peer {
        self.peers[&id].as_ref().unwrap_or_else(|| panic!("member {id} is crashed"))
    }

    fn peer_mut(&mut self, id: u64) -> &mut Peer {
        self.peers.get_mut(&id).and_then(Option::as_mut).unwrap_or_else(|| panic!("member {id} is crashed"))
    }

    /// Member `id`'s voters, sorted (raft-rs keeps them in hash order).
    fn voters(&self, id: u64) -> Vec<u64> {
        let mut voters = self.peer(id).voters();
        voters.sort_unstable();
        voters
    }

    fn live(&self) -> Vec<u64> {
        self.peers.iter().filter(|(_, p)| p.is_some()).map(|(&id, _)| id).collect()
    }

    fn isolate(&mut self, id: u64) {
        let others: Vec<u64> = self.peers.keys().copied().filter(|&o| o != id).collect();
        self.partition(&[id], &others);
    }

    /// Cuts every link between a member of `a` and a member of `b`, both ways.
    fn partition(&mut self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    /// Ends partitions, loss and delay.
    fn heal(&mut self) {
        self.cut.clear();
        self.drop_percent = 0;
        self.delay = 0;
    }

    fn set_drop_rate(&mut self, percent: u64, seed: u64) {
        self.drop_percent = percent;
        self.rng = Rng(seed.max(1));
    }

    /// Messages sent from now on arrive `ticks` ticks later.
    fn set_delay(&mut self, ticks: u64) {
        self.delay = ticks;
    }

    /// Ticks every running member once, then delivers until the network is quiet.
    fn tick(&mut self) {
        self.now += 1;
        for peer in self.peers.values_mut().flatten() {
            peer.raw.tick();
        }
        self.pump();
    }

    /// Handles every Ready and delivers every message that is due, until neither is left.
    fn pump(&mut self) {
        for round in 0.. {
            assert!(round < 100_000, "the network never went quiet");
            let mut busy = false;
            for id in self.live() {
                while self.peer(id).raw.has_ready() {
                    busy = true;
                    let out = self.peer_mut(id).handle_ready().expect("ready handled");
                    self.reads.entry(id).or_default().extend(out.reads);
                    self.applied.entry(id).or_default().extend(out.applied);
                    for msg in out.messages {
                        self.send(msg);
                    }
                }
            }
            let (due, later) = std::mem::take(&mut self.queue).into_iter().partition(|m| m.deliver_at <= self.now);
            self.queue = later;
            for InFlight { msg, .. } in due {
                busy = true;
                self.deliver(msg);
            }
            if !busy {
                return;
            }
        }
    }

    fn send(&mut self, msg: Message) {
        let lost = self.cut.contains(&(msg.from, msg.to)) || self.rng.chance(self.drop_percent);
        if lost {
            self.dropped += 1;
            self.report_snapshot(&msg, SnapshotStatus::Failure);
        } else {
            self.queue.push(InFlight { deliver_at: self.now + self.delay, msg });
        }
    }

    fn deliver(&mut self, msg: Message) {
        let Some(Some(to)) = self.peers.get_mut(&msg.to) else {
            self.report_snapshot(&msg, SnapshotStatus::Failure);
            return;
        };
        let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        // raft-rs refuses messages from members it does not know; so would the real transport.
        let _ = to.raw.step(msg.clone());
        if is_snapshot {
            self.snapshots_delivered += 1;
            self.report_snapshot(&msg, SnapshotStatus::Finish);
        }
    }

    /// Tells a snapshot's sender how it went, as the coordinator's transport does.
    fn report_snapshot(&mut self, msg: &Message, status: SnapshotStatus) {
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return;
        }
        if let Some(Some(from)) = self.peers.get_mut(&msg.from) {
            from.raw.report_snapshot(msg.to, status);
        }
    }

    /// Ticks until `cond` holds (checked first), at most `max_ticks` times.
    fn run_until(&mut self, max_ticks: u64, mut cond: impl FnMut(&Network) -> bool) -> bool {
        for _ in 0..max_ticks {
            if cond(self) {
                return true;
            }
            self.tick();
        }
        cond(self)
    }

    /// The leader of the highest term; two leaders in one term is a safety violation.
    fn leader(&self) -> Option<u64> {
        let leaders: Vec<&Peer> = self.peers.values().flatten().filter(|p| p.is_leader()).collect();
        let term = leaders.iter().map(|p| p.term()).max()?;
        let top: Vec<u64> = leaders.iter().filter(|p| p.term() == term).map(|p| p.id()).collect();
        assert_eq!(top.len(), 1, "two leaders in term {term}: {top:?}");
        Some(top[0])
    }

    fn elect(&mut self) -> u64 {
        assert!(self.run_until(200, |n| n.leader().is_some()), "no leader after 200 ticks");
        self.leader().unwrap()
    }

    fn propose(&mut self, address: &str) -> ProposalId {
        let leader = self.leader().expect("a leader");
        self.peer_mut(leader).propose(&register(address)).expect("the leader takes proposals")
    }

    /// Whether the running `ids` have all applied the same log (same index, same state).
    fn agree(&self, ids: &[u64]) -> bool {
        let first = self.peer(ids[0]);
        ids.iter().all(|&id| {
            let p = self.peer(id);
            p.applied_index() == first.applied_index()
                && p.commit_index() == first.commit_index()
                && p.state == first.state
        })
    }
}

fn register(address: &str) -> Command {
    Command::RegisterNode {
        address: address.into(),
        budget: u64::MAX,
        model: ModelShape {
            model_type: "mixtral".into(),
            num_layers: 2,
            moe_layers: vec![0, 1],
            num_experts: 4,
            hidden_size: 8,
            expert_bytes: 100,
        },
        owner: None,
    }
}

fn addresses(state: &ClusterState) -> Vec<String> {
    state.nodes.values().map(|n| n.address.clone()).collect()
}

#[test]
fn three_members_elect_exactly_one_leader() {
    let mut net = Network::new(3, false);
    assert!(net.run_until(60, |n| n.leader().is_some()), "no leader within 60 ticks");
    let leader = net.leader().unwrap();
    let term = net.peer(leader).term();
    assert!(net.run_until(20, |n| (1..=3).all(|id| n.peer(id).leader_id() == leader)));
    let leaders = (1..=3).filter(|&id| net.peer(id).is_leader()).count();
    assert_eq!(leaders, 1);
    // With a healthy network the leadership is stable: no new elections.
    for _ in 0..100 {
        net.tick();
    }
    assert_eq!(net.leader(), Some(leader));
    assert!((1..=3).all(|id| net.peer(id).term() == term && net.peer(id).leader_id() == leader));
}

#[test]
fn proposals_replicate_to_every_member_in_order() {
    let mut net = Network::new(3, false);
    let leader = net.elect();
    let ids: Vec<ProposalId> = (0..20).map(|i| net.propose(&format!("n{i}"))).collect();
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 20));
    let expected: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
    assert_eq!(addresses(&net.peer(1).state), expected);
    assert_eq!(net.peer(1).state.nodes.keys().copied().collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    // The proposer hears each outcome, in order, with the ids the nodes got.
    let outcomes = &net.applied[&leader];
    assert_eq!(outcomes.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert!(outcomes.iter().zip(1..).all(|((_, o), node)| *o == Ok(Outcome::Node(node))));
}

#[test]
fn an_isolated_leader_steps_down_and_the_majority_goes_on() {
    let mut net = Network::new(3, false);
    let old = net.elect();
    for i in 0..5 {
        net.propose(&format!("before{i}"));
    }
    assert!(net.run_until(10, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 5));
    let before = net.peer(old).state.nodes.clone();
    let old_term = net.peer(old).term();

    net.isolate(old);
    // The old leader still takes a proposal, which can never commit.
    net.peer_mut(old).propose(&register("lost")).expect("still leader for now");
    let rest: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    assert!(net.run_until(100, |n| rest.iter().any(|&id| n.peer(id).is_leader())), "the majority elects no leader");
    let new = *rest.iter().find(|&&id| net.peer(id).is_leader()).unwrap();
    assert!(net.peer(new).term() > old_term);
    for i in 0..5 {
        net.peer_mut(new).propose(&register(&format!("during{i}"))).unwrap();
    }
    assert!(net.run_until(20, |n| n.agree(&rest) && n.peer(new).state.nodes.len() == 10));
    // Check-quorum: the old leader gives up; pre-vote: it does not inflate its term.
    assert!(net.run_until(30, |n| !n.peer(old).is_leader()), "the isolated leader stays leader");
    assert_eq!(net.peer(old).term(), old_term);
    assert_eq!(net.peer(old).state.nodes, before);

    net.heal();
    assert!(net.run_until(50, |n| n.agree(&[1, 2, 3])), "the old leader does not catch up");
    assert_eq!(net.leader(), Some(new), "the rejoining member disrupted the group");
    let state = &net.peer(old).state;
    assert!(before.iter().all(|(id, record)| state.nodes.get(id) == Some(record)), "a committed entry was lost");
    let want: Vec<String> = (0..5).map(|i| format!("before{i}")).chain((0..5).map(|i| format!("during{i}"))).collect();
    assert_eq!(addresses(state), want, "the uncommitted proposal of the old leader must be gone");
}

#[test]
fn a_lossy_network_converges() {
    let mut net = Network::new(3, false);
    net.set_drop_rate(20, 42);
    net.elect();
    for i in 0..10 {
        net.propose(&format!("n{i}"));
        for _ in 0..3 {
            net.tick();
        }
    }
    let converged = net.run_until(500, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 10);
    assert!(
        converged,
        "no convergence; nodes per member: {:?}",
        (1..=3).map(|id| net.peer(id).state.nodes.len()).collect::<Vec<_>>()
    );
    assert!(net.dropped > 20, "only {} messages were dropped", net.dropped);
    let want: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    assert_eq!(addresses(&net.peer(2).state), want);
}

#[test]
fn delayed_messages_still_elect_and_replicate() {
    let mut net = Network::new(3, false);
    net.set_delay(1);
    let leader = net.elect();
    for i in 0..10 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(30, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 10));
    assert_eq!(net.leader(), Some(leader));
}

#[test]
fn a_member_joins_by_snapshot_and_another_leaves() {
    let mut net = Network::new(3, false);
    let leader = net.elect();
    for i in 0..5 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(10, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 5));

    net.add_member(4, &[], false);
    let add = BTreeMap::from([(4, "m4".to_string())]);
    net.peer_mut(leader).propose_members(&add, &[]).expect("the leader takes a membership change");
    let all = [1, 2, 3, 4];
    let joined = net.run_until(100, |n| n.agree(&all) && all.iter().all(|&id| n.voters(id) == all));
    assert!(
        joined,
        "member 4 did not catch up: applied {} (leader {}), voters {:?}, snapshots delivered {}",
        net.peer(4).applied_index(),
        net.peer(leader).applied_index(),
        net.voters(4),
        net.snapshots_delivered
    );
    assert!(net.snapshots_delivered >= 1, "member 4 caught up without a snapshot");
    assert_eq!(net.peer(4).state.members.get(&4).map(String::as_str), Some("m4"));
    // Entries after the snapshot reach it through the log.
    for i in 5..10 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(10, |n| n.agree(&all) && n.peer(4).state.nodes.len() == 10));
    remove_a_follower(&mut net, &all);
}

#[test]
fn a_follower_leaves_the_group() {
    let mut net = Network::new(4, false);
    net.elect();
    for i in 0..10 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(10, |n| n.agree(&[1, 2, 3, 4]) && n.peer(1).state.nodes.len() == 10));
    remove_a_follower(&mut net, &[1, 2, 3, 4]);
}

/// Removes a follower of `members` (whose state holds 10 nodes); the rest go on committing.
fn remove_a_follower(net: &mut Network, members: &[u64]) {
    let leader = net.leader().expect("a leader");
    let gone = *members.iter().find(|&&id| id != leader).unwrap();
    assert!(net.peer(leader).state.members.contains_key(&gone));
    net.peer_mut(leader).propose_members(&BTreeMap::new(), &[gone]).expect("the leader takes a removal");
    let rest: Vec<u64> = members.iter().copied().filter(|&id| id != gone).collect();
    assert!(net.run_until(30, |n| rest.iter().all(|&id| n.voters(id) == rest)), "voters did not shrink");
    // (The removed member may never hear that its removal committed: the leader stops sending
    // to it once it applies the change, as in any raft.)
    for i in 10..15 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(20, |n| n.agree(&rest) && n.peer(rest[0]).state.nodes.len() == 15));
    assert!(rest.iter().all(|&id| !net.peer(id).state.members.contains_key(&gone)));
    // The removed member cannot disrupt the group.
    for _ in 0..100 {
        net.tick();
    }
    assert_eq!(net.leader(), Some(leader));
}

#[test]
fn a_restart_keeps_a_removed_member_removed() {
    let mut net = Network::new(4, true);
    let leader = net.elect();
    let gone = (1..=4).find(|&id| id != leader).unwrap();
    net.peer_mut(leader).propose_members(&BTreeMap::new(), &[gone]).expect("the leader takes a removal");
    let rest: Vec<u64> = (1..=4).filter(|&id| id != gone).collect();
    assert!(net.run_until(30, |n| rest.iter().all(|&id| n.voters(id) == rest)), "voters did not shrink");
    // Enough entries that every member snapshots past the removal.
    for batch in 0..SNAPSHOT_EVERY / 100 + 1 {
        for i in 0..100 {
            net.propose(&format!("n{}", batch * 100 + i));
        }
        net.tick();
    }
    assert!(net.run_until(20, |n| n.agree(&rest)));
    let restarted = *rest.iter().find(|&&id| id != leader).unwrap();
    assert!(net.peer(restarted).raw.store().snapshot_index() > 0, "no snapshot was taken");
    let state = net.peer(restarted).state.clone();
    assert!(!state.members.contains_key(&gone));

    net.crash(restarted);
    net.restart(restarted);
    let applied = net.peer(leader).applied_index();
    assert!(net.run_until(20, |n| n.peer(restarted).applied_index() >= applied), "the restarted member is behind");
    assert_eq!(net.peer(restarted).state.members, state.members, "the replicated member list changed on restart");
    assert_eq!(net.peer(restarted).state, state);
    assert!(net.agree(&rest));
}

#[test]
fn a_durable_group_restarts_with_its_state() {
    let mut net = Network::new(3, true);
    net.elect();
    for i in 0..30 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 30));
    let before = net.peer(1).state.clone();
    let commit = net.peer(1).commit_index();

    for id in 1..=3 {
        net.crash(id);
    }
    net.queue.clear();
    for id in 1..=3 {
        net.restart(id);
    }
    net.elect();
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3]) && n.peer(1).commit_index() > commit));
    assert!((1..=3).all(|id| net.peer(id).state == before), "the state changed across the restart");
    for i in 30..35 {
        net.propose(&format!("n{i}"));
    }
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3]) && n.peer(1).state.nodes.len() == 35));
}

#[test]
fn a_crashed_follower_catches_up_after_restart() {
    let mut net = Network::new(3, true);
    let leader = net.elect();
    for i in 0..10 {
        net.propose(&format!("n{i}"));
    }
    net.tick();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    net.crash(follower);
    let rest: Vec<u64> = (1..=3).filter(|&id| id != follower).collect();
    for i in 10..20 {
        net.propose(&format!("n{i}"));
        net.tick();
    }
    assert!(net.run_until(20, |n| n.agree(&rest) && n.peer(leader).state.nodes.len() == 20));
    net.restart(follower);
    assert!(net.peer(follower).state.nodes.len() < 20);
    assert!(net.run_until(30, |n| n.agree(&[1, 2, 3])), "the restarted follower did not catch up");
    assert_eq!(net.peer(follower).state.nodes.len(), 20);
    assert_eq!(net.leader(), Some(leader));
}

#[test]
fn an_isolated_follower_catches_up_by_snapshot() {
    let mut net = Network::new(3, true);
    let leader = net.elect();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let rest: Vec<u64> = (1..=3).filter(|&id| id != follower).collect();
    net.isolate(follower);
    let total = SNAPSHOT_EVERY + 100;
    for batch in 0..total / 100 {
        for i in 0..100 {
            net.propose(&format!("n{}", batch * 100 + i));
        }
        net.tick();
    }
    assert!(net.run_until(20, |n| n.agree(&rest) && n.peer(leader).state.nodes.len() == total as usize));
    let compacted = net.peer(leader).raw.store().snapshot_index();
    assert!(compacted > net.peer(follower).applied_index(), "the leader did not compact past the follower");

    net.heal();
    assert!(net.run_until(50, |n| n.agree(&[1, 2, 3])), "the follower did not catch up");
    assert!(net.snapshots_delivered >= 1, "the follower caught up without a snapshot");
    assert!(net.peer(follower).raw.store().snapshot_index() >= compacted);
    assert_eq!(net.peer(follower).state.nodes.len(), total as usize);

    // The installed snapshot is durable: the follower restarts into the same state.
    let state = net.peer(follower).state.clone();
    net.crash(follower);
    net.restart(follower);
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3])));
    assert_eq!(net.peer(follower).state, state);
}

#[test]
fn a_divergent_tail_is_replaced_by_the_leaders_snapshot() {
    let mut net = Network::new(5, true);
    let old = net.elect();
    let follower = (1..=5).find(|&id| id != old).unwrap();
    let majority: Vec<u64> = (1..=5).filter(|&id| id != old && id != follower).collect();
    net.partition(&[old, follower], &majority);
    // The old leader writes a long tail that reaches one follower but can never commit.
    for i in 0..SNAPSHOT_EVERY + 500 {
        net.peer_mut(old).propose(&register(&format!("stale{i}"))).expect("still leader for now");
    }
    net.pump();
    let tail = net.peer(follower).raw.raft.raft_log.last_index();
    assert!(tail > SNAPSHOT_EVERY + 500, "the tail did not reach the follower ({tail})");

    assert!(net.run_until(100, |n| majority.iter().any(|&id| n.peer(id).is_leader())), "the majority elects no leader");
    let new = *majority.iter().find(|&&id| net.peer(id).is_leader()).unwrap();
    let total = SNAPSHOT_EVERY + 100;
    for batch in 0..total / 100 {
        for i in 0..100 {
            net.peer_mut(new).propose(&register(&format!("n{}", batch * 100 + i))).unwrap();
        }
        net.tick();
    }
    assert!(net.run_until(20, |n| n.agree(&majority) && n.peer(new).state.nodes.len() == total as usize));
    let compacted = net.peer(new).raw.store().snapshot_index();
    assert!(
        compacted > 0 && compacted < tail,
        "the snapshot ({compacted}) does not fall inside the stale tail ({tail})"
    );

    let term_at = |n: &Network, id: u64| n.peer(id).raw.raft.raft_log.term(compacted).unwrap();
    assert_ne!(term_at(&net, follower), term_at(&net, new), "the follower's log does not diverge at the snapshot");

    net.heal();
    assert!(net.run_until(100, |n| n.agree(&[1, 2, 3, 4, 5])), "the divergent members did not catch up");
    let last = |n: &Network, id: u64| n.peer(id).raw.raft.raft_log.last_index();
    assert!([old, follower].iter().all(|&id| last(&net, id) == last(&net, new)), "a stale tail survived");
    assert!(net.snapshots_delivered >= 2);
    for id in 1..=5 {
        let state = &net.peer(id).state;
        assert_eq!(state.nodes.len(), total as usize, "member {id}");
        assert!(state.nodes.values().all(|n| n.address.starts_with('n')), "member {id} applied a stale entry");
    }
    // What the follower kept on disk is the leader's log, not the stale tail.
    let state = net.peer(follower).state.clone();
    net.crash(follower);
    net.restart(follower);
    assert!(net.run_until(20, |n| n.agree(&[1, 2, 3, 4, 5])));
    assert_eq!(net.peer(follower).state, state);
}

#[test]
fn read_index_on_a_follower_covers_the_commit_at_the_call() {
    let mut net = Network::new(3, false);
    let leader = net.elect();
    for i in 0..10 {
        net.propose(&format!("n{i}"));
    }
    net.pump();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let commit = net.peer(leader).commit_index();
    assert!(commit >= 11, "the proposals did not commit ({commit})");
    net.peer_mut(follower).read_index(b"r1".to_vec());
    assert!(net.run_until(10, |n| n.reads.get(&follower).is_some_and(|r| !r.is_empty())), "no ReadIndex answer");
    let reads = &net.reads[&follower];
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].request_ctx, b"r1".to_vec());
    assert!(reads[0].index >= commit, "read index {} is below the commit {commit}", reads[0].index);
    let index = reads[0].index;
    assert!(net.run_until(10, |n| n.peer(follower).applied_index() >= index));
    assert_eq!(net.peer(follower).state.nodes.len(), 10);
}
