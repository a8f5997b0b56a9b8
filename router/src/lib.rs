//! The Switchyard router: takes generation requests over gRPC, tokenizes and schedules them
//! into batches, runs the dense part of the model (embeddings, attention, norms, the gate and
//! any shared expert) and dispatches each MoE layer's token activations to the expert nodes
//! that hold the experts the gate chose, adding their partial sums to the residual.
//!
//! Start-up is [`Router::start`] (reach the expert nodes, check they cover every expert, load
//! the dense weights), then [`Router::serve`] on a bound listener until `shutdown` resolves.
//!
//! # Layout
//! - [`cluster`]: links to the expert nodes: one dispatch stream each, reconnecting.
//! - [`dispatch`]: [`RemoteExperts`], the expert backend with replica choice and failover.
//! - [`scheduler`]: the engine thread, batching running and newly admitted sequences per step.
//! - [`service`]: the gRPC `Router` service (`Generate`, `ClusterStatus`).
//! - [`convert`]: protobuf ⇄ model types.
//! - [`error`]: the error type, [`RouterError`].

pub mod cluster;
pub mod convert;
pub mod dispatch;
pub mod error;
pub mod scheduler;
pub mod service;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use switchyard_model::{Engine, ModelSpec};
use switchyard_proto::v1::router_server::RouterServer;
use tokio::net::TcpListener;

pub use cluster::Cluster;
pub use dispatch::RemoteExperts;
pub use error::RouterError;

use crate::scheduler::Scheduler;
use crate::service::RouterService;

/// The placement epoch of a placement given on the command line (the coordinator numbers
/// its own).
pub const STATIC_EPOCH: u64 = 1;

/// How a router is configured (`switchyard router`).
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Checkpoint directory in Hugging Face layout; the router reads all but the experts.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: PathBuf,
    /// Expert nodes (`host:port`, comma-separated); what each holds is asked from the node.
    #[arg(long, env = "SWITCHYARD_EXPERT_NODES", value_delimiter = ',', required = true)]
    pub expert_nodes: Vec<String>,
    /// A node that has not answered a dispatch within this many milliseconds is taken out and
    /// its work re-sent to another replica.
    #[arg(long, env = "SWITCHYARD_DISPATCH_TIMEOUT_MS", default_value_t = 10_000)]
    pub dispatch_timeout_ms: u64,
    /// How long start-up waits for every expert node to answer, in seconds.
    #[arg(long, env = "SWITCHYARD_NODE_WAIT_SECS", default_value_t = 60)]
    pub node_wait_secs: u64,
    /// Sequences batched into one step at most.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH", default_value_t = 64)]
    pub max_batch: usize,
    /// Requests waiting for a slot at most; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
}

/// A started router, ready to serve.
pub struct Router {
    service: RouterService,
}

impl Router {
    /// Reaches the expert nodes, checks the placement covers the model, and loads the dense
    /// weights (reporting `progress(layers_done, layers_total)`). Must run inside a tokio
    /// runtime.
    pub async fn start(config: Config, progress: Box<dyn FnMut(usize, usize) + Send>) -> Result<Self, RouterError> {
        let spec = ModelSpec::from_dir(&config.model)?;
        let wait = Duration::from_secs(config.node_wait_secs);
        let cluster = Cluster::connect(&config.expert_nodes, &spec, wait).await?;
        let experts = RemoteExperts::new(
            cluster.clone(),
            tokio::runtime::Handle::current(),
            STATIC_EPOCH,
            Duration::from_millis(config.dispatch_timeout_ms),
        );
        let dir = config.model.clone();
        let mut progress = progress;
        let engine = tokio::task::spawn_blocking(move || Engine::load_dense(&dir, Box::new(experts), &mut *progress))
            .await
            .map_err(std::io::Error::other)??;
        tracing::info!(
            model_type = spec.arch.model_type(),
            nodes = cluster.nodes.len(),
            "router ready for {}",
            config.model.display()
        );
        let scheduler = Scheduler::start(engine, config.max_batch, config.max_queue)?;
        let service = RouterService { scheduler, cluster, model_type: spec.arch.model_type(), epoch: STATIC_EPOCH };
        Ok(Router { service })
    }

    /// Serves the gRPC API on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), RouterError> {
        tonic::transport::Server::builder()
            .add_service(RouterServer::new(self.service))
            .serve_with_incoming_shutdown(switchyard_proto::incoming_nodelay(listener), shutdown)
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }
}

/// Starts and serves: [`Router::start`], then [`Router::serve`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    Router::start(config, Box::new(|_, _| {})).await?.serve(listener, shutdown).await
}
