//! The Switchyard router: takes generation requests over gRPC, tokenizes and schedules them
//! into batches, runs the dense part of the model (embeddings, attention, norms, the gate and
//! any shared expert) and dispatches each MoE layer's token activations to the expert nodes
//! that hold the experts the gate chose, adding their partial sums to the residual.
//!
//! Start-up is [`Router::start`] (reach the expert nodes — from `--expert-nodes`, or by
//! following the coordinators' placement — check they cover every expert, load the dense
//! weights), then [`Router::serve`] on a bound listener until `shutdown` resolves.
//!
//! # Layout
//! - [`cluster`]: links to the expert nodes: one dispatch stream each, reconnecting; following
//!   the coordinators' placement epochs and reporting load to them.
//! - [`dispatch`]: [`RemoteExperts`], the expert backend with replica choice and failover.
//! - [`scheduler`]: the supervised engine thread, batching running and newly admitted
//!   sequences per step; [`scheduler::ServeError`], why a request failed.
//! - [`service`]: the gRPC `Router` service (`Generate`, `ClusterStatus`).
//! - [`http`]: the OpenAI-compatible HTTP API.
//! - [`trace`]: joining a caller's trace (W3C trace context).
//! - [`tenants`]: API keys, per-tenant limits, reservations and priorities (`--tenants FILE`).
//! - [`tokenize`]: prompts to token ids on a bounded pool of blocking threads, with a size limit.
//! - [`metric_names`]: the metrics recorded (Prometheus, `/metrics`).
//! - [`convert`]: protobuf ⇄ model types.
//! - [`error`]: the error type, [`RouterError`].

pub mod cluster;
pub mod convert;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod metric_names;
pub mod scheduler;
pub mod service;
pub mod tenants;
pub mod tokenize;
pub mod trace;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::Arc;

use switchyard_model::chat::ChatTemplate;
use switchyard_model::grammar::Grammars;
use switchyard_model::{Engine, EngineOptions, ModelSpec};
use switchyard_proto::v1::router_server::RouterServer;
use tokio::net::TcpListener;

pub use cluster::Cluster;
pub use dispatch::RemoteExperts;
pub use error::RouterError;

use crate::scheduler::{EngineFaults, Scheduler};
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
    #[arg(
        long,
        env = "SWITCHYARD_EXPERT_NODES",
        value_delimiter = ',',
        required_unless_present = "coordinators",
        conflicts_with = "coordinators"
    )]
    pub expert_nodes: Vec<String>,
    /// Coordinators (`host:port`, comma-separated): follow their placement epochs (and report
    /// load to them) instead of a fixed `--expert-nodes` list.
    #[arg(long, env = "SWITCHYARD_COORDINATORS", value_delimiter = ',')]
    pub coordinators: Vec<String>,
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
    /// Requests waiting for a slot at most; more are refused (RESOURCE_EXHAUSTED / 503).
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// Memory of the KV cache (paged, shared by all sequences; suffixes K, M, G, KiB, MiB,
    /// GiB). Requests wait while it is full.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MEMORY", default_value = "4GiB", value_parser = switchyard_model::units::parse_bytes)]
    pub kv_cache_memory: usize,
    /// Compute every prompt in full: no reuse of the KV blocks of prefixes seen before
    /// (prefix caching is on by default; only requests of the same tenant and `cache_salt`
    /// share blocks).
    #[arg(long, env = "SWITCHYARD_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// On SIGTERM the router stops taking connections (so it reads as not ready, and load
    /// balancers send new requests elsewhere) and finishes the requests it holds, for at most
    /// this many seconds; what is still running then is cut. Keep it below the orchestrator's
    /// grace period (Kubernetes' `terminationGracePeriodSeconds`).
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT_SECS", default_value_t = 30.0)]
    pub drain_timeout_secs: f64,
    /// Tenants with API keys and limits (TOML; see `switchyard_router::tenants`), for a router
    /// with `--expert-nodes`. Without it the APIs are open. With `--coordinators` the tenants
    /// are theirs (`switchyard cluster set-tenants`), with one budget for all routers.
    #[arg(long, env = "SWITCHYARD_TENANTS")]
    pub tenants: Option<PathBuf>,
    /// Bytes of prompt text (or chat message text) one request may send at most; more is
    /// refused (400) before it is tokenized. The HTTP body limit is 4× this plus 64 KiB (JSON
    /// escapes). Suffixes K, M, KiB, MiB...
    #[arg(long, env = "SWITCHYARD_MAX_PROMPT_BYTES", default_value = "1MiB", value_parser = switchyard_model::units::parse_bytes)]
    pub max_prompt_bytes: usize,
    /// Prompts tokenized (or chat templates rendered) at once, on blocking threads off the
    /// async runtime; more wait their turn (default: one per core).
    #[arg(long, env = "SWITCHYARD_TOKENIZER_THREADS")]
    pub tokenizer_threads: Option<usize>,
    #[command(flatten)]
    pub http: http::HttpLimits,
    /// The model name the HTTP API answers to (default: the checkpoint directory's name).
    #[arg(long, env = "SWITCHYARD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Where the dense layers and the KV cache live: `cpu`, or `cuda:N` (that GPU's memory,
    /// `--kv-cache-memory` of it for the cache; a build with `--features cuda`).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    pub device: switchyard_kernels::Device,
    /// Fault injection for tests: the engine thread panics in this step (1 = the first).
    #[arg(long, env = "SWITCHYARD_FAULT_ENGINE_PANIC_AT_STEP", hide = true)]
    pub fault_engine_panic_at_step: Option<u64>,
    /// With coordinators: an expert node that a later placement adds is on probation until
    /// this many samples of its answers agree with another replica's (another replica answers
    /// for it meanwhile); one that disagrees gets no more dispatches and is drained. 0: trust
    /// every node.
    #[arg(long, env = "SWITCHYARD_CANARY_CHECKS", default_value_t = 3)]
    pub canary_checks: u64,
    #[command(flatten)]
    pub limits: switchyard_proto::server::ConnectionLimits,
    /// Mutual TLS to the expert nodes and coordinators (a router certificate). The router's
    /// own gRPC and HTTP APIs are for clients: they authenticate with the tenants' API keys.
    #[command(flatten)]
    pub tls: switchyard_proto::tls::TlsFlags,
}

