//! [`RemoteExperts`]: the [`Experts`] backend that runs a MoE layer's experts on expert
//! nodes. Per layer it picks a replica for every routed expert (spreading rows over the
//! replicas), sends each node one dispatch with the rows that need any of its experts, and
//! adds the partial sums. A node that times out, vanishes, no longer holds an expert or runs
//! out of device memory gets its share re-sent to another replica; only an invalid dispatch,
//! or an expert without a reachable replica, fails the layer.
//!
//! A node on probation (new to the router, see [`crate::cluster::Trust`]) answers for an
//! expert only where no proven replica holds it; meanwhile a canary check sends it and a
//! proven replica the same rows of one expert and compares the partial sums. Agreeing checks
//! prove it; one disagreement refuses it for good.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use switchyard_kernels::Tensor;
use switchyard_model::layers::Exec;
use switchyard_model::moe::{Assignment, Experts};
use switchyard_model::{ModelError, Result};
use switchyard_proto::tensor;
use switchyard_proto::v1::{DispatchRequest, dispatch_response};
use tokio::runtime::Handle;
use tonic::Code;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::cluster::{Cluster, Node, Trust};

/// How often a step with an expert that has no reachable replica looks again, while the
/// coordinators re-place it.
const REPLAN_POLL: Duration = Duration::from_millis(20);

/// How far a node on probation may differ from a proven replica (the largest difference over
/// the largest magnitude, plus one): summation orders differ between devices, wrong answers
/// differ by far more.
const CANARY_TOLERANCE: f32 = 1e-2;

/// Round trips of whole layers (all nodes of one layer, in parallel).
#[derive(Default)]
pub struct DispatchStats {
    pub layers: AtomicU64,
    /// From sending a layer's dispatches to holding every partial sum.
    pub micros: AtomicU64,
    /// The slowest node's compute time of each layer, summed.
    pub compute_micros: AtomicU64,
}

/// A reading of [`DispatchStats`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsSnapshot {
    pub layers: u64,
    pub micros: u64,
    pub compute_micros: u64,
}

impl StatsSnapshot {
    /// Layers, and mean round-trip and compute microseconds per layer, since `earlier`.
    pub fn since(&self, earlier: &StatsSnapshot) -> (f64, f64, f64) {
        let layers = (self.layers - earlier.layers).max(1) as f64;
        (layers, (self.micros - earlier.micros) as f64, (self.compute_micros - earlier.compute_micros) as f64)
    }
}

impl DispatchStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            layers: self.layers.load(Ordering::Relaxed),
            micros: self.micros.load(Ordering::Relaxed),
            compute_micros: self.compute_micros.load(Ordering::Relaxed),
        }
    }
}

pub struct RemoteExperts {
    cluster: Arc<Cluster>,
    runtime: Handle,
    timeout: Duration,
    pub stats: Arc<DispatchStats>,
    /// The routed-tokens counter of each layer and expert (`layer * experts + expert`),
    /// registered the first time it counts.
    routed: Vec<OnceLock<::metrics::Counter>>,
}

/// One node's share of a layer: its rows (global token indices, ascending) and routes.
struct Share {
    tokens: Vec<u32>,
    routes: Vec<Assignment>,
}

impl RemoteExperts {
    /// Dispatches from any non-runtime thread through `runtime`.
    pub fn new(cluster: Arc<Cluster>, runtime: Handle, timeout: Duration) -> Self {
        let layers = cluster.moe_layers.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        let routed = (0..layers * cluster.num_experts).map(|_| OnceLock::new()).collect();
        RemoteExperts { cluster, runtime, timeout, stats: Arc::default(), routed }
    }

