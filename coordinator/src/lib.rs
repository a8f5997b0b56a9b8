//! The Switchyard coordinator: a raft group (raft-rs) that owns cluster membership and the
//! expert placement — epochs of (layer, expert) → expert nodes — detects failed nodes,
//! re-places their experts and rebalances hot ones.
//!
//! A member is [`Coordinator::start`] then [`Coordinator::serve`]: one thread owns the raft
//! node and runs the Ready loop; the gRPC `Coordinator` service carries raft traffic between
//! members and answers expert nodes and routers. Expert nodes and routers use [`client`].
//!
//! # Layout
//! - [`state`]: the replicated state machine ([`state::ClusterState`]) and its commands.
//! - [`planner`]: placement and balancing, pure functions the leader runs.
//! - [`storage`]: durable raft storage (log, hard state, snapshots) in the data directory.
//! - [`peer`]: one raft member: `RawNode` + state machine, the Ready handling.
//! - [`node`]: the raft thread: ticks, proposals, ReadIndex, and the leader's duties
//!   (failure detection, epochs, balancing).
//! - [`transport`]: raft messages to the other members over gRPC.
//! - [`service`]: the gRPC `Coordinator` service.
//! - [`client`]: the client expert nodes, routers and the CLI use (finds the leader).
//! - [`tenants`]: the cluster's tenants, and the leader's per-minute budgets for them.
//! - [`convert`]: state ⇄ protobuf.
//! - [`error`]: the error type, [`CoordinatorError`].

pub mod client;
pub mod convert;
pub mod error;
pub mod node;
pub mod peer;
pub mod planner;
pub mod service;
pub mod state;
pub mod storage;
pub mod tenants;
pub mod transport;

pub use error::CoordinatorError;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use switchyard_proto::tls::{Role, Security};
use switchyard_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;

use crate::node::{Handle, Policy};
use crate::peer::Peer;
use crate::service::CoordinatorService;

/// How a coordinator is configured (`switchyard coordinator`).
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// This member's raft id (1, 2, …; unique in the group, never reused).
    #[arg(long, env = "SWITCHYARD_COORDINATOR_ID")]
    pub id: u64,
    /// The group's first members, `ID=HOST:PORT`, comma-separated (this one included or not).
    /// Used only when the data directory is empty; later changes go through raft.
    #[arg(long, env = "SWITCHYARD_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Where the raft log, hard state and snapshots live.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Start with no configuration and wait to be added to a running group (`switchyard
    /// cluster add-coordinator`); the leader then sends a snapshot. `--peers` must name the
    /// running members, so this one can answer them.
    #[arg(long, env = "SWITCHYARD_JOIN")]
    pub join: bool,
    /// The first placement waits until this many expert nodes have registered.
    #[arg(long, env = "SWITCHYARD_MIN_NODES", default_value_t = 1)]
    pub min_nodes: usize,
    /// Replicas per expert where the nodes' memory allows.
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 2)]
    pub replicas: usize,
    /// An expert node silent this many milliseconds is declared dead and its experts re-placed.
    #[arg(long, env = "SWITCHYARD_NODE_TIMEOUT_MS", default_value_t = 1000)]
    pub node_timeout_ms: u64,
    /// How often the balancer looks at the routers' load reports, in milliseconds.
    #[arg(long, env = "SWITCHYARD_BALANCE_INTERVAL_MS", default_value_t = 2000)]
    pub balance_interval_ms: u64,
    /// Rebalance when the busiest node's predicted load passes the mean by this factor.
    #[arg(long, env = "SWITCHYARD_IMBALANCE_THRESHOLD", default_value_t = 1.25)]
    pub imbalance_threshold: f64,
    /// An expert node that has not loaded a pending epoch's experts within this many seconds
    /// is declared dead, and the epoch re-planned without it. Allow for loading the largest
    /// share from disk.
    #[arg(long, env = "SWITCHYARD_LOAD_TIMEOUT_SECS", default_value_t = 120)]
    pub load_timeout_secs: u64,
    /// A secret the members share: raft traffic must carry it, so only members can step the
    /// raft group (set it on every member; `switchyard up` makes one up).
    #[arg(long, env = "SWITCHYARD_RAFT_TOKEN", hide_env_values = true)]
    pub raft_token: Option<String>,
    #[command(flatten)]
    pub limits: switchyard_proto::server::ConnectionLimits,
    #[command(flatten)]
    pub tls: switchyard_proto::tls::TlsFlags,
    /// Ready: a leader is known and this member has applied everything it knows committed.
    #[command(flatten)]
    pub probes: switchyard_proto::probe::ProbeFlags,
}