/// A started router, ready to serve.
pub struct Router {
    service: RouterService,
    http: Arc<http::HttpState>,
    limits: switchyard_proto::server::ConnectionLimits,
    drain_timeout: Duration,
}

impl Router {
    /// Reaches the expert nodes, checks the placement covers the model, and loads the dense
    /// weights (reporting `progress(layers_done, layers_total)`). Must run inside a tokio
    /// runtime.
    pub async fn start(config: Config, progress: Box<dyn FnMut(usize, usize) + Send>) -> Result<Self, RouterError> {
        let drain_timeout = Duration::try_from_secs_f64(config.drain_timeout_secs).map_err(|_| {
            RouterError::Config(format!(
                "--drain-timeout-secs must be a non-negative number of seconds, got {}",
                config.drain_timeout_secs
            ))
        })?;
        let spec = ModelSpec::from_dir(&config.model)?;
        let block_bytes = switchyard_model::kv_cache::KvPool::block_floats(&spec) * 4;
        if config.kv_cache_memory < block_bytes {
            return Err(RouterError::Config(format!(
                "--kv-cache-memory {} bytes holds no KV-cache block ({block_bytes} bytes each)",
                config.kv_cache_memory
            )));
        }
        if config.tenants.is_some() && !config.coordinators.is_empty() {
            return Err(RouterError::Config(
                "--tenants with --coordinators: the coordinators hold the cluster's tenants, so that every router \
                 enforces one budget; give them the file with `switchyard cluster set-tenants FILE` and drop --tenants"
                    .into(),
            ));
        }
        let tenants =
            Arc::new(tenants::TenantList::fixed(config.tenants.as_deref().map(tenants::Tenants::load).transpose()?));
        config.http.validate()?;
        if config.tokenizer_threads == Some(0) || config.max_prompt_bytes == 0 {
            return Err(RouterError::Config("--tokenizer-threads and --max-prompt-bytes must be at least 1".into()));
        }
        let wait = Duration::from_secs(config.node_wait_secs);
        let security = config.tls.load(switchyard_proto::tls::Role::Router).map_err(RouterError::Config)?;
        let cluster = if config.coordinators.is_empty() {
            Cluster::connect(&config.expert_nodes, &security, &spec, wait).await?
        } else {
            let client = switchyard_coordinator::client::Client::new(&config.coordinators, &security)
                .map_err(RouterError::Config)?;
            tenants::follow(client.clone(), tenants.clone(), wait).await?;
            Cluster::follow(client, &security, &spec, wait, config.canary_checks).await?
        };
        let experts = RemoteExperts::new(
            cluster.clone(),
            tokio::runtime::Handle::current(),
            Duration::from_millis(config.dispatch_timeout_ms),
        );
        let dir = config.model.clone();
        let mut progress = progress;
        let options = EngineOptions {
            device: config.device,
            kv_bytes: Some(config.kv_cache_memory),
            prefix_caching: !config.no_prefix_caching,
            ..Default::default()
        };
        let engine = tokio::task::spawn_blocking(move || -> Result<Engine, RouterError> {
            Ok(Engine::load_dense(&dir, Box::new(experts), &options, &mut *progress)?)
        })
        .await
        .map_err(std::io::Error::other)??;
        tracing::info!(
            model_type = spec.arch.model_type(),
            nodes = cluster.nodes().len(),
            epoch = cluster.epoch(),
            "router ready for {}",
            config.model.display()
        );
        let tokenizer = engine.tokenizer.clone().map(Arc::new);
        let threads = config
            .tokenizer_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
        let template = ChatTemplate::from_dir(&config.model)?;
        let output_format =
            http::message::OutputFormat::detect(tokenizer.as_deref(), template.as_ref().map(ChatTemplate::source));
        let grammars = match std::fs::read_to_string(config.model.join("tokenizer.json")) {
            Ok(text) => Grammars::from_tokenizer_json(&text, spec.vocab_size, &engine.eos_token_ids),
            Err(e) => Err(format!("tokenizer.json: {e}")),
        };
        match &grammars {
            Ok(_) => tracing::info!(?output_format, "structured output and tool calling ready"),
            Err(why) => tracing::warn!("structured output unavailable: {why}"),
        }
        let tokenizing = Arc::new(
            tokenize::Tokenizing::new(tokenizer.clone(), template, threads, config.max_prompt_bytes)
                .with_grammars(grammars),
        );
        let max_context = engine.model.spec.max_context;
        let faults = EngineFaults { panic_at_step: config.fault_engine_panic_at_step };
        let scheduler = Scheduler::start(engine, config.max_batch, config.max_queue, faults)?;
        let http = Arc::new(http::HttpState {
            scheduler: scheduler.clone(),
            tokenizer: tokenizer.clone(),
            tokenizing: tokenizing.clone(),
            cluster: cluster.clone(),
            limits: config.http.clone(),
            model_name: config.served_model_name.clone().unwrap_or_else(|| default_model_name(&config.model)),
            max_context,
            metrics: metrics_recorder(),
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            tenants: tenants.clone(),
            output_format,
        });
        let service = RouterService { scheduler, tokenizing, cluster, tenants, model_type: spec.arch.model_type() };
        Ok(Router { service, http, limits: config.limits, drain_timeout })
    }