    /// Chooses a node for every expert in `todo`: a reachable replica not in `excluded`,
    /// the one with the fewest rows so far; grouped into one share per node.
    fn plan(
        &self,
        nodes: &[Arc<Node>],
        layer: usize,
        todo: &[Assignment],
        excluded: &[(u32, usize)],
    ) -> Result<BTreeMap<usize, Vec<Assignment>>> {
        let mut by_expert: BTreeMap<u32, Vec<Assignment>> = BTreeMap::new();
        for a in todo {
            by_expert.entry(a.expert).or_default().push(*a);
        }
        // Each node's state read once for the whole layer.
        let serving: Vec<Option<Vec<u32>>> = nodes.iter().map(|n| n.serving_experts(layer as u32)).collect();
        let proven: Vec<bool> = nodes.iter().map(|n| n.trust() == Trust::Proven).collect();
        let mut load = vec![0usize; nodes.len()];
        let mut plan: BTreeMap<usize, Vec<Assignment>> = BTreeMap::new();
        // Busiest experts first (longest-processing-time order), so the big shares spread and
        // the small ones fill the gaps.
        let mut by_expert: Vec<(u32, Vec<Assignment>)> = by_expert.into_iter().collect();
        by_expert.sort_by_key(|(expert, routes)| (std::cmp::Reverse(routes.len()), *expert));
        let reachable = serving.iter().filter(|s| s.is_some()).count().max(1);
        let fair_share = todo.len().div_ceil(reachable);
        for (expert, routes) in by_expert {
            let mut candidates: Vec<usize> = (0..nodes.len())
                .filter(|&n| {
                    serving[n].as_ref().is_some_and(|held| held.contains(&expert)) && !excluded.contains(&(expert, n))
                })
                .collect();
            if candidates.is_empty() {
                return Err(self.unavailable(nodes, layer, expert));
            }
            // Nodes on probation answer only where no proven replica can.
            if candidates.iter().any(|&n| proven[n]) {
                candidates.retain(|&n| proven[n]);
            }
            // Rotate ties by expert so equal replicas share the experts.
            let rotate = |n: usize| (n + nodes.len() - expert as usize % nodes.len()) % nodes.len();
            candidates.sort_by_key(|&n| (load[n], rotate(n)));
            // A hot expert with more rows than a node's fair share of the layer is split over
            // its replicas; the rest go whole to the least loaded one.
            let parts =
                if routes.len() > fair_share { candidates.len().min(routes.len().div_ceil(fair_share)) } else { 1 };
            let per_part = routes.len().div_ceil(parts);
            for (&n, chunk) in candidates.iter().zip(routes.chunks(per_part)) {
                load[n] += chunk.len();
                plan.entry(n).or_default().extend_from_slice(chunk);
            }
        }
        Ok(plan)
    }

    /// Starts a canary check of each node on probation that holds one of this layer's routed
    /// experts beside a proven replica (one check per node at a time): both get that expert's
    /// rows, and their partial sums are compared off the step's path.
    fn check_probation(
        &self,
        nodes: &Arc<Vec<Arc<Node>>>,
        layer: usize,
        x: &[f32],
        hidden: usize,
        routes: &[Assignment],
        epoch: u64,
    ) {
        // Usually no node is on probation: then this is one atomic load per node.
        let idle = |n: &&Arc<Node>| n.trust() == Trust::OnProbation && !n.checking.load(Ordering::Acquire);
        if !nodes.iter().any(|n| idle(&n)) {
            return;
        }
        let held: Vec<Vec<u32>> = nodes.iter().map(|n| n.serving_experts(layer as u32).unwrap_or_default()).collect();
        let proven: Vec<usize> = (0..nodes.len()).filter(|&t| nodes[t].trust() == Trust::Proven).collect();
        for (u, node) in nodes.iter().enumerate().filter(|(_, n)| idle(n)) {
            let pair = routes.iter().map(|a| a.expert).filter(|e| held[u].contains(e)).find_map(|e| {
                let reference = proven.iter().find(|&&t| held[t].contains(&e))?;
                Some((e, nodes[*reference].clone()))
            });
            let Some((expert, reference)) = pair else { continue };
            if node.checking.swap(true, Ordering::AcqRel) {
                continue;
            }
            let sample = share(routes.iter().filter(|a| a.expert == expert).copied().collect());
            let req = request(x, hidden, &sample, epoch, layer);
            let (cluster, node, timeout) = (self.cluster.clone(), node.clone(), self.timeout);
            self.runtime.spawn(async move {
                let (got, want) = tokio::join!(node.dispatch(req.clone(), timeout), reference.dispatch(req, timeout));
                let sums = |answer: Result<switchyard_proto::v1::DispatchResponse, tonic::Status>| match answer
                    .ok()?
                    .result?
                {
                    dispatch_response::Result::Partial(t) => tensor::to_f32(Some(&t), "partial sums", hidden).ok(),
                    dispatch_response::Result::Error(_) => None,
                };
                // An answer missing on either side is no evidence either way.
                if let (Some((got, _)), Some((want, _))) = (sums(got.1), sums(want.1)) {
                    match disagreement(&got, &want) {
                        Some(d) if d <= CANARY_TOLERANCE => node.passed_check(cluster.canary_checks),
                        d => cluster.refuse(
                            &node,
                            format!(
                                "its partial sums for layer {layer} expert {expert} differ from {}'s ({})",
                                reference.address,
                                d.map_or("a different number of rows".into(), |d| format!(
                                    "relative difference {d:.2e}"
                                ))
                            ),
                        ),
                    }
                }
                node.checking.store(false, Ordering::Release);
            });
        }
    }

