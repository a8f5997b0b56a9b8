//! [`Cluster`]: the router's links to its expert nodes. Each node has one long-lived
//! bidirectional dispatch stream; a supervisor task per node (re)connects it, learns which
//! experts it holds from its `Status`, and marks it unreachable when the stream breaks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_model::ModelSpec;
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{DispatchRequest, DispatchResponse, ExpertId, NodeStatus, StatusRequest};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
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
    link: Mutex<Link>,
    next_id: AtomicU64,
    /// Streams opened so far.
    generations: AtomicU64,
    dispatches: AtomicU64,
    round_trip_micros: AtomicU64,
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
    pub fn is_up(&self) -> bool {
        self.link.lock().expect("link lock").stream.is_some()
    }

    /// The experts of `layer` this node holds, if it is reachable now (one lock, for planning
    /// a whole layer).
    pub fn serving_experts(&self, layer: u32) -> Option<Vec<u32>> {
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

/// The router's expert nodes.
pub struct Cluster {
    pub nodes: Vec<Arc<Node>>,
}

impl Cluster {
    /// Starts a supervisor per address and waits, at most `wait`, until every node has
    /// answered once; then checks that the nodes serve `spec`'s model and that every expert
    /// of every MoE layer is held by at least one of them.
    pub async fn connect(addresses: &[String], spec: &ModelSpec, wait: Duration) -> Result<Arc<Self>, RouterError> {
        if addresses.is_empty() {
            return Err(RouterError::Config("no expert nodes given (--expert-nodes)".into()));
        }
        let nodes: Vec<Arc<Node>> = addresses
            .iter()
            .map(|a| {
                Arc::new(Node {
                    address: a.clone(),
                    link: Mutex::new(Link::default()),
                    next_id: AtomicU64::new(0),
                    generations: AtomicU64::new(0),
                    dispatches: AtomicU64::new(0),
                    round_trip_micros: AtomicU64::new(0),
                })
            })
            .collect();
        let (first, mut answered) = mpsc::channel(nodes.len());
        for node in &nodes {
            tokio::spawn(supervise(node.clone(), spec.clone(), first.clone()));
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
        let cluster = Cluster { nodes };
        cluster.check_coverage(spec)?;
        Ok(Arc::new(cluster))
    }

    fn check_coverage(&self, spec: &ModelSpec) -> Result<(), RouterError> {
        for l in 0..spec.num_layers {
            if spec.layer_mlps[l] != switchyard_model::config::LayerMlp::Moe {
                continue;
            }
            for e in 0..spec.num_experts {
                if !self.nodes.iter().any(|n| n.holds(l as u32, e as u32)) {
                    return Err(RouterError::Uncovered { layer: l, expert: e });
                }
            }
        }
        Ok(())
    }
}

async fn connect_once(node: &Node, spec: &ModelSpec) -> Result<(Stream, NodeStatus, mpsc::Receiver<()>), String> {
    let limit = switchyard_proto::max_dispatch_message_bytes(spec.hidden_size);
    let endpoint = Endpoint::from_shared(format!("http://{}", node.address))
        .map_err(|e| format!("invalid address: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(switchyard_proto::DISPATCH_STREAM_WINDOW)
        .initial_connection_window_size(switchyard_proto::DISPATCH_CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel: Channel = endpoint.connect().await.map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
    let mut client =
        ExpertServiceClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);
    let status = tokio::time::timeout(Duration::from_secs(5), client.status(StatusRequest {}))
        .await
        .map_err(|_| "status request timed out".to_string())?
        .map_err(|s| format!("status request failed: {}", s.message()))?
        .into_inner();
    check_model(&status, spec)?;
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

/// `e` and its sources, `: `-separated (tonic's transport errors hide the cause otherwise).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

fn check_model(status: &NodeStatus, spec: &ModelSpec) -> Result<(), String> {
    let ours = (spec.arch.model_type(), spec.num_layers as u32, spec.num_experts as u32, spec.hidden_size as u32);
    let theirs = (status.model_type.as_str(), status.num_layers, status.num_experts, status.hidden_size);
    if ours != theirs {
        return Err(format!(
            "serves a different model ({} with {} layers, {} experts, hidden {}; the router has {} with {} layers, {} experts, hidden {})",
            theirs.0, theirs.1, theirs.2, theirs.3, ours.0, ours.1, ours.2, ours.3
        ));
    }
    Ok(())
}

/// Keeps `node` connected: connects, reports the first status on `first`, then waits for the
/// stream to break (or to be failed) and connects again.
async fn supervise(node: Arc<Node>, spec: ModelSpec, first: mpsc::Sender<NodeStatus>) {
    let mut first = Some(first);
    loop {
        match connect_once(&node, &spec).await {
            Ok((stream, status, mut closed)) => {
                let broken = stream.broken.clone();
                {
                    let mut link = node.link.lock().expect("link lock");
                    if link.last_error.is_some() {
                        tracing::info!(node = %node.address, "expert node reachable again");
                    }
                    link.holds = status.experts.clone();
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