impl Config {
    /// The members named by `--peers`.
    pub fn peer_addresses(&self) -> Result<BTreeMap<u64, String>, CoordinatorError> {
        self.peers
            .iter()
            .map(|p| {
                let (id, address) = p
                    .split_once('=')
                    .ok_or_else(|| CoordinatorError::Config(format!("--peers: {p:?} is not ID=HOST:PORT")))?;
                let id: u64 =
                    id.trim().parse().ok().filter(|&id| id > 0).ok_or_else(|| {
                        CoordinatorError::Config(format!("--peers: {id:?} is not a raft id (1, 2, …)"))
                    })?;
                Ok((id, address.trim().to_string()))
            })
            .collect()
    }

    fn policy(&self) -> Policy {
        Policy {
            node_timeout: Duration::from_millis(self.node_timeout_ms),
            min_nodes: self.min_nodes,
            min_replicas: self.replicas.max(1),
            balance_interval: Duration::from_millis(self.balance_interval_ms.max(100)),
            imbalance_threshold: self.imbalance_threshold,
            pending_timeout: Duration::from_secs(self.load_timeout_secs),
            ..Policy::default()
        }
    }
}

/// A started coordinator member.
pub struct Coordinator {
    pub handle: Handle,
    raft_thread: node::Thread,
    raft_token: Option<String>,
    security: Security,
    limits: switchyard_proto::server::ConnectionLimits,
    probes: switchyard_proto::probe::ProbeFlags,
}

impl Coordinator {
    /// Opens the data directory (restarting from it if it holds state), starts the raft
    /// thread and the transport. `address` is where this member is reached. Must run inside a
    /// tokio runtime.
    pub fn start(config: &Config, address: &str) -> Result<Self, CoordinatorError> {
        if config.id == 0 {
            return Err(CoordinatorError::Config("--id must be 1 or more".into()));
        }
        let security = config.tls.load(Role::Coordinator).map_err(CoordinatorError::Config)?;
        let mut members = config.peer_addresses()?;
        members.entry(config.id).or_insert_with(|| address.to_string());
        let voters: Vec<u64> = if config.join { Vec::new() } else { members.keys().copied().collect() };
        let peer = Peer::open(config.id, Some(&config.data_dir), &voters, &members, &peer::logger())?;
        tracing::info!(
            id = config.id,
            %address,
            voters = ?peer.voters(),
            applied = peer.applied_index(),
            "coordinator started from {}",
            config.data_dir.display()
        );
        let (outbox, inbox) = tokio::sync::mpsc::unbounded_channel();
        let (handle, raft_thread) = node::start(peer, config.policy(), outbox)?;
        tokio::spawn(transport::run(inbox, handle.clone(), security.clone(), config.raft_token.clone()));
        Ok(Coordinator {
            handle,
            raft_thread,
            raft_token: config.raft_token.clone(),
            security,
            limits: config.limits.clone(),
            probes: config.probes.clone(),
        })
    }

    /// Serves the `Coordinator` service on `listener` until `shutdown` resolves, or until the
    /// raft thread fails (a storage error), which is returned.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), CoordinatorError> {
        let (stop_watches, stopping) = tokio::sync::watch::channel(false);
        let service =
            CoordinatorService::new(self.handle.clone(), self.security.clone(), self.raft_token.clone(), stopping);
        let service =
            CoordinatorServer::new(service).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        let mut server = self.security.server(self.limits.builder()).map_err(CoordinatorError::Config)?;
        let views = self.handle.view.clone();
        let ready: switchyard_proto::probe::Readiness = std::sync::Arc::new(move || {
            let view = views.borrow();
            match view.leader() {
                None => Err("no leader is known".into()),
                Some(_) if view.applied < view.commit => {
                    Err(format!("catching up: applied {} of {} committed entries", view.applied, view.commit))
                }
                Some(_) => Ok(()),
            }
        });
        let (stop_probes, probes_stopped) = tokio::sync::oneshot::channel::<()>();
        switchyard_proto::probe::start(&self.probes, ready.clone(), async move {
            let _ = probes_stopped.await;
        })
        .await?;
        let health = switchyard_proto::probe::grpc_health(ready);
        let node::Thread { join, failed } = self.raft_thread;
        let (stop, stopped) = tokio::sync::oneshot::channel::<CoordinatorError>();
        let until = async move {
            tokio::select! {
                _ = shutdown => {}
                e = failed => drop(stop.send(e.unwrap_or(CoordinatorError::ShuttingDown))),
            }
            // Placement watchers' streams never end on their own: end them, so the graceful
            // shutdown does not wait for every router and node to hang up.
            let _ = stop_watches.send(true);
        };
        let served = server
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(self.limits.incoming(listener), until)
            .await
            .map_err(std::io::Error::other);
        drop(stop_probes);
        self.handle.send(node::Msg::Stop).ok();
        let _ = tokio::task::spawn_blocking(move || join.join()).await;
        if let Ok(e) = stopped.await {
            return Err(e);
        }
        Ok(served?)
    }
}

/// Starts and serves: [`Coordinator::start`], then [`Coordinator::serve`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    let address = listener.local_addr()?.to_string();
    let coordinator = Coordinator::start(&config, &address)?;
    coordinator.serve(listener, shutdown).await
}