    fn unavailable(&self, nodes: &[Arc<Node>], layer: usize, expert: u32) -> ModelError {
        let holders: Vec<String> = nodes
            .iter()
            .filter(|n| n.holds(layer as u32, expert))
            .map(|n| {
                let v = n.view();
                let state = if v.serving { "serving".into() } else { v.last_error.unwrap_or_else(|| "down".into()) };
                format!("{} ({state})", v.address)
            })
            .collect();
        let reason = if holders.is_empty() {
            "no expert node holds it".to_string()
        } else {
            format!("no reachable replica; holders: {}", holders.join(", "))
        };
        ModelError::ExpertUnavailable { layer, expert: expert as usize, reason }
    }

    async fn run_layer(&self, layer: usize, x: &[f32], hidden: usize, assignments: &[Assignment]) -> Result<Vec<f32>> {
        let rows = x.len() / hidden;
        let mut out = vec![0.0f32; rows * hidden];
        let mut todo = assignments.to_vec();
        let mut excluded: Vec<(u32, usize)> = Vec::new();
        let mut partials: Vec<(usize, Share, Vec<f32>)> = Vec::new();
        let mut slowest_compute = 0u64;
        let start = Instant::now();
        let mut nodes = self.cluster.nodes();
        let mut epoch = self.cluster.epoch();
        self.count_routed(layer, &todo);
        if self.cluster.canary_checks > 0 {
            self.check_probation(&nodes, layer, x, hidden, &todo, epoch);
        }
        while !todo.is_empty() {
            let plan = match self.plan(&nodes, layer, &todo, &excluded) {
                Ok(plan) => plan,
                // The coordinators re-place the experts of a dead node: wait for the new epoch
                // (or for the router to reach a node it adds) rather than fail the step.
                Err(e) if self.cluster.coordinated && start.elapsed() < self.timeout => {
                    let wait = (self.timeout - start.elapsed()).min(REPLAN_POLL);
                    if self.cluster.epoch_changed(epoch, wait).await {
                        tracing::info!(layer, "retrying on the new placement epoch after: {e}");
                    }
                    epoch = self.cluster.epoch();
                    nodes = self.cluster.nodes();
                    excluded.clear();
                    continue;
                }
                Err(e) => return Err(e),
            };
            todo.clear();
            // Driven together on this thread: no task per node.
            let mut calls = FuturesUnordered::new();
            for (n, routes) in plan {
                let share = share(routes);
                let mut req = request(x, hidden, &share, epoch, layer);
                let node = nodes[n].clone();
                let timeout = self.timeout;
                let span = tracing::info_span!(
                    "expert_dispatch",
                    otel.kind = "client",
                    node = %node.address,
                    layer,
                    tokens = share.tokens.len()
                );
                let cx = span.context();
                opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut req.trace_context));
                calls.push(
                    async move {
                        let sent = Instant::now();
                        let (stream, answer) = node.dispatch(req, timeout).await;
                        node.latency.record(sent.elapsed().as_secs_f64());
                        (n, share, stream, answer)
                    }
                    .instrument(span),
                );
            }
            while let Some((n, share, stream, answer)) = calls.next().await {
                let node = &nodes[n];
                let failure = match answer {
                    Ok(resp) => match resp.result {
                        Some(dispatch_response::Result::Partial(t)) => {
                            slowest_compute = slowest_compute.max(resp.compute_micros);
                            match tensor::to_f32(Some(&t), "partial sums", hidden) {
                                Ok((values, r)) if r == share.tokens.len() => {
                                    partials.push((n, share, values));
                                    continue;
                                }
                                Ok((_, r)) => tonic::Status::internal(format!(
                                    "answered {r} rows for {} sent",
                                    share.tokens.len()
                                )),
                                Err(e) => tonic::Status::internal(e.to_string()),
                            }
                        }
                        Some(dispatch_response::Result::Error(e)) => tonic::Status::new(Code::from(e.code), e.message),
                        None => tonic::Status::internal("empty dispatch response"),
                    },
                    Err(status) => status,
                };
                ::metrics::counter!(crate::metric_names::DISPATCH_RETRIES, "code" => code_name(failure.code()))
                    .increment(1);
                match failure.code() {
                    // The dispatch itself is wrong: every replica would refuse it.
                    Code::InvalidArgument => {
                        return Err(ModelError::Dispatch {
                            layer,
                            reason: format!("expert node {}: {}", node.address, failure.message()),
                        });
                    }
                    // Gone, hung, failed or shutting down: the node is out until it reconnects.
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                        node.fail(stream, failure.message())
                    }
                    // This node cannot do this share (it no longer holds an expert, its device
                    // is out of memory, or an error of its own): another replica may.
                    _ => tracing::warn!(node = %node.address, layer, "{}", failure.message()),
                }
                excluded.extend(share.routes.iter().map(|a| (a.expert, n)));
                todo.extend(share.routes);
            }
        }
        // Add the partial sums in node order, so the sum does not depend on arrival order.
        partials.sort_by_key(|(n, ..)| *n);
        for (_, share, values) in partials {
            for (&t, row) in share.tokens.iter().zip(values.chunks_exact(hidden)) {
                for (o, v) in out[t as usize * hidden..(t as usize + 1) * hidden].iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        self.stats.layers.fetch_add(1, Ordering::Relaxed);
        self.stats.micros.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.compute_micros.fetch_add(slowest_compute, Ordering::Relaxed);
        Ok(out)
    }
}