    /// The name the HTTP API answers to.
    pub fn model_name(&self) -> &str {
        &self.http.model_name
    }

    /// Serves the gRPC API on `grpc` and, if given, the OpenAI HTTP API on `http`, until
    /// `shutdown` resolves.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RouterError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|&s| s).await;
        };
        let http_server = http.map(|listener| {
            let app = http::app(self.http.clone());
            tokio::spawn(http::serve(listener, app, self.http.limits.clone(), until(stopped.clone())))
        });
        // gRPC health (grpc.health.v1): SERVING until the engine fails or shutdown begins.
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<RouterServer<RouterService>>().await;
        // The drain: once shutdown begins, the servers finish what they hold, within the bound.
        let load = self.service.scheduler.load.clone();
        let (drain_timeout, mut draining) = (self.drain_timeout, stopped.clone());
        let deadline = async move {
            let _ = draining.wait_for(|&s| s).await;
            let (running, queued) = (load.running.load(Ordering::Relaxed), load.queued.load(Ordering::Relaxed));
            tracing::info!(running, queued, timeout_s = drain_timeout.as_secs_f64(), "draining: no new connections");
            tokio::time::sleep(drain_timeout).await;
            let running = load.running.load(Ordering::Relaxed) + load.queued.load(Ordering::Relaxed);
            tracing::warn!(running, "the drain timed out: cutting the requests still running");
        };
        let engine = self.service.scheduler.health.clone();
        let cluster = self.service.cluster.clone();
        let mut stopping = stopped.clone();
        tokio::spawn(async move {
            // NOT_SERVING for good once the engine fails or shutdown begins; meanwhile it
            // follows whether every expert has a reachable replica, as HTTP `/health` does.
            let mut serving = true;
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            loop {
                let over = tokio::select! {
                    _ = engine.failed() => true,
                    _ = stopping.wait_for(|&s| s) => true,
                    _ = tick.tick() => false,
                };
                if over {
                    break;
                }
                let now = cluster.unserved_expert().is_none();
                if now != serving {
                    serving = now;
                    if now {
                        reporter.set_serving::<RouterServer<RouterService>>().await;
                    } else {
                        reporter.set_not_serving::<RouterServer<RouterService>>().await;
                    }
                }
            }
            reporter.set_not_serving::<RouterServer<RouterService>>().await;
        });
        let serving = async move {
            self.limits
                .builder()
                .add_service(health)
                .add_service(RouterServer::new(self.service))
                .serve_with_incoming_shutdown(self.limits.incoming(grpc), until(stopped))
                .await
                .map_err(std::io::Error::other)?;
            if let Some(h) = http_server {
                h.await.map_err(std::io::Error::other)??;
            }
            tracing::info!("drained");
            Ok::<_, RouterError>(())
        };
        tokio::select! {
            served = serving => served,
            () = deadline => Ok(()),
        }
    }
}

/// How often gRPC health looks at whether every expert is served.
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);

/// Starts and serves: [`Router::start`], then [`Router::serve`].
pub async fn run(
    config: Config,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    Router::start(config, Box::new(|_, _| {})).await?.serve(grpc, http, shutdown).await
}

fn default_model_name(dir: &std::path::Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// The process-wide Prometheus recorder (installed once; `None` if another recorder is).
fn metrics_recorder() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&metric_names::LATENCY_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}
