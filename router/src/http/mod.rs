//! The OpenAI-compatible HTTP API of the router (axum): `/v1/completions`,
//! `/v1/chat/completions`, `/v1/models` and `/v1/models/{id}`, `/version`, `/health`, `/live`,
//! `/ready`, `/metrics`, `/tokenize`, `/detokenize`, and its OpenAPI document at `/openapi.json`.
//!
//! Connections are served by hyper directly ([`serve`]) so that a client cannot hold one
//! for free: request headers must arrive within `--http-header-timeout-secs` (which also
//! closes a keep-alive connection idle that long), and at most `--http-max-connections` are
//! open at once (more wait in the listen backlog).
//!
//! # Layout
//! - [`generate`]: the completions and chat handlers, streaming (server-sent events) or not.
//! - [`choice`]: one generated sequence: detokenizing, stop strings, logprob objects.
//! - [`openai`]: request bodies as clients send them.
//! - [`structured`]: the grammar a request's output follows (`response_format`, vLLM's
//!   `guided_*`, `tools` with `tool_choice`).
//! - [`message`]: a chat choice's output as content, reasoning and tool calls.
//! - [`chat`]: a chat request's tools, reasoning effort and grammar for the served model.
//! - [`api`]: response bodies, and the OpenAPI document generated from both.
//! - [`error`]: errors in OpenAI's shape, and the status of each.

pub mod api;
pub mod chat;
pub mod choice;
pub mod error;
pub mod generate;
pub mod message;
pub mod openai;
pub mod structured;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_model::chat::ChatMessage;
use switchyard_model::tokenizer::Tokenizer;
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::scheduler::Scheduler;
use crate::tenants::{NoTenant, Tenant, TenantList};
use crate::tokenize::Tokenizing;
use api::{Detokenized, ErrorResponse, Model, ModelList, TokenizeRefusals, Tokenized, Version};
use error::ApiError;

/// Limits on HTTP connections (`switchyard router`).
#[derive(clap::Args, Clone, Debug)]
pub struct HttpLimits {
    /// Seconds a client has to send a request's headers; also how long a keep-alive
    /// connection may sit idle. Slower connections are closed.
    #[arg(long, env = "SWITCHYARD_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10.0)]
    pub http_header_timeout_secs: f64,
    /// HTTP connections open at once at most; further ones wait to be accepted.
    #[arg(long, env = "SWITCHYARD_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Seconds a client has to send a request's body once its headers are in; a body that
    /// trickles slower is answered 408 and the connection closed.
    #[arg(long, env = "SWITCHYARD_HTTP_BODY_TIMEOUT_SECS", default_value_t = 30.0)]
    pub http_body_timeout_secs: f64,
}

impl HttpLimits {
    pub fn validate(&self) -> Result<(), crate::RouterError> {
        let seconds = |t: f64| t.is_finite() && t > 0.0 && t <= 86_400.0;
        let (t, b) = (self.http_header_timeout_secs, self.http_body_timeout_secs);
        if !seconds(t) || !seconds(b) || self.http_max_connections == 0 {
            return Err(crate::RouterError::Config(format!(
                "--http-header-timeout-secs and --http-body-timeout-secs must be in (0, 86400] (got {t} and {b}) \
                 and --http-max-connections at least 1"
            )));
        }
        Ok(())
    }
}

/// What every handler shares.
pub struct HttpState {
    pub scheduler: Scheduler,
    /// For detokenizing generated tokens.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Prompts to token ids, off the runtime (shared with the gRPC API).
    pub tokenizing: Arc<Tokenizing>,
    /// The expert nodes, for `/health`.
    pub cluster: Arc<Cluster>,
    pub limits: HttpLimits,
    /// The name clients pass as `model`.
    pub model_name: String,
    pub max_context: usize,
    /// Renders `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub created: u64,
    /// API keys and limits (none: the API is open).
    pub tenants: Arc<TenantList>,
    /// How the model writes tool calls and reasoning.
    pub output_format: message::OutputFormat,
}

/// The tenant calling, from `Authorization: Bearer KEY`; `None` when the API is open.
/// Refuses a missing or unknown key with 401.
pub struct Caller(pub Option<Arc<Tenant>>);

impl FromRequestParts<Arc<HttpState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<HttpState>) -> Result<Self, ApiError> {
        let Some(tenants) = state.tenants.get() else { return Ok(Caller(None)) };
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match tenants.authenticate(header) {
            Ok(tenant) => Ok(Caller(Some(tenant))),
            Err(NoTenant::MissingKey) => {
                Err(ApiError::unauthorized("missing API key: send `Authorization: Bearer KEY`"))
            }
            Err(NoTenant::InvalidKey) => Err(ApiError::unauthorized("invalid API key")),
        }
    }
}

