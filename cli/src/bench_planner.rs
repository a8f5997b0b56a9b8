//! `switchyard bench planner`: how long the coordinators' placement planner takes at
//! datacenter size (by default 61 layers × 256 experts over 32 nodes: DeepSeek-V3 with every
//! layer counted as MoE),
//! against the raft election timeout. The leader plans on its raft thread, so a plan that
//! took longer than an election timeout would let the followers depose it.
//!
//! Each situation the leader plans for is timed: the first placement, planning again from a
//! plan (nothing changes), a node gone, a node joined, and a skewed load to balance.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use switchyard_coordinator::node::{Policy, TICK};
use switchyard_coordinator::peer::ELECTION_TICKS;
use switchyard_coordinator::planner::{self, Assignment, ExpertKey, NodeCapacity, PlanInput};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Layers with routed experts.
    #[arg(long, default_value_t = 61)]
    layers: u32,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 256)]
    experts: u32,
    /// Expert nodes.
    #[arg(long, default_value_t = 32)]
    nodes: u64,
    /// Bytes of one expert (default: one DeepSeek-V3 FP8 expert, 3 × 7168 × 2048 bytes and
    /// its 3 × 56 × 16 block scales).
    #[arg(long, default_value_t = 44_050_944)]
    expert_bytes: u64,
    /// Each node's expert memory as a multiple of its share of all the replicas the policy
    /// asks for.
    #[arg(long, default_value_t = 1.25)]
    headroom: f64,
    /// Zipf exponent of the skewed load.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// Plans timed per situation (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.layers == 0 || args.experts == 0 || args.nodes == 0 || args.repeat == 0 {
        bail!("--layers, --experts, --nodes and --repeat must be at least 1");
    }
    if !(args.headroom.is_finite() && args.headroom >= 1.0) {
        bail!("--headroom must be at least 1.0, got {}", args.headroom);
    }
    let policy = Policy::default();
    let experts: Vec<ExpertKey> = (0..args.layers).flat_map(|l| (0..args.experts).map(move |e| (l, e))).collect();
    let replicas = experts.len() as f64 * policy.min_replicas.min(args.nodes as usize) as f64;
    let budget = ((replicas / args.nodes as f64 * args.headroom).ceil() as u64).saturating_mul(args.expert_bytes);
    let nodes: Vec<NodeCapacity> = (1..=args.nodes).map(|id| NodeCapacity { id, budget }).collect();
    let uniform = BTreeMap::new();
    // Expert e of every layer draws load ∝ 1/rank^s, its rank a fixed shuffle of the ids.
    let skewed: BTreeMap<ExpertKey, f64> = experts
        .iter()
        .map(|&(l, e)| {
            let rank = (e as u64 * 2_654_435_761 + l as u64 * 40_503) % args.experts as u64 + 1;
            ((l, e), 1000.0 / (rank as f64).powf(args.zipf))
        })
        .collect();
    let all_proven: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
    let empty = Assignment::new();
    let base = PlanInput {
        experts: &experts,
        expert_bytes: args.expert_bytes,
        nodes: &nodes,
        current: &empty,
        load: &uniform,
        min_replicas: policy.min_replicas,
        max_moves: policy.max_moves,
        proven: &planner::NO_PROVEN_NODES,
    };
    let timed = |what: &str, input: &PlanInput| -> Result<(Duration, Assignment)> {
        let mut times = Vec::with_capacity(args.repeat);
        let mut plan = Assignment::new();
        for _ in 0..args.repeat {
            let start = Instant::now();
            plan = planner::plan(input).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            times.push(start.elapsed());
        }
        times.sort();
        Ok((times[times.len() / 2], plan))
    };

    let (first, placed) = timed("first placement", &base)?;
    let (again, _) = timed("planning from a plan", &PlanInput { current: &placed, ..base })?;
    let (gone, _) = timed("a node gone", &PlanInput { nodes: &nodes[1..], current: &placed, ..base })?;
    let mut joined_nodes = nodes.clone();
    joined_nodes.push(NodeCapacity { id: args.nodes + 1, budget });
    let (joined, _) = timed("a node joined", &PlanInput { nodes: &joined_nodes, current: &placed, ..base })?;
    let skew = PlanInput { current: &placed, load: &skewed, proven: &all_proven, ..base };
    let (balanced, _) = timed("balancing a skewed load", &skew)?;

    let election = TICK * ELECTION_TICKS as u32;
    println!(
        "placement planner: {} layers x {} experts = {} experts, {} nodes, {} replicas each, \
         budgets {:.2}x the replicas' share, median of {}",
        args.layers,
        args.experts,
        experts.len(),
        args.nodes,
        policy.min_replicas,
        args.headroom,
        args.repeat
    );
    println!();
    println!("| {:<42} |   plan ms | of the election timeout ({} ms) |", "situation", election.as_millis());
    println!("|{}|----------:|---------------------------------:|", "-".repeat(44));
    for (what, t) in [
        ("first placement", first),
        ("planning from a plan (no change)", again),
        ("a node gone (its replicas re-placed)", gone),
        ("a node joined", joined),
        (&format!("skewed load (Zipf {}), {} moves at most", args.zipf, policy.max_moves) as &str, balanced),
    ] {
        println!(
            "| {what:<42} | {:>9.1} | {:>31.1}% |",
            t.as_secs_f64() * 1e3,
            100.0 * t.as_secs_f64() / election.as_secs_f64()
        );
    }
    Ok(())
}
