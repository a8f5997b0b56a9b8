//! [`Cluster`]: the router's links to its expert nodes. Each node has one long-lived
//! bidirectional dispatch stream; a supervisor task per node (re)connects it and marks it
//! unreachable when the stream breaks.
//!
//! What each node holds comes from one of two places: with `--expert-nodes`, from each node's
//! `Status` (epoch 1); with `--coordinators`, from the placement the coordinators publish —
//! the router follows its active epoch, connecting to nodes the epoch adds before switching.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use switchyard_model::ModelSpec;
use switchyard_proto::tls::{Role, Security};
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{DispatchRequest, DispatchResponse, ExpertId, NodeStatus, StatusRequest};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::RouterError;

/// How long to wait between attempts to reach an unreachable node.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<DispatchResponse, Status>>>>>;

/// An open dispatch stream.
struct Stream {
    requests: mpsc::Sender<DispatchRequest>,
    pending: Pending,
    /// Tells the supervisor this stream was failed by a dispatch (timeout) and must go.
    broken: Arc<Notify>,
    /// Which connection of the node this is (1, 2, …), so a failure seen on an old stream
    /// never tears down its replacement.
    generation: u64,
}

#[derive(Default)]
struct Link {
    stream: Option<Stream>,
    /// What the node said it holds at its last (re)connection.
    holds: Vec<ExpertId>,
    pid: u32,
    last_error: Option<String>,
}

/// One expert node as the router sees it.
pub struct Node {
    pub address: String,
    /// How its connection is secured (it must present an expert-node certificate).
    security: Security,
    /// The coordinators' id for it (0 without coordinators).
    pub id: AtomicU64,
    /// Set when the placement no longer names the node: its supervisor stops.
    retired: AtomicBool,
    link: Mutex<Link>,
    next_id: AtomicU64,
    /// Streams opened so far.
    generations: AtomicU64,
    dispatches: AtomicU64,
    round_trip_micros: AtomicU64,
    /// Rows answered since the last load report to the coordinators.
    unreported_rows: AtomicU64,
    /// How far its answers are trusted: a [`Trust`] as a byte, read on every layer's plan.
    trust: AtomicU8,
    /// Canary checks its answers passed so far.
    checks_passed: AtomicU64,
    /// A canary check of it is under way (one at a time).
    pub checking: AtomicBool,
    /// Its dispatch round trips, as a metric (registered once, not per dispatch).
    pub latency: metrics::Histogram,
}

/// How far the router trusts a node's answers.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
pub enum Trust {
    /// New to this router: another replica answers for it while a sample of its answers is
    /// compared with that replica's.
    OnProbation = 0,
    /// Its answers are used.
    Proven = 1,
    /// Its answers disagreed with another replica's: it gets no dispatches (why: its
    /// `last_error`).
    Refused = 2,
}

/// A snapshot of one node for `ClusterStatus`.
pub struct NodeView {
    pub address: String,
    pub serving: bool,
    pub holds: Vec<ExpertId>,
    pub last_error: Option<String>,
    pub dispatches: u64,
    pub mean_round_trip_micros: u64,
    pub pid: u32,
}

impl Node {
    /// A node whose answers are used from the start (`proven`) or only once checked.
    fn new(address: &str, proven: bool, security: Security) -> Self {
        Node {
            address: address.to_string(),
            security,
            id: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            link: Mutex::new(Link::default()),
            next_id: AtomicU64::new(0),
            generations: AtomicU64::new(0),
            dispatches: AtomicU64::new(0),
            round_trip_micros: AtomicU64::new(0),
            unreported_rows: AtomicU64::new(0),
            trust: AtomicU8::new(if proven { Trust::Proven } else { Trust::OnProbation } as u8),
            checks_passed: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            latency: metrics::histogram!(crate::metric_names::DISPATCH_LATENCY, "node" => address.to_string()),
        }
    }

    pub fn trust(&self) -> Trust {
        match self.trust.load(Ordering::Acquire) {
            0 => Trust::OnProbation,
            1 => Trust::Proven,
            _ => Trust::Refused,
        }
    }

