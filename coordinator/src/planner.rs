//! Expert placement: which expert nodes hold which (layer, expert), with how many replicas.
//!
//! [`plan`] is pure and deterministic (ordered maps, ties broken by lower id), so the raft leader
//! and anyone replaying its input get the same placement. It runs four passes:
//! 1. keep the current placement minus departed nodes and experts; a node whose budget shrank
//!    sheds replicas of its coolest experts that have another replica, else hands them on;
//! 2. place every expert left without a replica on the node with the most free memory, hottest first
//!    (when all are full, extra replicas of the coolest experts make room);
//! 3. add replicas up to `min_replicas` where memory allows, on the least-loaded nodes;
//! 4. balance, at most `max_moves` times until the peak is within 1% of the mean: replicate (hot
//!    experts) or move (cold ones) one of the busiest node's experts onto the least-loaded node
//!    that can hold it, when that leaves both nodes below the old peak, and never moving an
//!    expert's last replica on a proven node (one that has served) to an unproven one; then
//!    pass 3 again if balancing left room, and so on, so that a plan is its own plan.
//!
//! Starting from what is placed means a balanced cluster plans to no change at all and a failure
//! re-places the failed node's replicas plus at most `max_moves` balancing actions.

use std::collections::{BTreeMap, BTreeSet};

/// An expert node's id.
pub type NodeId = u64;
/// (layer, expert)
pub type ExpertKey = (u32, u32);
/// Every expert's replicas, sorted ascending by node id, no duplicates.
pub type Assignment = BTreeMap<ExpertKey, Vec<NodeId>>;

/// A node that may hold experts and how much expert memory it may use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeCapacity {
    pub id: NodeId,
    /// Bytes of expert weights it may hold; `u64::MAX` = unlimited.
    pub budget: u64,
}

/// Everything [`plan`] decides from.
pub struct PlanInput<'a> {
    /// Every expert that must be placed.
    pub experts: &'a [ExpertKey],
    /// Bytes of one expert (all experts are the same size).
    pub expert_bytes: u64,
    /// Nodes that may hold experts (serving or joining). Others named in `current` are gone.
    /// An id listed twice keeps its first budget.
    pub nodes: &'a [NodeCapacity],
    /// The placement now (may name nodes not in `nodes`: their replicas are dropped).
    pub current: &'a Assignment,
    /// Tokens routed to each expert recently. Experts missing from the map count as 1.0 each
    /// (so with an empty map every expert weighs the same and balancing spreads expert counts).
    /// A negative or non-finite load counts as 0.0.
    pub load: &'a BTreeMap<ExpertKey, f64>,
    /// Replicas every expert should have where memory allows (typically 2), capped at nodes.len().
    pub min_replicas: usize,
    /// Most replica additions/moves the balancing phase may make in one plan.
    pub max_moves: usize,
    /// Nodes known to have answered dispatches. Balancing never moves an expert's last replica
    /// on one of them to a node outside them (it may replicate there instead): a node that has
    /// not served yet, which routers hold on probation, must not end up serving an expert alone.
    /// Re-placing a departed node's experts is not balancing and may use any node.
    pub proven: &'a BTreeSet<NodeId>,
}

/// No node is known to have served: balancing moves freely.
pub static NO_PROVEN_NODES: BTreeSet<NodeId> = BTreeSet::new();

/// Why no placement exists for a [`PlanInput`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("no expert node can hold experts: none is serving or joining")]
    NoNodes,
    #[error(
        "not enough expert memory: layer {layer} expert {expert} ({expert_bytes} bytes) fits on no node; \
         free bytes per node: {free}"
    )]
    NoRoom { layer: u32, expert: u32, expert_bytes: u64, free: String },
}

/// Balancing stops with the peak this share above the mean; an action must take the busiest node
/// and the receiver this share of the moved load below the peak.
const MIN_GAIN: f64 = 0.01;

/// Places every expert of `input` on its nodes (see the module doc for how).
///
/// Fails with [`PlanError::NoNodes`] when there are experts but no nodes, and with
/// [`PlanError::NoRoom`] when some expert fits on no node at all. With no experts the plan is empty.
pub fn plan(input: &PlanInput) -> Result<Assignment, PlanError> {
    if input.experts.is_empty() {
        return Ok(Assignment::new());
    }
    let mut nodes: Vec<Slot> = Vec::with_capacity(input.nodes.len());
    for node in input.nodes {
        if let Err(at) = nodes.binary_search_by_key(&node.id, |s| s.id) {
            nodes.insert(at, Slot { id: node.id, budget: node.budget, held: 0, load: 0.0 });
        }
    }
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    let mut state = State::new(input, nodes);
    state.trim_over_budget();
    state.place_orphans()?;
    state.add_min_replicas(input.min_replicas);
    // Moves can leave room where a missing replica fits; fill it and balance again, so that
    // planning from a plan changes nothing unless `max_moves` cut balancing short.
    let mut moves_left = input.max_moves;
    loop {
        moves_left -= state.balance(moves_left);
        if !state.add_min_replicas(input.min_replicas) {
            break;
        }
    }
    Ok(state.assignment)
}

