//! The Switchyard expert node: loads just the (layer, expert) weights placed on it and runs
//! them for the routers that dispatch token activations to it, answering each dispatch with
//! per-token partial sums (the weighted sum over the experts it holds), so a token crosses
//! the wire once per node, however many of its experts live here.
//!
//! Start-up is [`ExpertNode::load`] (reads the placed experts onto the node's device, checks
//! the memory budget), then [`ExpertNode::serve`] on a bound listener until `shutdown`
//! resolves.
//!
//! # Layout
//! - [`placement`]: [`ExpertSet`], the `--experts` spec.
//! - [`store`]: [`store::Catalog`] (the model, checks placements, reads experts) and
//!   [`store::ExpertStore`] (the held experts; installs a placement, computes one dispatch).
//! - [`compute`]: the supervised compute thread that owns the store and runs its jobs off the
//!   async runtime; the node's [`compute::Health`].
//! - [`membership`]: registering with the coordinators and following their placement.
//! - [`service`]: the gRPC `ExpertService` (dispatch stream, health, status).
//! - [`error`]: [`NodeError`] and its mapping to gRPC statuses.

pub mod compute;
pub mod error;
pub mod membership;
pub mod placement;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::tls::{Role, Security};
use switchyard_proto::v1::expert_service_server::ExpertServiceServer;
use tokio::net::TcpListener;

pub use error::NodeError;
pub use placement::ExpertSet;

use crate::compute::{Compute, Faults, Health};
use crate::service::NodeService;
use crate::store::{Catalog, ExpertStore, Held};

/// How an expert node is configured (`switchyard expert-node`).
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Checkpoint directory in Hugging Face layout; only the placed experts are read.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: PathBuf,
    /// The (layer, expert) pairs to hold: `all`, `0-3` (experts 0-3 of every layer), `0,3,6`,
    /// or `LAYERS:EXPERTS` terms such as `0:0-7,1-3:4`. Without coordinators only.
    #[arg(long, env = "SWITCHYARD_EXPERTS", required_unless_present = "coordinators", conflicts_with = "coordinators")]
    pub experts: Option<ExpertSet>,
    /// Coordinators (`host:port`, comma-separated): register with them and hold what their
    /// placement gives this node, instead of `--experts`.
    #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',')]
    pub coordinators: Vec<String>,
    /// The address routers reach this node at, as registered with the coordinators (default:
    /// the address it listens on).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Refuse a placement whose expert weights exceed this many bytes (suffixes K, M, G, KiB,
    /// MiB, GiB). Default: no limit.
    #[arg(long, env = "SWITCHYARD_MEMORY_BUDGET", value_parser = switchyard_model::units::parse_bytes)]
    pub memory_budget: Option<usize>,
    /// Compute threads (default: one per core).
    #[arg(long, env = "SWITCHYARD_THREADS")]
    pub threads: Option<usize>,
    /// Where the experts live and run: `cpu` (RAM), or `cuda:N` (that GPU's memory; a build
    /// with `--features cuda`).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    pub device: switchyard_kernels::Device,
    #[command(flatten)]
    pub limits: switchyard_proto::server::ConnectionLimits,
    #[command(flatten)]
    pub tls: switchyard_proto::tls::TlsFlags,
    /// Ready: serving, and (with coordinators) registered, in the active epoch and holding
    /// every expert it gives this node.
    #[command(flatten)]
    pub probes: switchyard_proto::probe::ProbeFlags,
    #[command(flatten)]
    pub faults: FaultFlags,
}

/// Faults a test injects into a node (hidden flags): see [`Faults`].
#[derive(clap::Args, Clone, Debug, Default)]
pub struct FaultFlags {
    /// Sleep this long before every dispatch.
    #[arg(long, env = "SWITCHYARD_FAULT_DISPATCH_DELAY_MS", default_value_t = 0, hide = true)]
    pub fault_dispatch_delay_ms: u64,
    /// The compute thread panics on this dispatch (1 = the first).
    #[arg(long, env = "SWITCHYARD_FAULT_PANIC_AT_DISPATCH", hide = true)]
    pub fault_panic_at_dispatch: Option<u64>,
    /// This dispatch (1 = the first) fails as a device out of memory would.
    #[arg(long, env = "SWITCHYARD_FAULT_OOM_AT_DISPATCH", hide = true)]
    pub fault_oom_at_dispatch: Option<u64>,
    /// Add this to every partial sum the node answers (a node that is silently wrong).
    #[arg(long, env = "SWITCHYARD_FAULT_WRONG_ANSWERS", hide = true)]
    pub fault_wrong_answers: Option<f32>,
}

impl FaultFlags {
    fn faults(&self) -> Faults {
        Faults {
            dispatch_delay: Duration::from_millis(self.fault_dispatch_delay_ms),
            panic_at_dispatch: self.fault_panic_at_dispatch,
            oom_at_dispatch: self.fault_oom_at_dispatch,
            wrong_answers: self.fault_wrong_answers,
        }
    }
}