    /// Records a canary check its answer passed; after `needed` of them a node on probation is
    /// proven (a refused one stays refused).
    pub fn passed_check(&self, needed: u64) {
        let passed = self.checks_passed.fetch_add(1, Ordering::Relaxed) + 1;
        let (from, to) = (Trust::OnProbation as u8, Trust::Proven as u8);
        if passed >= needed && self.trust.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            tracing::info!(node = %self.address, checks = passed, "expert node's answers agree with other replicas: it now serves alone");
        }
    }

    /// Stops using the node for good: its answers are wrong.
    pub fn refuse(&self, why: String) {
        tracing::error!(node = %self.address, "expert node refused: {why}");
        self.link.lock().expect("link lock").last_error = Some(why);
        self.trust.store(Trust::Refused as u8, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        self.link.lock().expect("link lock").stream.is_some()
    }

    /// The experts of `layer` this node holds, if it is reachable now (one lock, for planning
    /// a whole layer).
    pub fn serving_experts(&self, layer: u32) -> Option<Vec<u32>> {
        if self.trust() == Trust::Refused {
            return None;
        }
        let link = self.link.lock().expect("link lock");
        link.stream.as_ref()?;
        Some(link.holds.iter().filter(|x| x.layer == layer).map(|x| x.expert).collect())
    }

    pub fn holds(&self, layer: u32, expert: u32) -> bool {
        self.link.lock().expect("link lock").holds.iter().any(|x| x.layer == layer && x.expert == expert)
    }

    /// Sends one dispatch on the stream and waits for its answer, at most `timeout`. Returns
    /// the generation of the stream it went out on (0: none) with the answer.
    pub async fn dispatch(&self, req: DispatchRequest, timeout: Duration) -> (u64, Result<DispatchResponse, Status>) {
        let mut generation = 0;
        let answer = self.dispatch_on(req, timeout, &mut generation).await;
        (generation, answer)
    }

    async fn dispatch_on(
        &self,
        mut req: DispatchRequest,
        timeout: Duration,
        generation: &mut u64,
    ) -> Result<DispatchResponse, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let rows = req.activations.as_ref().and_then(|t| t.shape.first()).copied().unwrap_or(0);
        let (tx, rx) = oneshot::channel();
        let requests = {
            let link = self.link.lock().expect("link lock");
            let Some(stream) = &link.stream else {
                let why = link.last_error.as_deref().unwrap_or("not connected");
                return Err(Status::unavailable(format!("expert node {} is unreachable: {why}", self.address)));
            };
            *generation = stream.generation;
            stream.pending.lock().expect("pending lock").insert(id, tx);
            stream.requests.clone()
        };
        let start = Instant::now();
        if requests.send(req).await.is_err() {
            return Err(Status::unavailable(format!("expert node {}: dispatch stream closed", self.address)));
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::unavailable(format!("expert node {}: dispatch stream closed", self.address))),
            Err(_) => {
                let status = Status::deadline_exceeded(format!(
                    "expert node {} did not answer within {} ms",
                    self.address,
                    timeout.as_millis()
                ));
                self.fail(*generation, status.message());
                Err(status)
            }
        };
        if answer.is_ok() {
            self.dispatches.fetch_add(1, Ordering::Relaxed);
            self.unreported_rows.fetch_add(rows, Ordering::Relaxed);
            self.round_trip_micros.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        answer
    }

    /// Marks the node unreachable if stream `generation` is still its current one: drops the
    /// stream (failing whatever is in flight) and wakes the supervisor to reconnect.
    pub fn fail(&self, generation: u64, why: &str) {
        if let Some(stream) = self.take_stream(Some(generation), why) {
            stream.broken.notify_one();
        }
    }

    /// Takes the current stream (only if it is `generation`, when given).
    fn take_stream(&self, generation: Option<u64>, why: &str) -> Option<Stream> {
        let stream = {
            let mut link = self.link.lock().expect("link lock");
            if generation.is_some_and(|g| link.stream.as_ref().is_none_or(|s| s.generation != g)) {
                return None;
            }
            link.last_error = Some(why.to_string());
            link.stream.take()
        };
        if let Some(stream) = &stream {
            tracing::warn!(node = %self.address, "expert node unreachable: {why}");
            fail_pending(&stream.pending, &self.address, why);
        }
        stream
    }

    pub fn view(&self) -> NodeView {
        let link = self.link.lock().expect("link lock");
        let dispatches = self.dispatches.load(Ordering::Relaxed);
        NodeView {
            address: self.address.clone(),
            serving: link.stream.is_some(),
            holds: link.holds.clone(),
            last_error: link.last_error.clone(),
            dispatches,
            mean_round_trip_micros: self.round_trip_micros.load(Ordering::Relaxed) / dispatches.max(1),
            pid: link.pid,
        }
    }
}