/// Load of each node: each expert's load split evenly among its replicas, summed per node.
/// Every node in `nodes` appears (0.0 if it holds nothing); replicas on other nodes are ignored.
pub fn node_loads(assignment: &Assignment, load: &BTreeMap<ExpertKey, f64>, nodes: &[NodeId]) -> BTreeMap<NodeId, f64> {
    let mut loads: BTreeMap<NodeId, f64> = nodes.iter().map(|&n| (n, 0.0)).collect();
    for (key, replicas) in assignment {
        if replicas.is_empty() {
            continue;
        }
        let share = weight(load, key) / replicas.len() as f64;
        for node in replicas {
            if let Some(total) = loads.get_mut(node) {
                *total += share;
            }
        }
    }
    loads
}

/// max / mean of [`node_loads`] (1.0 when even; 1.0 when the total is 0 or there are no nodes).
pub fn imbalance(assignment: &Assignment, load: &BTreeMap<ExpertKey, f64>, nodes: &[NodeId]) -> f64 {
    max_over_mean(node_loads(assignment, load, nodes).into_values())
}

/// max / mean of `loads` (1.0 when there are none or they sum to 0).
pub fn max_over_mean(loads: impl IntoIterator<Item = f64>) -> f64 {
    let (mut n, mut total, mut max) = (0usize, 0.0f64, 0.0f64);
    for x in loads {
        n += 1;
        total += x;
        max = max.max(x);
    }
    if n == 0 || total <= 0.0 { 1.0 } else { max / (total / n as f64) }
}

/// How many (expert, node) replicas `new` has that `old` did not (experts to load somewhere).
pub fn added_replicas(old: &Assignment, new: &Assignment) -> usize {
    new.iter()
        .map(|(key, replicas)| {
            let before = old.get(key).map_or(&[][..], Vec::as_slice);
            replicas.iter().filter(|n| !before.contains(n)).count()
        })
        .sum()
}

/// Load of one expert as the planner counts it: missing → 1.0, negative or non-finite → 0.0.
fn weight(load: &BTreeMap<ExpertKey, f64>, key: &ExpertKey) -> f64 {
    match load.get(key) {
        None => 1.0,
        Some(&w) if w.is_finite() && w >= 0.0 => w,
        Some(_) => 0.0,
    }
}

/// A node as the planner sees it: its budget, how many experts it holds and its load.
struct Slot {
    id: NodeId,
    budget: u64,
    held: u64,
    load: f64,
}

/// The placement being built, with each node's replica count and load kept alongside.
struct State<'a> {
    expert_bytes: u64,
    load_in: &'a BTreeMap<ExpertKey, f64>,
    proven: &'a BTreeSet<NodeId>,
    /// Sorted by id, one per id.
    nodes: Vec<Slot>,
    assignment: Assignment,
}

impl<'a> State<'a> {
    /// Pass 1, first half: `current` restricted to the wanted experts and the live nodes.
    fn new(input: &PlanInput<'a>, nodes: Vec<Slot>) -> Self {
        let live = |n: &NodeId| nodes.binary_search_by_key(n, |s| s.id).is_ok();
        let mut assignment = Assignment::new();
        for key in input.experts.iter().copied().collect::<BTreeSet<_>>() {
            let mut replicas: Vec<NodeId> =
                input.current.get(&key).into_iter().flatten().copied().filter(live).collect();
            replicas.sort_unstable();
            replicas.dedup();
            assignment.insert(key, replicas);
        }
        let mut state =
            State { expert_bytes: input.expert_bytes, load_in: input.load, proven: input.proven, nodes, assignment };
        for node in state.assignment.values().flatten() {
            if let Ok(at) = state.nodes.binary_search_by_key(node, |s| s.id) {
                state.nodes[at].held += 1;
            }
        }
        state.refresh_loads();
        state
    }

    fn refresh_loads(&mut self) {
        let ids: Vec<NodeId> = self.nodes.iter().map(|s| s.id).collect();
        let loads = node_loads(&self.assignment, self.load_in, &ids);
        for slot in &mut self.nodes {
            slot.load = loads.get(&slot.id).copied().unwrap_or(0.0);
        }
    }