impl RemoteExperts {
    /// Tokens routed to each expert of `layer` (for the balancer and the metrics), counted
    /// once per layer pass.
    fn count_routed(&self, layer: usize, routes: &[Assignment]) {
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for a in routes {
            *counts.entry(a.expert).or_default() += 1;
        }
        if self.cluster.coordinated {
            self.cluster.load.expert_tokens(layer as u32, &counts);
        }
        for (expert, n) in counts {
            let counter = || ::metrics::counter!(crate::metric_names::ROUTED_TOKENS, "layer" => layer.to_string(), "expert" => expert.to_string());
            match self.routed.get(layer * self.cluster.num_experts + expert as usize) {
                Some(slot) => slot.get_or_init(counter).increment(n),
                None => counter().increment(n),
            }
        }
    }
}

/// The dispatch of `share`'s rows of `x` and its routes.
fn request(x: &[f32], hidden: usize, share: &Share, epoch: u64, layer: usize) -> DispatchRequest {
    // `share.tokens` is sorted: a route's row in the message is its token's rank.
    let local = |t: u32| share.tokens.binary_search(&t).expect("every routed token is in the share") as u32;
    DispatchRequest {
        id: 0,
        epoch,
        layer: layer as u32,
        activations: Some(tensor::from_rows(x, hidden, &share.tokens)),
        tokens: share.routes.iter().map(|a| local(a.token)).collect(),
        experts: share.routes.iter().map(|a| a.expert).collect(),
        weights: share.routes.iter().map(|a| a.weight).collect(),
        trace_context: Default::default(),
    }
}

/// The largest difference between `got` and `want` over one plus `want`'s largest magnitude;
/// `None` when their lengths differ. A NaN anywhere counts as infinitely different.
fn disagreement(got: &[f32], want: &[f32]) -> Option<f32> {
    if got.len() != want.len() {
        return None;
    }
    let scale = 1.0 + want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).fold(0.0f32, |m, (a, b)| {
        let d = (a - b).abs();
        if d.is_nan() { f32::INFINITY } else { m.max(d) }
    });
    Some(worst / scale)
}

/// The distinct rows of `routes` (ascending) and the routes themselves.
fn share(routes: Vec<Assignment>) -> Share {
    let mut tokens: Vec<u32> = routes.iter().map(|a| a.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    Share { tokens, routes }
}

/// A status code as a metric label.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::NotFound => "not_found",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        _ => "other",
    }
}

impl Experts for RemoteExperts {
    fn run(&self, exec: &Exec, layer: usize, x: &Tensor, assignments: &[Assignment]) -> Result<Tensor> {
        let ops = exec.ops();
        let hidden = x.cols();
        let downloaded;
        let host = match x.as_host() {
            Some(host) => host,
            None => {
                downloaded = ops.download(x)?;
                &downloaded
            }
        };
        let out = self.runtime.block_on(self.run_layer(layer, host, hidden, assignments))?;
        Ok(match ops.device() {
            switchyard_kernels::Device::Cpu => Tensor::host(x.rows(), hidden, out)?,
            switchyard_kernels::Device::Cuda(_) => ops.upload(&out, x.rows(), hidden)?,
        })
    }
}