fn fail_pending(pending: &Pending, address: &str, why: &str) {
    for (_, tx) in pending.lock().expect("pending lock").drain() {
        let _ = tx.send(Err(Status::unavailable(format!("expert node {address} failed mid-dispatch: {why}"))));
    }
}

/// Tokens routed per expert since the last load report (rows per node are counted on each
/// [`Node`]).
#[derive(Default)]
pub struct LoadCounters {
    experts: Mutex<BTreeMap<(u32, u32), u64>>,
}

impl LoadCounters {
    pub fn expert_tokens(&self, layer: u32, counts: &BTreeMap<u32, u64>) {
        let mut experts = self.experts.lock().expect("load lock");
        for (&expert, &n) in counts {
            *experts.entry((layer, expert)).or_default() += n;
        }
    }

    fn take(&self) -> BTreeMap<(u32, u32), u64> {
        std::mem::take(&mut *self.experts.lock().expect("load lock"))
    }
}

/// The router's expert nodes.
pub struct Cluster {
    nodes: RwLock<Arc<Vec<Arc<Node>>>>,
    /// The placement epoch dispatches carry; changes are watched by dispatches waiting for a
    /// re-placement.
    epoch: watch::Sender<u64>,
    /// Whether the placement comes from the coordinators.
    pub coordinated: bool,
    pub load: LoadCounters,
    /// Canary checks a node added after the first placement must pass before its answers are
    /// used alone (0: none).
    pub canary_checks: u64,
    /// Where a node whose answers are wrong is reported (drained).
    coordinators: Option<switchyard_coordinator::client::Client>,
    /// How connections to the nodes are secured.
    security: Security,
    /// The model's MoE layers and experts per layer: what must be served.
    pub(crate) moe_layers: Vec<u32>,
    pub(crate) num_experts: usize,
}

/// How often a coordinated router reports its load to the coordinators.
const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// How long a new epoch waits for the router to reach the nodes it adds before switching.
const CONNECT_NEW_NODES: Duration = Duration::from_secs(2);

impl Cluster {
    fn new(
        nodes: Vec<Arc<Node>>,
        epoch: u64,
        coordinators: Option<switchyard_coordinator::client::Client>,
        security: Security,
        spec: &ModelSpec,
    ) -> Self {
        let moe_layers = (0..spec.num_layers)
            .filter(|&l| spec.layer_mlps[l] == switchyard_model::config::LayerMlp::Moe)
            .map(|l| l as u32)
            .collect();
        Cluster {
            nodes: RwLock::new(Arc::new(nodes)),
            epoch: watch::channel(epoch).0,
            coordinated: coordinators.is_some(),
            load: LoadCounters::default(),
            canary_checks: 0,
            coordinators,
            security,
            moe_layers,
            num_experts: spec.num_experts,
        }
    }