/// A loaded expert node, ready to serve.
pub struct ExpertNode {
    config: Config,
    security: Security,
    store: ExpertStore,
    held: tokio::sync::watch::Receiver<Held>,
}

impl ExpertNode {
    /// Loads the placed experts onto the node's device (blocking; reports
    /// `progress(layers_done, layers_total)`).
    pub fn load(config: Config, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, NodeError> {
        let security = config.tls.load(Role::Node).map_err(NodeError::Tls)?;
        let catalog = Arc::new(Catalog::open(&config.model, config.memory_budget)?);
        let (mut store, held) = ExpertStore::new(catalog.clone(), config.device)?;
        match &config.experts {
            Some(set) => {
                let spec = catalog.spec();
                set.validate(spec.num_layers, spec.num_experts).map_err(NodeError::Placement)?;
                let target: std::collections::BTreeSet<(u32, u32)> = spec
                    .layer_mlps
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m == switchyard_model::config::LayerMlp::Moe)
                    .flat_map(|(l, _)| (0..spec.num_experts).map(move |e| (l, e)))
                    .filter(|&(l, e)| set.contains(l, e))
                    .map(|(l, e)| (l as u32, e as u32))
                    .collect();
                if target.is_empty() {
                    return Err(NodeError::EmptyPlacement);
                }
                catalog.check(&target)?;
                store.install(&target, catalog.read(&target)?)?;
                progress(1, 1);
                let now = held.borrow().clone();
                tracing::info!(
                    experts = now.ids.len(),
                    bytes = now.bytes,
                    spec = %set,
                    device = %store.backend().describe(),
                    "expert node loaded {}",
                    config.model.display()
                );
            }
            None => {
                progress(1, 1);
                tracing::info!("expert node opened {}; the coordinators place its experts", config.model.display());
            }
        }
        Ok(ExpertNode { config, security, store, held })
    }

    /// What the node holds now.
    pub fn held(&self) -> Held {
        self.held.borrow().clone()
    }

    /// Serves `ExpertService` on `listener` until `shutdown` resolves; health turns
    /// NOT_SERVING first, then open streams drain.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let health = Arc::new(Health::default());
        let hidden = self.store.catalog().spec().hidden_size;
        let compute =
            Compute::start(self.store, self.held, self.config.threads, self.config.faults.faults(), health.clone())?;
        // A JoinSet aborts its tasks when dropped: membership ends with the server.
        let mut membership = tokio::task::JoinSet::new();
        let placed = Arc::new(std::sync::Mutex::new(Ok(())));
        if !self.config.coordinators.is_empty() {
            *placed.lock().expect("placed lock") = Err("not registered with the coordinators yet".to_string());
            let client = switchyard_coordinator::client::Client::new(&self.config.coordinators, &self.security)
                .map_err(std::io::Error::other)?;
            let address = match &self.config.advertise {
                Some(a) => a.clone(),
                None => listener.local_addr()?.to_string(),
            };
            membership.spawn(membership::run(client, compute.clone(), address, placed.clone()));
        }
        let ready: switchyard_proto::probe::Readiness = {
            let (health, placed) = (health.clone(), placed.clone());
            Arc::new(move || match health.state() {
                compute::HealthState::Serving => placed.lock().expect("placed lock").clone(),
                compute::HealthState::Stopping => Err("shutting down".into()),
                compute::HealthState::Failed(why) => Err(format!("failed: {why}")),
            })
        };
        let (stop_probes, probes_stopped) = tokio::sync::oneshot::channel::<()>();
        switchyard_proto::probe::start(&self.config.probes, ready.clone(), async move {
            let _ = probes_stopped.await;
        })
        .await?;
        let grpc_health = switchyard_proto::probe::grpc_health(ready);
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let limit = switchyard_proto::max_dispatch_message_bytes(hidden);
        let service = NodeService { compute, stopping, security: self.security.clone() };
        let server =
            ExpertServiceServer::new(service).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let shutdown = async move {
            shutdown.await;
            health.stop();
            // Dispatch streams end after their in-flight work, so the drain can finish.
            let _ = stop.send(true);
            tracing::info!("expert node shutting down");
        };
        let limits = &self.config.limits;
        let builder = self.security.server(limits.builder()).map_err(std::io::Error::other)?;
        builder
            .initial_stream_window_size(switchyard_proto::DISPATCH_STREAM_WINDOW)
            .initial_connection_window_size(switchyard_proto::DISPATCH_CONNECTION_WINDOW)
            .add_service(grpc_health)
            .add_service(server)
            .serve_with_incoming_shutdown(limits.incoming(listener), shutdown)
            .await
            .map_err(std::io::Error::other)?;
        drop(stop_probes);
        Ok(())
    }
}

/// Loads and serves: [`ExpertNode::load`] on a blocking thread, then [`ExpertNode::serve`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let node = tokio::task::spawn_blocking(move || ExpertNode::load(config, &mut |_, _| {}))
        .await
        .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
    Ok(node.serve(listener, shutdown).await?)
}