/// A caller allowed to read `/metrics`: anyone when the API is open, else a tenant with
/// `metrics = true` (403 for other tenants).
pub struct MetricsReader;

impl FromRequestParts<Arc<HttpState>> for MetricsReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<HttpState>) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, state).await? {
            Caller(Some(t)) if !t.metrics => Err(ApiError::forbidden(format!(
                "tenant `{}` may not read /metrics (it needs `metrics = true` in the tenants file)",
                t.name
            ))),
            _ => Ok(MetricsReader),
        }
    }
}

impl HttpState {
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name { Ok(()) } else { Err(ApiError::model_not_found(model, &self.model_name)) }
    }

    /// Refuses the tenant's request if it is over a limit now, before any work is done on it.
    pub fn precheck(&self, caller: &Caller) -> Result<(), ApiError> {
        match &caller.0 {
            Some(t) => t.precheck().map_err(|e| ApiError::over_limit(t, e)),
            None => Ok(()),
        }
    }
}

/// Readiness: 200 while the router can serve; 503 with the reason once its engine has
/// failed, or while some expert has no reachable replica.
#[utoipa::path(get, path = "/health", security(()), responses(
    (status = 200, description = "Ready to serve", body = String, content_type = "text/plain"),
    (status = 503, description = "Not ready, and why", body = ErrorResponse),
))]
async fn health(State(state): State<Arc<HttpState>>) -> Result<&'static str, ApiError> {
    if let Some(reason) = state.scheduler.health.failure() {
        return Err(crate::scheduler::ServeError::EngineFailed { reason: reason.to_string() }.into());
    }
    if let Some(reason) = state.cluster.unserved_expert() {
        return Err(ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            message: reason,
            param: None,
            code: None,
        });
    }
    Ok("")
}

/// The orchestrator's readiness probe: `/health`.
#[utoipa::path(get, path = "/ready", security(()), responses(
    (status = 200, description = "Ready to serve", body = String, content_type = "text/plain"),
    (status = 503, description = "Not ready, and why", body = ErrorResponse),
))]
async fn ready(state: State<Arc<HttpState>>) -> Result<&'static str, ApiError> {
    health(state).await
}

/// The orchestrator's liveness probe: 200 while the process answers.
#[utoipa::path(get, path = "/live", security(()), responses(
    (status = 200, description = "The process answers", body = String, content_type = "text/plain"),
))]
async fn live() -> &'static str {
    "live"
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", security(()), responses(
    (status = 200, description = "The OpenAPI document of this server", body = Object),
))]
async fn openapi(State(s): State<Arc<HttpState>>) -> Json<Value> {
    Json(api::document(&s.model_name))
}

/// Largest request body accepted: room for `--max-prompt-bytes` of prompt written as JSON
/// (escapes make it longer) and the rest of the request.
pub fn max_body_bytes(max_prompt_bytes: usize) -> usize {
    max_prompt_bytes.saturating_mul(4).saturating_add(64 << 10)
}

pub fn app(state: Arc<HttpState>) -> Router {
    let body_limit = max_body_bytes(state.tokenizing.max_prompt_bytes);
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/version", get(version))
        .route("/health", get(health))
        // Orchestrators' probes: `/live` while the process answers, `/ready` as `/health`.
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|req: Request| async move {
            ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                message: format!("no route {} {}", req.method(), req.uri().path()),
                param: None,
                code: None,
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then lets the open
/// connections finish what they are answering and returns once all have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let header_timeout = Duration::from_secs_f64(limits.http_header_timeout_secs);
    let max = limits.http_max_connections;
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // (The guard wait_for returns is not Send: dropped inside.)
                () = async { drop(stopping.wait_for(|&s| s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a slot until it closes.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

/// A JSON body whose rejections are OpenAI-shaped errors (400, or 413 when too large).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<HttpState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<HttpState>) -> Result<Self, ApiError> {
        let seconds = state.limits.http_body_timeout_secs;
        let read = tokio::time::timeout(Duration::from_secs_f64(seconds), Json::<T>::from_request(req, state));
        match read.await {
            Err(_) => Err(ApiError {
                status: axum::http::StatusCode::REQUEST_TIMEOUT,
                message: format!("the request body did not arrive within {seconds} s"),
                param: None,
                code: None,
            }),
            Ok(Ok(Json(v))) => Ok(ApiJson(v)),
            Ok(Err(rejection)) => {
                let status = rejection.status();
                let status = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    status
                } else {
                    axum::http::StatusCode::BAD_REQUEST
                };
                let message = rejection.body_text();
                // A field refused by name (`openai.rs`) is the error's `param`, as OpenAI sets it.
                let param = message
                    .split('`')
                    .nth(1)
                    .filter(|f| !f.is_empty() && !f.contains(' '))
                    .map(|f| f.to_string().into());
                Err(ApiError { status, message, param, code: None })
            }
        }
    }
}

/// The served model as OpenAI's model object.
fn model_object(s: &HttpState) -> Model {
    Model {
        id: s.model_name.clone(),
        object: "model",
        created: s.created,
        owned_by: "switchyard",
        max_model_len: s.max_context,
    }
}

/// The served model, the only one.
#[utoipa::path(get, path = "/v1/models", responses(
    (status = 200, description = "The served model", body = ModelList),
    (status = 401, description = "Missing or unknown API key (with tenants)", body = ErrorResponse),
))]
async fn models(State(s): State<Arc<HttpState>>, _: Caller) -> Json<ModelList> {
    Json(ModelList { object: "list", data: vec![model_object(&s)] })
}

