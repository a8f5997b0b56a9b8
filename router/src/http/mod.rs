//! The OpenAI-compatible HTTP API of the router (axum): `/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`, `/tokenize`, `/detokenize`.
//!
//! # Layout
//! - [`generate`]: the completions and chat handlers, streaming (server-sent events) or not.
//! - [`choice`]: one generated sequence: detokenizing, stop strings, logprob objects.
//! - [`openai`]: request bodies as clients send them.
//! - [`error`]: errors in OpenAI's shape, and the status of each.

pub mod choice;
pub mod error;
pub mod generate;
pub mod openai;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_model::chat::{ChatMessage, ChatTemplate};
use switchyard_model::tokenizer::Tokenizer;
use tokio::net::TcpListener;

use crate::scheduler::Scheduler;
use crate::tenants::{Tenant, Tenants};
use error::ApiError;

/// What every handler shares.
pub struct HttpState {
    pub scheduler: Scheduler,
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// The name clients pass as `model`.
    pub model_name: String,
    pub max_context: usize,
    /// Renders `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub created: u64,
    /// API keys and limits; `None`: the API is open.
    pub tenants: Option<Tenants>,
}

/// The tenant calling, from `Authorization: Bearer KEY`; `None` when the API is open.
/// Refuses a missing or unknown key with 401.
pub struct Caller(pub Option<Arc<Tenant>>);

impl FromRequestParts<Arc<HttpState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<HttpState>) -> Result<Self, ApiError> {
        let Some(tenants) = &state.tenants else { return Ok(Caller(None)) };
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let key = header
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| ApiError::unauthorized("missing API key: send `Authorization: Bearer KEY`"))?;
        let tenant = tenants.find(key.trim()).ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
        Ok(Caller(Some(tenant)))
    }
}

impl HttpState {
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name { Ok(()) } else { Err(ApiError::model_not_found(model, &self.model_name)) }
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer, ApiError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::invalid("the model has no tokenizer; send token ids", Some("prompt")))
    }
}

/// 200 while the router serves; 503 with the reason once its engine has failed.
async fn health(State(state): State<Arc<HttpState>>) -> Result<&'static str, ApiError> {
    match state.scheduler.health.failure() {
        None => Ok(""),
        Some(reason) => Err(crate::scheduler::ServeError::EngineFailed { reason: reason.to_string() }.into()),
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 << 20;

pub fn app(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
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
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// A JSON body whose rejections are OpenAI-shaped errors (400, or 413 when too large).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status();
                let status = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    status
                } else {
                    axum::http::StatusCode::BAD_REQUEST
                };
                Err(ApiError { status, message: rejection.body_text(), param: None, code: None })
            }
        }
    }
}

async fn models(State(s): State<Arc<HttpState>>, _: Caller) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "switchyard",
            "max_model_len": s.max_context,
        }],
    }))
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    match &s.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => "".into_response(),
    }
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(
    State(s): State<Arc<HttpState>>,
    _: Caller,
    ApiJson(r): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    if let Some(m) = &r.model {
        s.check_model(m)?;
    }
    let tk = s.tokenizer()?;
    let ids = match (&r.prompt, &r.messages) {
        (Some(p), None) if r.add_special_tokens => tk.encode(p),
        (Some(p), None) => tk.encode_raw(p),
        (None, Some(messages)) => {
            let template = s
                .template
                .as_ref()
                .ok_or_else(|| ApiError::invalid("the model has no chat template", Some("messages")))?;
            let text =
                template.render(messages, true).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            tk.encode_raw(&text)
        }
        _ => return Err(ApiError::invalid("send exactly one of `prompt` and `messages`", None)),
    }
    .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    Ok(Json(json!({"count": ids.len(), "max_model_len": s.max_context, "tokens": ids})))
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(
    State(s): State<Arc<HttpState>>,
    _: Caller,
    ApiJson(r): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    if let Some(m) = &r.model {
        s.check_model(m)?;
    }
    let text = s.tokenizer()?.decode(&r.tokens).map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
    Ok(Json(json!({"prompt": text})))
}