    /// Stops dispatching to `node` (its answers are wrong) and asks the coordinators to drain
    /// it, so its experts move to other nodes.
    pub fn refuse(&self, node: &Node, why: String) {
        node.refuse(why);
        let Some(client) = self.coordinators.clone() else { return };
        let address = node.address.clone();
        tokio::spawn(async move {
            match client.drain(address.clone()).await {
                Ok(id) => {
                    tracing::warn!(node = id, %address, "asked the coordinators to drain the refused expert node")
                }
                Err(status) => tracing::error!(%address, "cannot drain the refused expert node: {}", status.message()),
            }
        });
    }

    /// Why the cluster cannot serve every expert now: the first expert that no reachable
    /// node holds, and the nodes that hold it with their last error. `None`: all are served.
    /// One lock per node, so cheap enough for every `/health`.
    pub fn unserved_expert(&self) -> Option<String> {
        let nodes = self.nodes();
        let layers = self.moe_layers.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        let mut served = vec![false; layers * self.num_experts];
        for node in nodes.iter() {
            if node.trust() == Trust::Refused {
                continue;
            }
            let link = node.link.lock().expect("link lock");
            if link.stream.is_none() {
                continue;
            }
            for x in &link.holds {
                if let Some(s) = served.get_mut(x.layer as usize * self.num_experts + x.expert as usize) {
                    *s = true;
                }
            }
        }
        let (layer, expert) = self.moe_layers.iter().find_map(|&l| {
            (0..self.num_experts).find(|&e| !served[l as usize * self.num_experts + e]).map(|e| (l, e as u32))
        })?;
        let holders: Vec<String> = nodes
            .iter()
            .filter(|n| n.holds(layer, expert))
            .map(|n| format!("{} ({})", n.address, n.view().last_error.unwrap_or_else(|| "not connected".into())))
            .collect();
        let holders = if holders.is_empty() { "no node".to_string() } else { holders.join(", ") };
        Some(format!("layer {layer} expert {expert} has no reachable replica; held by {holders}"))
    }

