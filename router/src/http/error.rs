//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status a client expects. The one mapping from [`ServeError`] to HTTP lives here.

use std::borrow::Cow;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::api::{ErrorBody, ErrorResponse};

use crate::scheduler::ServeError;
use crate::tenants::{OverLimit, Tenant};
use crate::tokenize::TokenizeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field the error is about.
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(Cow::Borrowed),
            code: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::FORBIDDEN, message: message.into(), param: None, code: Some("forbidden") }
    }

    /// A tenant over a limit: 429 while it may fit later, 400 naming the field when the
    /// request can never fit. Counted as a rejection of the tenant.
    pub fn over_limit(tenant: &Tenant, e: OverLimit) -> Self {
        metrics::counter!(crate::metric_names::TENANT_REJECTED, "tenant" => tenant.name.clone()).increment(1);
        match e.permanent {
            Some(field) => ApiError::invalid(e.to_string(), Some(field)),
            None => ApiError::rate_limited(e.to_string()),
        }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves `{served}`"),
            param: Some(Cow::Borrowed("model")),
            code: Some("model_not_found"),
        }
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

/// The one mapping of [`ServeError`] to HTTP statuses.
impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let (status, param) = match &e {
            ServeError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
            ServeError::KvCacheTooSmall { .. } => (StatusCode::BAD_REQUEST, Some("max_tokens")),
            ServeError::QueueFull { .. }
            | ServeError::ShuttingDown
            | ServeError::ExpertsUnavailable(_)
            | ServeError::EngineFailed { .. } => (StatusCode::SERVICE_UNAVAILABLE, None),
            ServeError::GrammarFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, None),
            ServeError::StepFailed(_) | ServeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        ApiError { status, message: e.to_string(), param: param.map(Cow::Borrowed), code: None }
    }
}

/// Prompts that cannot be tokenized are the client's to fix: 400 naming the field.
impl From<TokenizeError> for ApiError {
    fn from(e: TokenizeError) -> Self {
        ApiError::invalid(e.to_string(), Some(e.field()))
    }
}

impl ApiError {
    /// The body OpenAI's clients read.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind(),
                param: self.param.as_ref().map(|p| p.to_string()),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The same refusal on the gRPC API: the HTTP status's gRPC counterpart, the same message
/// (naming the field, as `field: message` where the message does not already).
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match e.status.as_u16() {
            400 | 413 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            408 => Code::DeadlineExceeded,
            429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            _ => Code::Internal,
        };
        let message = match &e.param {
            Some(p) if !e.message.contains(p.as_ref()) => format!("{p}: {}", e.message),
            _ => e.message,
        };
        tonic::Status::new(code, message)
    }
}
