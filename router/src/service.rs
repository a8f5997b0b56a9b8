//! The router's gRPC API: `Generate` (server-streaming tokens) and `ClusterStatus`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use switchyard_proto::v1::router_server::Router;
use switchyard_proto::v1::{self, generate_response::Event};
use switchyard_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ExpertNodeInfo, GenerateRequest, GenerateResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::convert::{self, Prompt};
use crate::http::choice::Choice;
use crate::scheduler::Scheduler;
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

/// A tenant's refusal as the HTTP API words and counts it: over a limit for now
/// (RESOURCE_EXHAUSTED), or a request that can never fit it (INVALID_ARGUMENT naming the field).
fn over_limit(tenant: &Tenant, e: crate::tenants::OverLimit) -> Status {
    crate::http::error::ApiError::over_limit(tenant, e).into()
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
        let mut r = request.into_inner();
        // The HTTP API's checks, with its messages: the request read as the same fields.
        let prompt = convert::prompt(&mut r)?;
        let sampling = convert::sampling(&r)?;
        let max_tokens = (r.max_tokens > 0).then_some(u64::from(r.max_tokens));
        let logprobs = Some(r.top_logprobs).filter(|&k| k > 0);
        let mut params =
            crate::http::generate::params(&sampling, max_tokens, 16, logprobs, self.scheduler.vocab_size, false)?;
        let prompt_logprobs = crate::http::generate::vllm_prompt_logprobs_asked(r.prompt_logprobs.map(u64::from))?;
        (params.prompt_logprobs, params.vllm_prompt_logprobs) = (prompt_logprobs, prompt_logprobs);
        if let Some((grammar, field)) = crate::http::structured::requested(&sampling)? {
            params.constraint =
                Some(self.tokenizing.compile(grammar, field).await.map_err(crate::http::error::ApiError::from)?);
        }
        crate::http::generate::tokenize_bad_words(&self.tokenizing, &mut params).await?;
        let tokenizer = self.tokenizing.tokenizer.clone();
        let prompt_ids = match prompt {
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
        let span = tracing::info_span!(
            "generate",
            otel.kind = "server",
            rpc.system = "grpc",
            prompt_tokens = prompt_ids.len()
        );
        // A caller's W3C trace context in the call's metadata makes this request part of its trace.
        crate::trace::join_caller(&span, |k| Some(metadata.get(k)?.to_str().ok()?.to_string()));
        let reservation: Option<Reservation> = match &tenant {
            Some(t) => {
                let reserved =
                    t.admit(&[prompt_ids.len()], 1, params.max_tokens).await.map_err(|e| over_limit(t, e))?;
                reserved.into_iter().next()
            }
            None => None,
        };
        // The HTTP API's choice: the same incremental detokenizer, stop strings and stop token
        // ids; the tenant's reservation lives as long as the stream and gives back the rest.
        let mut choice =
            Choice::start(&self.scheduler, prompt_ids, &params, 0, reservation).instrument(span.clone()).await?;
        let (tx, rx) = mpsc::channel(16);
        let started = GenerateResponse {
            event: Some(Event::Started(v1::Started {
                prompt_ids: choice.prompt_ids.clone(),
                cached_tokens: choice.cached_tokens as u32,
                prompt_logprobs: choice
                    .prompt_logprobs
                    .take()
                    .unwrap_or_default()
                    .iter()
                    .map(convert::prompt_logprob)
                    .collect(),
            })),
        };
        tokio::spawn(
            async move {
                let mut text = String::new();
                loop {
                    let delta = match choice.next(tokenizer.as_deref()).await {
                        Ok(Some(delta)) => delta,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    text.push_str(&delta.text);
                    let last = delta.tokens.len().saturating_sub(1);
                    for (i, t) in delta.tokens.iter().enumerate() {
                        let mut token = convert::token(t, tokenizer.as_deref());
                        if i == last {
                            token.delta = delta.text.clone();
                        }
                        let event = GenerateResponse { event: Some(Event::Token(token)) };
                        // The caller left: dropping the choice cancels the sequence.
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    if let Some(reason) = delta.finish {
                        let reason = if reason == "length" { v1::FinishReason::Length } else { v1::FinishReason::Stop };
                        let finished = v1::Finished { reason: reason as i32, text: std::mem::take(&mut text) };
                        let _ = tx.send(Ok(GenerateResponse { event: Some(Event::Finished(finished)) })).await;
                        return;
                    }
                }
            }
            .instrument(span),
        );
        let stream = tokio_stream::once(Ok(started)).chain(ReceiverStream::new(rx));
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