/// `GET /v1/models/{id}`: the served model, or 404 naming the id asked for.
#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path, description = "A model's name")), responses(
    (status = 200, description = "The served model", body = Model),
    (status = 401, description = "Missing or unknown API key (with tenants)", body = ErrorResponse),
    (status = 404, description = "Not the served model", body = ErrorResponse),
))]
async fn model(
    State(s): State<Arc<HttpState>>,
    _: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Model>, ApiError> {
    s.check_model(&id)?;
    Ok(Json(model_object(&s)))
}

/// `GET /version`: what clients probe to tell servers apart (as vLLM answers it).
#[utoipa::path(get, path = "/version", security(()), responses(
    (status = 200, description = "The server's version", body = Version),
))]
async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION"), server: "switchyard" })
}

/// Prometheus metrics: open without tenants, else for tenants with `metrics = true`.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Metrics in Prometheus' text format", body = String, content_type = "text/plain"),
    (status = 401, description = "Missing or unknown API key (with tenants)", body = ErrorResponse),
    (status = 403, description = "The tenant may not read metrics", body = ErrorResponse),
))]
async fn metrics(State(s): State<Arc<HttpState>>, _: MetricsReader) -> Response {
    match &s.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => "".into_response(),
    }
}

/// Exactly one of `prompt` and `messages`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    /// With `messages`: the tools rendered into the chat template, as `/v1/chat/completions`
    /// renders them.
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<serde_json::Value>,
    /// With `prompt`: add the tokenizer's special tokens (BOS) as generation does.
    #[serde(default = "yes")]
    #[schema(default = true)]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// The token ids of a prompt, or of a chat rendered through the template.
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses(
    (status = 200, description = "The token ids", body = Tokenized),
    TokenizeRefusals,
))]
async fn tokenize(
    State(s): State<Arc<HttpState>>,
    caller: Caller,
    ApiJson(r): ApiJson<TokenizeRequest>,
) -> Result<Json<Tokenized>, ApiError> {
    if let Some(m) = &r.model {
        s.check_model(m)?;
    }
    s.precheck(&caller)?;
    if r.tools.is_some() && r.messages.is_none() {
        return Err(ApiError::invalid("`tools` goes with `messages` (a chat), not with `prompt`", Some("tools")));
    }
    let some_tools = r.tools.as_ref().is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()));
    if some_tools && s.tokenizing.template.as_ref().is_some_and(|t| !t.reads("tools")) {
        return Err(ApiError::invalid(
            "`tools` are not rendered by this model's chat template, so they would change nothing",
            Some("tools"),
        ));
    }
    let ids = match (r.prompt, r.messages) {
        (Some(p), None) => s.tokenizing.encode(vec![p], r.add_special_tokens).await?.pop().unwrap_or_default(),
        (None, Some(messages)) => {
            let options = switchyard_model::chat::RenderOptions { tools: r.tools, ..Default::default() };
            s.tokenizing.chat(messages, options).await?
        }
        _ => return Err(ApiError::invalid("send exactly one of `prompt` and `messages`", None)),
    };
    Ok(Json(Tokenized { count: ids.len(), max_model_len: s.max_context, tokens: ids }))
}

/// An id no other response of this process has: `prefix`, the time in nanoseconds and a
/// counter, in hex.
pub(crate) fn unique_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}{t:x}{n:04x}")
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// The text of token ids.
#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses(
    (status = 200, description = "The text", body = Detokenized),
    TokenizeRefusals,
))]
async fn detokenize(
    State(s): State<Arc<HttpState>>,
    caller: Caller,
    ApiJson(r): ApiJson<DetokenizeRequest>,
) -> Result<Json<Detokenized>, ApiError> {
    if let Some(m) = &r.model {
        s.check_model(m)?;
    }
    s.precheck(&caller)?;
    let text = s.tokenizing.decode(r.tokens).await?;
    Ok(Json(Detokenized { prompt: text }))
}