    fn find(&self, node: NodeId) -> Option<&Slot> {
        let at = self.nodes.binary_search_by_key(&node, |s| s.id).ok()?;
        self.nodes.get(at)
    }

    fn slot(&mut self, node: NodeId) -> Option<&mut Slot> {
        let at = self.nodes.binary_search_by_key(&node, |s| s.id).ok()?;
        self.nodes.get_mut(at)
    }

    fn load_of(&self, node: NodeId) -> f64 {
        self.find(node).map_or(0.0, |s| s.load)
    }

    fn weight(&self, key: &ExpertKey) -> f64 {
        weight(self.load_in, key)
    }

    fn replicas(&self, key: &ExpertKey) -> &[NodeId] {
        self.assignment.get(key).map_or(&[], Vec::as_slice)
    }

    fn free(&self, slot: &Slot) -> u64 {
        slot.budget.saturating_sub(slot.held.saturating_mul(self.expert_bytes))
    }

    fn over_budget(&self, node: NodeId) -> bool {
        self.find(node).is_some_and(|s| s.held.saturating_mul(self.expert_bytes) > s.budget)
    }

    /// Wanted experts, hottest first (ties: lower key).
    fn by_heat(&self) -> Vec<ExpertKey> {
        let mut keys: Vec<ExpertKey> = self.assignment.keys().copied().collect();
        keys.sort_by(|a, b| self.weight(b).total_cmp(&self.weight(a)).then(a.cmp(b)));
        keys
    }

    /// Nodes that do not hold `key` and have room for it, by id.
    fn can_take(&self, key: &ExpertKey) -> impl Iterator<Item = &Slot> {
        let holders = self.replicas(key);
        self.nodes.iter().filter(move |s| !holders.contains(&s.id) && self.free(s) >= self.expert_bytes)
    }

    /// The least-loaded node (ties: lower id) that does not hold `key` and has room for it.
    fn coolest_with_room(&self, key: &ExpertKey) -> Option<NodeId> {
        self.can_take(key).min_by(|a, b| a.load.total_cmp(&b.load)).map(|s| s.id)
    }

    /// The node with the most free bytes (ties: lower load, then lower id) that does not hold
    /// `key` and has room for it.
    fn roomiest(&self, key: &ExpertKey) -> Option<NodeId> {
        let by_free = |a: &Slot, b: &Slot| self.free(b).cmp(&self.free(a));
        self.can_take(key).min_by(|a, b| by_free(a, b).then(a.load.total_cmp(&b.load))).map(|s| s.id)
    }

    /// Adds (`sign` = 1.0) or takes away (-1.0) `key`'s load shares on its current replicas.
    fn shift_shares(&mut self, key: &ExpertKey, sign: f64) {
        let replicas = self.replicas(key).to_vec();
        let share = sign * self.weight(key) / replicas.len().max(1) as f64;
        for node in replicas {
            if let Some(slot) = self.slot(node) {
                slot.load += share;
            }
        }
    }

    fn add(&mut self, key: ExpertKey, node: NodeId) {
        self.shift_shares(&key, -1.0);
        let replicas = self.assignment.entry(key).or_default();
        if let Err(at) = replicas.binary_search(&node) {
            replicas.insert(at, node);
            if let Some(slot) = self.slot(node) {
                slot.held += 1;
            }
        }
        self.shift_shares(&key, 1.0);
    }

    fn remove(&mut self, key: ExpertKey, node: NodeId) {
        self.shift_shares(&key, -1.0);
        if let Some(replicas) = self.assignment.get_mut(&key)
            && let Ok(at) = replicas.binary_search(&node)
        {
            replicas.remove(at);
            if let Some(slot) = self.slot(node) {
                slot.held = slot.held.saturating_sub(1);
            }
        }
        self.shift_shares(&key, 1.0);
    }

    /// Pass 1, second half: nodes over their budget take turns (by id) dropping their coolest
    /// replica that has another until they fit, so nodes that share experts shed alike. A node
    /// still over then hands its coolest experts to the [`Self::roomiest`] nodes while any has
    /// room, and keeps the rest (an expert's only replica never goes).
    fn trim_over_budget(&mut self) {
        let mut queues: BTreeMap<NodeId, std::vec::IntoIter<ExpertKey>> = BTreeMap::new();
        for node in self.nodes.iter().map(|s| s.id).filter(|n| self.over_budget(*n)) {
            queues.insert(node, self.held_coolest_first(node).into_iter());
        }
        while !queues.is_empty() {
            queues.retain(|&node, queue| {
                if !self.over_budget(node) {
                    return false;
                }
                let Some(key) = queue.find(|k| self.replicas(k).len() > 1) else { return false };
                self.remove(key, node);
                true
            });
        }
        for node in self.nodes.iter().map(|s| s.id).filter(|n| self.over_budget(*n)).collect::<Vec<_>>() {
            for key in self.held_coolest_first(node) {
                let Some(to) = self.roomiest(&key) else { break };
                if !self.over_budget(node) {
                    break;
                }
                self.add(key, to);
                self.remove(key, node);
            }
        }
    }

