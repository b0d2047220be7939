//! The client's one error type.

use http_body_util::BodyExt;
use wrenn_types::envd::HttpError;

/// What went wrong talking to envd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid envd URL '{0}': expected http://host:port")]
    InvalidUrl(String),
    #[error("envd is not healthy: {0}")]
    NotHealthy(String),
    #[error("envd answered {status}: {message}")]
    Http { status: u16, message: String },
    #[error("envd rpc failed: {0}")]
    Rpc(#[from] connectrpc::ConnectError),
    #[error("cannot reach envd: {0}")]
    Transport(String),
    #[error("cannot build request: {0}")]
    Request(String),
    #[error("unexpected answer from envd: {0}")]
    Decode(String),
    #[error("the stream ended without an end event")]
    Truncated,
    #[error(
        "the command's output passed {} MiB; run it in the background and stream its output",
        limit >> 20
    )]
    OutputTooLarge { limit: usize },
    #[error("read local data: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    pub(crate) fn transport(e: impl std::fmt::Display) -> Self {
        ClientError::Transport(e.to_string())
    }

    pub(crate) fn request(e: impl std::fmt::Display) -> Self {
        ClientError::Request(e.to_string())
    }

    /// Whether envd said the thing does not exist (HTTP 404 or `not_found`).
    pub fn is_not_found(&self) -> bool {
        match self {
            ClientError::Http { status, .. } => *status == 404,
            ClientError::Rpc(e) => e.code == connectrpc::ErrorCode::NotFound,
            _ => false,
        }
    }

    /// The HTTP status or Connect code's HTTP status, when envd answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } => Some(*status),
            ClientError::Rpc(e) => Some(e.code.http_status().as_u16()),
            _ => None,
        }
    }
}

/// Turn a non-2xx plain-HTTP answer into an error, keeping envd's message.
pub(crate) async fn from_http_response(resp: http::Response<hyper::body::Incoming>) -> ClientError {
    let status = resp.status().as_u16();
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return ClientError::transport(e),
    };
    let message = serde_json::from_slice::<HttpError>(&body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    ClientError::Http { status, message }
}
