//! The REST error surface: `{"error":{"code","message"}}` with the codes
//! wrenn's SDK maps to its exception classes (`specs/wrenn-api.md` §1.4).
//! Domain and agent errors become one of these exactly once, here; the
//! internal cause of a 5xx goes to the log, not to the caller.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use connectrpc::ErrorCode;

use crate::db::DbError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }
    pub fn host_unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "host_unavailable", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }

    /// A capsule the caller cannot see (absent or another team's).
    pub fn capsule_not_found() -> Self {
        Self::not_found("capsule not found")
    }

    /// An agent's refusal to start or resume a capsule: `resource_exhausted`
    /// there is the host's capacity (503 `host_unavailable`, which the SDK
    /// reads as "no suitable host").
    pub fn agent_placing(e: &connectrpc::ConnectError) -> Self {
        match e.code {
            ErrorCode::ResourceExhausted => Self::host_unavailable(
                e.message
                    .clone()
                    .unwrap_or_else(|| e.code.as_str().to_owned()),
            ),
            _ => Self::agent(e),
        }
    }

    /// An agent RPC failure. Codes map as wrenn's `agentErrToHTTP` does,
    /// except that `deadline_exceeded` is a 504, `out_of_range` (a command's
    /// output or a request over a limit) a 413 `too_large`, and
    /// `resource_exhausted` (in a capsule: its disk is full, too many
    /// watchers) a 507 `agent_error`; see [`ApiError::agent_placing`].
    pub fn agent(e: &connectrpc::ConnectError) -> Self {
        let msg = e
            .message
            .clone()
            .unwrap_or_else(|| e.code.as_str().to_owned());
        match e.code {
            ErrorCode::NotFound => Self::not_found(msg),
            ErrorCode::InvalidArgument => Self::invalid(msg),
            ErrorCode::OutOfRange => Self::too_large(msg),
            ErrorCode::FailedPrecondition | ErrorCode::AlreadyExists | ErrorCode::Aborted => {
                Self::conflict(msg)
            }
            ErrorCode::PermissionDenied => Self::forbidden(msg),
            ErrorCode::Unavailable => Self::host_unavailable(msg),
            ErrorCode::ResourceExhausted => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "agent_error", msg)
            }
            ErrorCode::Unimplemented => Self::new(StatusCode::NOT_IMPLEMENTED, "agent_error", msg),
            ErrorCode::DeadlineExceeded => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "agent_error", msg)
            }
            _ => {
                tracing::warn!(code = e.code.as_str(), message = %msg, "agent call failed");
                Self::new(StatusCode::BAD_GATEWAY, "agent_error", msg)
            }
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        tracing::error!(error = ?e, "database error");
        ApiError::internal()
    }
}

impl From<connectrpc::ConnectError> for ApiError {
    fn from(e: connectrpc::ConnectError) -> Self {
        ApiError::agent(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        (self.status, axum::Json(body)).into_response()
    }
}