    /// The experts `node` holds, coolest first (ties: lower key).
    fn held_coolest_first(&self, node: NodeId) -> Vec<ExpertKey> {
        let mut held: Vec<ExpertKey> =
            self.assignment.iter().filter(|(_, r)| r.contains(&node)).map(|(k, _)| *k).collect();
        held.sort_by(|a, b| self.weight(a).total_cmp(&self.weight(b)).then(a.cmp(b)));
        held
    }

    /// Pass 2: every expert without a replica goes to the [`Self::roomiest`] node, hottest first.
    /// When every node is full, extra replicas of the coolest experts make room (each from its
    /// busiest holder): one replica of every expert comes before a second of any.
    fn place_orphans(&mut self) -> Result<(), PlanError> {
        let (hottest, mut spare) = (self.by_heat(), 0);
        let coolest: Vec<ExpertKey> = hottest.iter().rev().copied().collect();
        for key in hottest {
            if !self.replicas(&key).is_empty() {
                continue;
            }
            while self.roomiest(&key).is_none() {
                while coolest.get(spare).is_some_and(|k| self.replicas(k).len() < 2) {
                    spare += 1;
                }
                let Some(&victim) = coolest.get(spare) else { return Err(self.no_room(key)) };
                let holders = self.replicas(&victim);
                let busiest = holders.iter().copied().min_by(|a, b| self.load_of(*b).total_cmp(&self.load_of(*a)));
                if let Some(node) = busiest {
                    self.remove(victim, node);
                }
            }
            if let Some(node) = self.roomiest(&key) {
                self.add(key, node);
            }
        }
        Ok(())
    }

    fn no_room(&self, key: ExpertKey) -> PlanError {
        let free: Vec<String> = self.nodes.iter().map(|s| format!("{}={}", s.id, self.free(s))).collect();
        PlanError::NoRoom { layer: key.0, expert: key.1, expert_bytes: self.expert_bytes, free: free.join(", ") }
    }

    /// Pass 3: replicas up to `min(min_replicas, nodes)` per expert where memory allows,
    /// hottest expert first, each on the least-loaded node that can take it. Says if it added any.
    fn add_min_replicas(&mut self, min_replicas: usize) -> bool {
        let (target, mut added) = (min_replicas.min(self.nodes.len()), false);
        for key in self.by_heat() {
            while self.replicas(&key).len() < target {
                let Some(node) = self.coolest_with_room(&key) else { break };
                self.add(key, node);
                added = true;
            }
        }
        added
    }

    /// Pass 4: at most `max_moves` balancing actions, each one that [`Self::balance_step`] found.
    /// Returns how many it took.
    /// Whether moving `key`'s replica from `from` to `to` leaves it a replica on a proven node,
    /// where it has one now.
    fn keeps_a_proven_replica(&self, key: &ExpertKey, from: NodeId, to: NodeId) -> bool {
        let proven = self.proven;
        let replicas = self.replicas(key);
        !replicas.iter().any(|n| proven.contains(n))
            || proven.contains(&to)
            || replicas.iter().any(|n| *n != from && proven.contains(n))
    }

    fn balance(&mut self, max_moves: usize) -> usize {
        for taken in 0..max_moves {
            self.refresh_loads();
            if !self.balance_step() {
                return taken;
            }
        }
        max_moves
    }