    /// The nodes now (a snapshot: plan a whole layer on one).
    pub fn nodes(&self) -> Arc<Vec<Arc<Node>>> {
        self.nodes.read().expect("nodes lock").clone()
    }

    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Waits until the epoch is no longer `epoch`, at most `timeout`; returns whether it moved.
    pub async fn epoch_changed(&self, epoch: u64, timeout: Duration) -> bool {
        let mut rx = self.epoch.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&e| e != epoch)).await.is_ok_and(|r| r.is_ok())
    }

    /// Starts a supervisor per address and waits, at most `wait`, until every node has
    /// answered once; then checks that the nodes serve `spec`'s model and that every expert
    /// of every MoE layer is held by at least one of them.
    pub async fn connect(
        addresses: &[String],
        security: &Security,
        spec: &ModelSpec,
        wait: Duration,
    ) -> Result<Arc<Self>, RouterError> {
        if addresses.is_empty() {
            return Err(RouterError::Config("no expert nodes given (--expert-nodes)".into()));
        }
        // The nodes the operator names are trusted.
        let nodes: Vec<Arc<Node>> = addresses.iter().map(|a| Arc::new(Node::new(a, true, security.clone()))).collect();
        let (first, mut answered) = mpsc::channel(nodes.len());
        for node in &nodes {
            tokio::spawn(supervise(node.clone(), spec.clone(), Some(first.clone()), false));
        }
        drop(first);
        let deadline = tokio::time::Instant::now() + wait;
        let mut statuses = Vec::new();
        while statuses.len() < nodes.len() {
            match tokio::time::timeout_at(deadline, answered.recv()).await {
                Ok(Some(status)) => statuses.push(status),
                Ok(None) => break,
                Err(_) => {
                    let missing: Vec<String> = nodes
                        .iter()
                        .filter(|n| !n.is_up())
                        .map(|n| format!("{} ({})", n.address, n.view().last_error.unwrap_or_default()))
                        .collect();
                    return Err(RouterError::NodesUnreachable { wait, nodes: missing.join(", ") });
                }
            }
        }
        let cluster = Cluster::new(nodes, crate::STATIC_EPOCH, None, security.clone(), spec);
        cluster.check_coverage(spec)?;
        Ok(Arc::new(cluster))
    }

    /// Follows the coordinators' placement: waits, at most `wait`, for an active epoch, then
    /// keeps switching to each new one and reports the router's load to the coordinators.
    /// The nodes of the first placement are trusted; a node a later epoch adds is on probation
    /// for `canary_checks` checks.
    pub async fn follow(
        client: switchyard_coordinator::client::Client,
        security: &Security,
        spec: &ModelSpec,
        wait: Duration,
        canary_checks: u64,
    ) -> Result<Arc<Self>, RouterError> {
        let mut cluster = Cluster::new(Vec::new(), 0, Some(client.clone()), security.clone(), spec);
        cluster.canary_checks = canary_checks;
        let cluster = Arc::new(cluster);
        let mut placements = client.watch();
        let deadline = tokio::time::Instant::now() + wait;
        let first = loop {
            if let Some(p) = placements.borrow_and_update().clone()
                && switchyard_coordinator::convert::active(&p).is_some()
            {
                break p;
            }
            match tokio::time::timeout_at(deadline, placements.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(RouterError::Config(format!(
                        "the coordinators ({}) published no active placement within {} s",
                        client.addresses().join(", "),
                        wait.as_secs()
                    )));
                }
            }
        };
        check_shape(&first, spec)?;
        cluster.apply(&first, spec).await;
        cluster.check_coverage(spec)?;
        // A placement restored from the coordinators' raft log may name nodes that are gone
        // (a cluster resumed after a crash) until the new ones register: wait, within the
        // bound, for an epoch whose every expert is reachable before serving.
        // Links come up on their own (each node's supervisor), epochs through the watch.
        while let Some(why) = cluster.unserved_expert() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("starting with experts unreachable: {why}");
                break;
            }
            tokio::select! {
                changed = placements.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Some(p) = placements.borrow_and_update().clone() {
                        cluster.apply(&p, spec).await;
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let weak = Arc::downgrade(&cluster);
        let spec_owned = spec.clone();
        tokio::spawn(async move {
            while placements.changed().await.is_ok() {
                let Some(p) = placements.borrow_and_update().clone() else { continue };
                let Some(cluster) = weak.upgrade() else { return };
                cluster.apply(&p, &spec_owned).await;
            }
        });
        tokio::spawn(report_load(Arc::downgrade(&cluster), client));
        Ok(cluster)
    }

    /// Switches to `placement`'s active epoch: reaches the nodes it adds (briefly), then sets
    /// every node's experts and the epoch at once; nodes it no longer names are let go.
    async fn apply(&self, placement: &switchyard_proto::v1::Placement, spec: &ModelSpec) {
        use switchyard_coordinator::convert::{active, addresses};
        let Some((epoch, assignment)) = active(placement) else { return };
        // Never back to an older epoch (a lagging coordinator's view).
        if epoch <= self.epoch() {
            return;
        }
        let addresses = addresses(placement);
        // By address: a node that registered again (a new id, same address) is one link.
        let mut holds: BTreeMap<&str, (u64, Vec<ExpertId>)> = BTreeMap::new();
        for (&(layer, expert), nodes) in &assignment {
            for n in nodes {
                let Some(address) = addresses.get(n) else { continue };
                let (id, experts) = holds.entry(address.as_str()).or_default();
                *id = (*id).max(*n);
                experts.push(ExpertId { layer, expert });
            }
        }
        let current = self.nodes();
        let mut next = Vec::new();
        let mut added = Vec::new();
        for (&address, (id, _)) in &holds {
            let node = match current.iter().find(|n| n.address == address) {
                Some(n) => n.clone(),
                None => {
                    let proven = self.epoch() == 0 || self.canary_checks == 0;
                    let node = Arc::new(Node::new(address, proven, self.security.clone()));
                    tokio::spawn(supervise(node.clone(), spec.clone(), None, true));
                    added.push(node.clone());
                    node
                }
            };
            node.id.store(*id, Ordering::Relaxed);
            next.push(node);
        }
        let deadline = tokio::time::Instant::now() + CONNECT_NEW_NODES;
        while added.iter().any(|n| !n.is_up()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (node, (_, experts)) in next.iter().zip(holds.into_values()) {
            node.link.lock().expect("link lock").holds = experts;
        }
        for gone in current.iter().filter(|n| !next.iter().any(|m| Arc::ptr_eq(n, m))) {
            gone.retired.store(true, Ordering::Relaxed);
            gone.link.lock().expect("link lock").holds.clear();
            if let Some(stream) = gone.take_stream(None, "no longer in the placement") {
                stream.broken.notify_one();
            }
        }
        let nodes = next.len();
        *self.nodes.write().expect("nodes lock") = Arc::new(next);
        self.epoch.send_replace(epoch);
        tracing::info!(epoch, nodes, "placement epoch switched");
    }

    fn check_coverage(&self, spec: &ModelSpec) -> Result<(), RouterError> {
        for l in 0..spec.num_layers {
            if spec.layer_mlps[l] != switchyard_model::config::LayerMlp::Moe {
                continue;
            }
            for e in 0..spec.num_experts {
                if !self.nodes().iter().any(|n| n.holds(l as u32, e as u32)) {
                    return Err(RouterError::Uncovered { layer: l, expert: e });
                }
            }
        }
        Ok(())
    }
}

async fn connect_once(node: &Node, spec: &ModelSpec) -> Result<(Stream, NodeStatus, mpsc::Receiver<()>), String> {
    let limit = switchyard_proto::max_dispatch_message_bytes(spec.hidden_size);
    let endpoint = node
        .security
        .endpoint(&node.address, Role::Node)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(switchyard_proto::DISPATCH_STREAM_WINDOW)
        .initial_connection_window_size(switchyard_proto::DISPATCH_CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel: Channel =
        endpoint.connect().await.map_err(|e| format!("cannot connect: {}", switchyard_proto::error_chain(&e)))?;
    let mut client =
        ExpertServiceClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);
    let status = tokio::time::timeout(Duration::from_secs(5), client.status(StatusRequest {}))
        .await
        .map_err(|_| "status request timed out".to_string())?
        .map_err(|s| format!("status request failed: {}", s.message()))?
        .into_inner();
    check_model(&status, spec)?;
    if status.state() != switchyard_proto::v1::ServingState::Serving {
        // Shutting down, or its compute thread failed: it would only refuse the work.
        return Err("the node reports NOT_SERVING".to_string());
    }
    let (requests, rx) = mpsc::channel(64);
    let mut responses = client
        .dispatch(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("cannot open the dispatch stream: {}", s.message()))?
        .into_inner();
    let pending: Pending = Arc::default();
    let (closed_tx, closed) = mpsc::channel(1);
    let reader_pending = pending.clone();
    let address = node.address.clone();
    tokio::spawn(async move {
        let why = loop {
            match responses.message().await {
                Ok(Some(resp)) => {
                    if let Some(tx) = reader_pending.lock().expect("pending lock").remove(&resp.id) {
                        let _ = tx.send(Ok(resp));
                    }
                }
                Ok(None) => break "the node closed the dispatch stream".to_string(),
                Err(s) if s.code() == Code::OutOfRange || s.code() == Code::ResourceExhausted => {
                    break format!("dispatch stream ended: {}", s.message());
                }
                Err(s) => break format!("dispatch stream broke: {}", s.message()),
            }
        };
        fail_pending(&reader_pending, &address, &why);
        let _ = closed_tx.send(()).await;
        tracing::debug!(node = %address, "dispatch stream reader stopped: {why}");
    });
    let generation = node.generations.fetch_add(1, Ordering::Relaxed) + 1;
    Ok((Stream { requests, pending, broken: Arc::new(Notify::new()), generation }, status, closed))
}

fn check_model(status: &NodeStatus, spec: &ModelSpec) -> Result<(), String> {
    let theirs = (status.model_type.as_str(), status.num_layers, status.num_experts, status.hidden_size);
    model_mismatch(theirs, spec).map_or(Ok(()), |m| Err(format!("serves a different model ({m})")))
}

/// How a model described as `(model_type, layers, experts, hidden)` differs from the router's,
/// if it does.
fn model_mismatch(theirs: (&str, u32, u32, u32), spec: &ModelSpec) -> Option<String> {
    let ours = (spec.arch.model_type(), spec.num_layers as u32, spec.num_experts as u32, spec.hidden_size as u32);
    (ours != theirs).then(|| {
        format!(
            "{} with {} layers, {} experts, hidden {}; the router has {} with {} layers, {} experts, hidden {}",
            theirs.0, theirs.1, theirs.2, theirs.3, ours.0, ours.1, ours.2, ours.3
        )
    })
}

/// Keeps `node` connected: connects, reports the first status on `first`, then waits for the
/// stream to break (or to be failed) and connects again.
async fn supervise(node: Arc<Node>, spec: ModelSpec, mut first: Option<mpsc::Sender<NodeStatus>>, coordinated: bool) {
    loop {
        if node.retired.load(Ordering::Relaxed) {
            return;
        }
        match connect_once(&node, &spec).await {
            Ok((stream, status, mut closed)) => {
                let broken = stream.broken.clone();
                {
                    let mut link = node.link.lock().expect("link lock");
                    // Let go of a node the placement dropped while this connection was made.
                    if node.retired.load(Ordering::Relaxed) {
                        return;
                    }
                    if link.last_error.is_some() {
                        tracing::info!(node = %node.address, "expert node reachable again");
                    }
                    if !coordinated {
                        link.holds = status.experts.clone();
                    }
                    link.pid = status.pid;
                    link.stream = Some(stream);
                }
                if let Some(first) = first.take() {
                    let _ = first.send(status).await;
                }
                tokio::select! {
                    _ = closed.recv() => drop(node.take_stream(None, "the dispatch stream closed")),
                    _ = broken.notified() => {}
                }
            }
            Err(why) => {
                let mut link = node.link.lock().expect("link lock");
                link.last_error = Some(why);
            }
        }
        if Arc::strong_count(&node) == 1 {
            return; // the cluster is gone
        }
        tokio::time::sleep(RECONNECT_INTERVAL).await;
    }
}

/// The coordinators' model must be the router's.
fn check_shape(placement: &switchyard_proto::v1::Placement, spec: &ModelSpec) -> Result<(), RouterError> {
    let Some(model) = &placement.model else { return Ok(()) };
    let theirs = (model.model_type.as_str(), model.num_layers, model.num_experts, model.hidden_size);
    match model_mismatch(theirs, spec) {
        Some(m) => Err(RouterError::Config(format!("the coordinators place a different model ({m})"))),
        None => Ok(()),
    }
}

/// Reports routed tokens per expert and rows per node to the coordinators, with the epoch the
/// router dispatches under, until the cluster is gone.
async fn report_load(cluster: Weak<Cluster>, client: switchyard_coordinator::client::Client) {
    use switchyard_proto::v1::{ExpertLoad, LoadReport};
    let router = format!("router-{}", std::process::id());
    let mut tick = tokio::time::interval(LOAD_REPORT_INTERVAL);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else { return };
        let experts = cluster.load.take();
        let nodes = cluster.nodes();
        let report = LoadReport {
            router: router.clone(),
            epoch: cluster.epoch(),
            experts: experts
                .into_iter()
                .map(|((layer, expert), tokens)| ExpertLoad { layer, expert, tokens })
                .collect(),
            node_rows: nodes
                .iter()
                .map(|n| (n.id.load(Ordering::Relaxed), n.unreported_rows.swap(0, Ordering::Relaxed)))
                .filter(|&(_, rows)| rows > 0)
                .collect(),
        };
        drop(cluster);
        if let Err(status) = client.report_load(report).await {
            tracing::debug!("load report not delivered: {}", status.message());
        }
    }
}
