//! The router's gRPC API: `Generate` (server-streaming tokens) and `ClusterStatus`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use switchyard_proto::v1::router_server::Router;
use switchyard_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ExpertNodeInfo, GenerateRequest, GenerateResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::convert::{self, Prompt};
use crate::scheduler::{Scheduler, Submission};
use crate::tenants::{NoTenant, Reservation, Tenant, TenantList};
use crate::tokenize::Tokenizing;

pub struct RouterService {
    pub scheduler: Scheduler,
    /// The same tenants as the HTTP API (`None`: open): a call carries its key in the
    /// `authorization: Bearer KEY` metadata.
    pub tenants: Arc<TenantList>,
    /// The tokenizer (shared with every request's stream) and the pool prompts are
    /// tokenized on, shared with the HTTP API.
    pub tokenizing: Arc<Tokenizing>,
    pub cluster: Arc<Cluster>,
    pub model_type: &'static str,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

impl RouterService {
    /// The tenant whose key the call carries (`authorization: Bearer KEY`); `None` when the
    /// API is open. The same keys as the HTTP API.
    fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<Arc<Tenant>>, Status> {
        let Some(tenants) = self.tenants.get() else { return Ok(None) };
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        match tenants.authenticate(header) {
            Ok(tenant) => Ok(Some(tenant)),
            Err(NoTenant::MissingKey) => {
                Err(Status::unauthenticated("missing API key: send `authorization: Bearer KEY` metadata"))
            }
            Err(NoTenant::InvalidKey) => Err(Status::unauthenticated("invalid API key")),
        }
    }
}

/// A tenant's refusal as a status: over a limit for now (RESOURCE_EXHAUSTED), or a request that
/// can never fit it (INVALID_ARGUMENT naming the field).
fn over_limit(tenant: &Tenant, e: crate::tenants::OverLimit) -> Status {
    metrics::counter!(crate::metric_names::TENANT_REJECTED, "tenant" => tenant.name.clone()).increment(1);
    match e.permanent {
        Some(field) => Status::invalid_argument(format!("{field}: {e}")),
        None => Status::resource_exhausted(e.to_string()),
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let metadata = request.metadata().clone();
        // Who calls, and whether they may now, before any work on the prompt.
        let tenant = self.caller(&metadata)?;
        if let Some(t) = &tenant {
            t.precheck().map_err(|e| over_limit(t, e))?;
        }
        let (prompt, mut request) = convert::request(request.into_inner())?;
        let tokenizer = self.tokenizing.tokenizer.clone();
        request.prompt_ids = match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(text) => {
                let mut ids = self.tokenizing.encode(vec![text], true).await.map_err(|e| match e {
                    crate::tokenize::TokenizeError::NoTokenizer => {
                        Status::invalid_argument("the model has no tokenizer; send token_ids")
                    }
                    e => Status::invalid_argument(e.to_string()),
                })?;
                ids.pop().unwrap_or_default()
            }
        };
        let (events, mut rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!(
            "generate",
            otel.kind = "server",
            rpc.system = "grpc",
            prompt_tokens = request.prompt_ids.len()
        );
        // A caller's W3C trace context in the call's metadata makes this request part of its trace.
        crate::trace::join_caller(&span, |k| Some(metadata.get(k)?.to_str().ok()?.to_string()));
        let mut reservation: Option<Reservation> = match &tenant {
            Some(t) => {
                let reserved =
                    t.admit(&[request.prompt_ids.len()], 1, request.max_tokens).await.map_err(|e| over_limit(t, e))?;
                reserved.into_iter().next()
            }
            None => None,
        };
        let (tenant_name, priority) = tenant.as_ref().map_or((None, 0), |t| (Some(t.name.clone()), t.priority));
        // The gRPC request has no field for sampling controls yet: none apply.
        let controls = Default::default();
        self.scheduler.submit(Submission { request, controls, events, tenant: tenant_name, priority, span })?;
        // The first event says whether the request was accepted; a rejection is the call's
        // status rather than an error inside the stream.
        let mut ids = Vec::new();
        let first = match rx.recv().await {
            Some(Ok(e)) => convert::event(e, &mut ids, tokenizer.as_deref())
                .ok_or_else(|| Status::internal("the engine's first event was not `Started`"))?,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(Status::unavailable("the router is shutting down")),
        };
        // The tenant's reservation lives as long as the stream: each token is charged to it,
        // and what was not generated goes back when the stream ends or the caller leaves.
        if let Some(r) = &mut reservation {
            r.started();
        }
        let rest = UnboundedReceiverStream::new(rx).filter_map(move |e| match e {
            Ok(e) => {
                if let (Some(r), crate::scheduler::Event::Token(_)) = (&mut reservation, &e) {
                    r.generated(1);
                }
                convert::event(e, &mut ids, tokenizer.as_deref()).map(Ok)
            }
            Err(e) => Some(Err(Status::from(e))),
        });
        let stream = tokio_stream::once(Ok(first)).chain(rest);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        // It names every node and its process: with tenants, only those who may read /metrics.
        if let Some(t) = self.caller(request.metadata())?
            && !t.metrics
        {
            return Err(Status::permission_denied(format!(
                "tenant `{}` may not read the cluster's status (it needs `metrics = true` in the tenants file)",
                t.name
            )));
        }
        let nodes = self
            .cluster
            .nodes()
            .iter()
            .map(|n| {
                let v = n.view();
                let state = match (n.trust(), v.serving) {
                    (crate::cluster::Trust::Refused, _) => "refused",
                    (_, false) => "unreachable",
                    (crate::cluster::Trust::OnProbation, true) => "on probation",
                    (crate::cluster::Trust::Proven, true) => "serving",
                };
                ExpertNodeInfo {
                    address: v.address,
                    state: state.to_string(),
                    experts: v.holds,
                    last_error: v.last_error.unwrap_or_default(),
                    dispatches: v.dispatches,
                    mean_round_trip_micros: v.mean_round_trip_micros,
                    pid: v.pid,
                }
            })
            .collect();
        let load = &self.scheduler.load;
        Ok(Response::new(ClusterStatusResponse {
            model_type: self.model_type.to_string(),
            epoch: self.cluster.epoch(),
            nodes,
            queued_requests: load.queued.load(Ordering::Relaxed),
            running_requests: load.running.load(Ordering::Relaxed),
        }))
    }
}