    /// Takes one balancing action, if one helps; none once the peak is within [`MIN_GAIN`] of the
    /// mean. For the busiest node's experts, largest share first: L = the least-loaded node that
    /// can hold the expert; replicating onto L and moving the busiest node's replica to L are each
    /// judged by the higher of those two nodes' loads after (other replicas only get lighter). An
    /// action helps when that is below the peak by more than [`MIN_GAIN`] of the load it takes off
    /// the busiest node: a share of the peak itself would stall models whose nodes hold hundreds of
    /// experts, each far under 1% of a node's load. The first expert with a helping action is
    /// replicated if that helps and its share is above the mean node load (such a share holds the
    /// peak above the mean wherever it sits) or replicating ends no higher; otherwise it moves,
    /// spending no memory. The sorted load vector drops lexicographically with each action, so
    /// balancing never cycles.
    fn balance_step(&mut self) -> bool {
        let Some(top) = self.nodes.iter().min_by(|a, b| b.load.total_cmp(&a.load)) else { return false };
        let (busiest, peak) = (top.id, top.load);
        let mean = self.nodes.iter().map(|s| s.load).sum::<f64>() / self.nodes.len() as f64;
        if peak <= 0.0 || peak <= mean * (1.0 + MIN_GAIN) {
            return false;
        }
        let mut shares: Vec<(ExpertKey, f64)> = self
            .assignment
            .iter()
            .filter(|(_, r)| r.contains(&busiest))
            .map(|(k, r)| (*k, self.weight(k) / r.len() as f64))
            .collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (key, share) in shares {
            if share <= 0.0 {
                break;
            }
            let Some(to) = self.coolest_with_room(&key) else { continue };
            let replicas = self.replicas(&key).len() as f64;
            let new_share = share * replicas / (replicas + 1.0);
            let to_load = self.load_of(to);
            // The higher of the busiest node's and the receiver's loads after each action.
            let replicate = (peak - share + new_share).max(to_load + new_share);
            let relocate = (peak - share).max(to_load + share);
            let helps = |after: f64, shed: f64| after < peak - MIN_GAIN * shed;
            let replicate_helps = helps(replicate, share - new_share);
            let relocate_helps = helps(relocate, share) && self.keeps_a_proven_replica(&key, busiest, to);
            if replicate_helps && (share > mean || replicate <= relocate || !relocate_helps) {
                self.add(key, to);
                return true;
            }
            if relocate_helps {
                self.remove(key, busiest);
                self.add(key, to);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTES: u64 = 10;

    #[test]
    fn balancing_never_leaves_an_expert_only_on_nodes_that_have_not_served() {
        // Node 1 has served and holds every expert, all hot; node 2 just joined.
        let e = experts(1, 6);
        let n = nodes(&[1, 2], u64::MAX);
        let current: Assignment = e.iter().map(|&k| (k, vec![1])).collect();
        let load: BTreeMap<ExpertKey, f64> = e.iter().map(|&k| (k, 1.0 + f64::from(k.1))).collect();
        let base = PlanInput { min_replicas: 1, ..input(&e, &n, &current, &load) };
        // Without the rule, balancing moves experts wholly onto the new node.
        let free = plan(&base).unwrap();
        assert!(free.values().any(|r| r == &vec![2]), "{free:?}");
        // With it, each expert keeps its replica on node 1; the new node gets copies.
        let proven: BTreeSet<NodeId> = [1].into();
        let careful = plan(&PlanInput { proven: &proven, ..base }).unwrap();
        assert!(careful.values().all(|r| r.contains(&1)), "{careful:?}");
        assert!(careful.values().any(|r| r.contains(&2)), "the new node takes load too: {careful:?}");
        // Re-placing a departed node's experts is not balancing: they go to the new node.
        let only_new = nodes(&[2], u64::MAX);
        let replaced = plan(&PlanInput { proven: &proven, ..input(&e, &only_new, &current, &load) }).unwrap();
        assert!(replaced.values().all(|r| r == &vec![2]), "{replaced:?}");
    }

    fn experts(layers: u32, per_layer: u32) -> Vec<ExpertKey> {
        (0..layers).flat_map(|l| (0..per_layer).map(move |e| (l, e))).collect()
    }

    fn nodes(ids: &[NodeId], budget: u64) -> Vec<NodeCapacity> {
        ids.iter().map(|&id| NodeCapacity { id, budget }).collect()
    }

    fn ids(nodes: &[NodeCapacity]) -> Vec<NodeId> {
        nodes.iter().map(|n| n.id).collect()
    }

    /// Defaults: 10-byte experts, two replicas, 16 balancing actions.
    fn input<'a>(
        experts: &'a [ExpertKey],
        nodes: &'a [NodeCapacity],
        current: &'a Assignment,
        load: &'a BTreeMap<ExpertKey, f64>,
    ) -> PlanInput<'a> {
        PlanInput {
            experts,
            expert_bytes: BYTES,
            nodes,
            current,
            load,
            min_replicas: 2,
            max_moves: 16,
            proven: &NO_PROVEN_NODES,
        }
    }

    /// Expert i on `width` consecutive nodes starting at node i mod nodes.
    fn round_robin(experts: &[ExpertKey], nodes: &[NodeCapacity], width: usize) -> Assignment {
        let place = |i: usize| {
            let mut r: Vec<NodeId> = (0..width).map(|w| nodes[(i + w) % nodes.len()].id).collect();
            r.sort_unstable();
            r
        };
        experts.iter().enumerate().map(|(i, k)| (*k, place(i))).collect()
    }

    /// Every expert placed, lists sorted without duplicates, on listed nodes, within budgets.
    fn assert_valid(a: &Assignment, experts: &[ExpertKey], nodes: &[NodeCapacity]) {
        assert!(a.keys().eq(experts.iter().collect::<BTreeSet<_>>()), "wrong experts: {a:?}");
        for (key, replicas) in a {
            assert!(!replicas.is_empty(), "{key:?} has no replica");
            assert!(replicas.windows(2).all(|w| w[0] < w[1]), "{key:?}: {replicas:?} not sorted/unique");
            assert!(replicas.iter().all(|n| ids(nodes).contains(n)), "{key:?} on a node not listed");
        }
        for node in nodes {
            let held = a.values().filter(|r| r.contains(&node.id)).count() as u64;
            assert!(held * BYTES <= node.budget, "node {} holds {held} experts, budget {}", node.id, node.budget);
        }
    }

    /// The first `hot` experts 50x hotter than the Zipf-like tail.
    fn skewed(experts: &[ExpertKey], hot: usize) -> BTreeMap<ExpertKey, f64> {
        let heat = |i: usize| if i < hot { 50.0 } else { 1.0 + 4.0 / (i as f64 + 1.0) };
        experts.iter().enumerate().map(|(i, k)| (*k, heat(i))).collect()
    }

    #[test]
    fn same_input_same_plan_whatever_the_order() {
        let (e, n) = (experts(2, 16), nodes(&[1, 2, 3, 4], 20 * BYTES));
        let (load, empty) = (skewed(&e, 3), Assignment::new());
        let first = plan(&input(&e, &n, &empty, &load)).unwrap();
        assert_valid(&first, &e, &n);
        assert_eq!(plan(&input(&e, &n, &empty, &load)).unwrap(), first);
        let (mut e_rev, mut n_rev) = (e.clone(), n.clone());
        e_rev.reverse();
        n_rev.reverse();
        assert_eq!(plan(&input(&e_rev, &n_rev, &empty, &load)).unwrap(), first);
    }

    #[test]
    fn dead_node_replicas_move_to_survivors_and_the_rest_stays() {
        let (e, n, load) = (experts(2, 12), nodes(&[1, 2, 3, 4], u64::MAX), BTreeMap::new());
        let before = plan(&PlanInput { max_moves: 0, ..input(&e, &n, &Assignment::new(), &load) }).unwrap();
        let lost = before.values().filter(|r| r.contains(&3)).count();
        assert!(lost > 0);
        let survivors = nodes(&[1, 2, 4], u64::MAX);
        let balanced = plan(&input(&e, &survivors, &before, &load)).unwrap();
        assert_valid(&balanced, &e, &survivors);
        assert!(balanced.values().all(|r| r.len() >= 2), "{balanced:?}");
        // Without balancing, only node 3's replicas are re-placed.
        let after = plan(&PlanInput { max_moves: 0, ..input(&e, &survivors, &before, &load) }).unwrap();
        assert_valid(&after, &e, &survivors);
        for (key, old) in &before {
            let new = &after[key];
            assert!(new.len() == 2 && old.iter().all(|n| *n == 3 || new.contains(n)), "{key:?}: {old:?} -> {new:?}");
        }
        assert_eq!(added_replicas(&before, &after), lost);
        let alone = nodes(&[4], u64::MAX);
        assert!(plan(&input(&e, &alone, &after, &load)).unwrap().values().all(|r| r == &vec![4]));
    }

    #[test]
    fn min_replicas_where_memory_allows_and_budgets_hold() {
        let (e, load, empty) = (experts(1, 8), BTreeMap::new(), Assignment::new());
        let roomy = nodes(&[1, 2, 3], 6 * BYTES);
        let two = plan(&input(&e, &roomy, &empty, &load)).unwrap();
        assert_valid(&two, &e, &roomy);
        assert!(two.values().all(|r| r.len() >= 2), "{two:?}");
        // 12 slots for 16 wanted replicas: every expert once, four twice, no slot left idle.
        let tight = nodes(&[1, 2, 3], 4 * BYTES);
        let a = plan(&input(&e, &tight, &empty, &load)).unwrap();
        assert_valid(&a, &e, &tight);
        assert_eq!(a.values().map(Vec::len).sum::<usize>(), 12);
        // Budgets shrink to 9 slots: second replicas go, only ones stay, nothing new is loaded.
        let shrunk = nodes(&[1, 2, 3], 3 * BYTES);
        let b = plan(&input(&e, &shrunk, &two, &load)).unwrap();
        assert_valid(&b, &e, &shrunk);
        assert_eq!(b.values().map(Vec::len).sum::<usize>(), 9);
        assert_eq!(added_replicas(&two, &b), 0);
        // A shrunk node whose experts have no other replica hands the coolest on.
        let current: Assignment = [((0, 0), vec![1]), ((0, 1), vec![1]), ((0, 2), vec![2])].into();
        let e = experts(1, 3);
        let (skew, shrunk) = (skewed(&e, 1), [nodes(&[1], BYTES), nodes(&[2], 3 * BYTES)].concat());
        let a = plan(&PlanInput { min_replicas: 1, max_moves: 0, ..input(&e, &shrunk, &current, &skew) }).unwrap();
        assert_valid(&a, &e, &shrunk);
        assert_eq!((&a[&(0, 0)], &a[&(0, 1)]), (&vec![1], &vec![2]), "{a:?}");
        // Capped at the node count.
        let one = nodes(&[7], u64::MAX);
        let a = plan(&PlanInput { min_replicas: 3, ..input(&e, &one, &empty, &load) }).unwrap();
        assert!(a.values().all(|r| r == &vec![7]));
    }

    #[test]
    fn no_room_and_no_nodes_are_errors() {
        let (e, load, empty) = (experts(1, 10), BTreeMap::new(), Assignment::new());
        let small = [NodeCapacity { id: 1, budget: 4 * BYTES }, NodeCapacity { id: 2, budget: 5 * BYTES + 3 }];
        let err = plan(&input(&e, &small, &empty, &load)).unwrap_err();
        let PlanError::NoRoom { expert_bytes, free, .. } = &err else { panic!("{err:?}") };
        assert_eq!((*expert_bytes, free.as_str()), (BYTES, "1=0, 2=3"));
        assert!(err.to_string().contains("fits on no node"), "{err}");
        assert_eq!(plan(&input(&e, &[], &empty, &load)), Err(PlanError::NoNodes));
        // Nodes 3 and 4 die while 1 and 2 are full: second replicas make room, it is no error.
        let current: Assignment = [[1, 2], [1, 2], [1, 3], [2, 4], [3, 4], [3, 4]]
            .into_iter()
            .enumerate()
            .map(|(i, r)| ((0, i as u32), r.to_vec()))
            .collect();
        let (e, full) = (experts(1, 6), nodes(&[1, 2], 3 * BYTES));
        let a = plan(&input(&e, &full, &current, &load)).unwrap();
        assert_valid(&a, &e, &full);
        assert!(a.values().all(|r| r.len() == 1), "{a:?}");
        assert_eq!(plan(&input(&[], &[], &empty, &load)), Ok(Assignment::new()));
    }

    #[test]
    fn skewed_load_spreads_and_hot_experts_gain_replicas() {
        let (e, n) = (experts(1, 32), nodes(&[1, 2, 3, 4], 24 * BYTES));
        let node_ids = ids(&n);
        // (hot experts, replicas now, experts that must gain one): two hot singles must split to
        // bring the peak near the mean; of three hot pairs the balancer splits what helps.
        for (hot, width, gaining) in [(2, 1, 2), (3, 2, 1)] {
            let load = skewed(&e, hot);
            let current = round_robin(&e, &n, width);
            let after =
                plan(&PlanInput { min_replicas: width, max_moves: 32, ..input(&e, &n, &current, &load) }).unwrap();
            assert_valid(&after, &e, &n);
            let (before, balanced) = (imbalance(&current, &load, &node_ids), imbalance(&after, &load, &node_ids));
            assert!(before > 1.2 && balanced < 1.05, "imbalance {before} -> {balanced}");
            assert!(e[..hot].iter().all(|k| after[k].len() >= width), "{after:?}");
            assert!(e[..hot].iter().filter(|k| after[k].len() > width).count() >= gaining, "{after:?}");
        }
    }

    #[test]
    fn balanced_input_is_left_alone_and_plans_are_fixed_points() {
        let (e, n, load) = (experts(2, 8), nodes(&[1, 2, 3, 4], 8 * BYTES), BTreeMap::new());
        let current = round_robin(&e, &n, 2);
        let a = plan(&input(&e, &n, &current, &load)).unwrap();
        assert_eq!(a, current);
        assert_eq!(added_replicas(&current, &a), 0);
        // Within 1% of even is even enough: moving (0, 2) would even it, at the cost of a load.
        let near: Assignment =
            [((0, 0), vec![1]), ((0, 1), vec![1]), ((0, 2), vec![1]), ((0, 3), vec![2]), ((0, 4), vec![2])].into();
        let near_load = [((0, 0), 50.0), ((0, 1), 50.0), ((0, 2), 0.5), ((0, 3), 50.0), ((0, 4), 49.5)].into();
        let two = nodes(&[1, 2], u64::MAX);
        let e5 = experts(1, 5);
        assert_eq!(plan(&PlanInput { min_replicas: 1, ..input(&e5, &two, &near, &near_load) }), Ok(near));
        // Planning from a plan changes nothing, also where balancing leaves room for a replica.
        let skew = skewed(&e, 3);
        let once = plan(&input(&e, &n, &Assignment::new(), &skew)).unwrap();
        assert_eq!(plan(&input(&e, &n, &once, &skew)).unwrap(), once);
        let tight = [nodes(&[1, 2], 3 * BYTES), nodes(&[3], 2 * BYTES)].concat();
        let current: Assignment =
            [((0, 0), vec![1, 3]), ((0, 1), vec![2, 3]), ((0, 2), vec![1]), ((0, 3), vec![3])].into();
        let load = [((0, 0), 4.0), ((0, 1), 6.0), ((0, 2), 1.0), ((0, 3), 8.0)].into();
        let e4 = experts(1, 4);
        let once = plan(&input(&e4, &tight, &current, &load)).unwrap();
        assert!(once.values().all(|r| r.len() == 2), "{once:?}");
        assert_eq!(plan(&input(&e4, &tight, &once, &load)).unwrap(), once);
    }

    #[test]
    fn joining_node_takes_load() {
        let (e, old) = (experts(1, 12), nodes(&[1, 2, 3], 8 * BYTES));
        let joined = [old.clone(), nodes(&[9], 8 * BYTES)].concat();
        for load in [BTreeMap::new(), skewed(&e, 3)] {
            let before = plan(&input(&e, &old, &Assignment::new(), &load)).unwrap();
            let after = plan(&input(&e, &joined, &before, &load)).unwrap();
            assert_valid(&after, &e, &joined);
            let loads = node_loads(&after, &load, &ids(&joined));
            assert!(loads[&9] > 0.0, "joining node idle: {loads:?}");
            assert!(imbalance(&after, &load, &ids(&joined)) < imbalance(&before, &load, &ids(&joined)));
        }
    }

    #[test]
    fn max_moves_bounds_balancing() {
        let (e, n) = (experts(1, 32), nodes(&[1, 2, 3, 4], u64::MAX));
        let load = skewed(&e, 3);
        let current: Assignment = e.iter().map(|k| (*k, vec![1])).collect();
        let run = |max_moves| plan(&PlanInput { min_replicas: 1, max_moves, ..input(&e, &n, &current, &load) });
        assert_eq!(run(0), Ok(current.clone()));
        // Each action loads exactly one replica somewhere new (a replicate, or a move).
        for max_moves in [1, 3] {
            assert_eq!(added_replicas(&current, &run(max_moves).unwrap()), max_moves);
        }
        assert!(added_replicas(&current, &run(100).unwrap()) > 3);
    }

    #[test]
    fn node_loads_and_imbalance_by_hand() {
        let a: Assignment = [((0, 0), vec![1, 2]), ((0, 1), vec![2]), ((0, 2), vec![1, 2, 5])].into();
        let load: BTreeMap<ExpertKey, f64> = [((0, 0), 4.0), ((0, 2), 6.0)].into();
        // (0,0): 2 on 1 and 2; (0,1) missing → 1.0 on 2; (0,2): 2 each on 1, 2 and 5 (not asked for).
        assert_eq!(node_loads(&a, &load, &[1, 2, 3]), [(1, 4.0), (2, 5.0), (3, 0.0)].into());
        assert!((imbalance(&a, &load, &[1, 2, 3]) - 5.0 / 3.0).abs() < 1e-12, "max 5 / mean 3");
        assert_eq!(imbalance(&a, &load, &[]), 1.0);
        assert_eq!(imbalance(&Assignment::new(), &load, &[1, 2]), 1.0);
        assert_eq!(imbalance(&a, &load, &[1]), 1.0);
        let b: Assignment = [((0, 0), vec![1, 3]), ((0, 1), vec![2]), ((0, 3), vec![4])].into();
        assert_eq!(added_replicas(&a, &b), 2);
        assert_eq!(added_replicas(&b, &b), 0);
    }
}
