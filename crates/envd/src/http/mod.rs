//! envd's plain-HTTP endpoints and the router that also carries the Connect
//! services. Domain errors become envd's error JSON here, once:
//! `{"code": <status>, "message": "…"}`, `application/json; charset=utf-8`.

mod files;

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use wrenn_types::envd::{Health, HttpError, InitRequest, ENVD_PROTOCOL_VERSION};

use crate::auth;
use crate::state::{Envd, InitError};

pub use files::{ByteStream, FileError, MultipartFiles};

/// The largest Connect message (and unary body) envd takes: 64 MiB.
/// E2B's envd (connect-go) sets no limit, and its SDKs send a process's
/// stdin in one `SendInput` of any size: at connectrpc's default (4 MiB)
/// an 8 MiB `send_stdin` failed, differently each time.
pub const RPC_MESSAGE_LIMIT: usize = 64 << 20;

fn rpc_limits() -> connectrpc::Limits {
    connectrpc::Limits::default()
        .with_max_request_body_size(RPC_MESSAGE_LIMIT)
        .with_max_message_size(RPC_MESSAGE_LIMIT)
}

/// Build the whole envd service: HTTP routes, then Connect RPC as fallback.
pub fn router(state: Arc<Envd>) -> Router {
    let connect = crate::rpc::router(state.clone());
    Router::new()
        .route("/health", get(health))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .route("/snapshot/prepare", post(prepare_snapshot))
        .route("/files", get(files::download).post(files::upload))
        .fallback_service(connect.into_axum_service().with_limits(rpc_limits()))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Any origin, but never with credentials: browsers may call envd (E2B's
        // envd allows this) without a page being able to ride a user's cookies.
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

/// How long an upload's body is still read after it failed ([`files`]).
/// (A refused request's unread body is read on after the answer by
/// `wrenn_http`'s server, as Go's server, which E2B's envd runs on, does.)
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// envd's error JSON.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = HttpError {
        code: status.as_u16(),
        message: message.into(),
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn health() -> Response {
    no_store(
        Json(Health {
            version: crate::VERSION.to_string(),
        })
        .into_response(),
    )
}

async fn init(State(state): State<Arc<Envd>>, req: axum::extract::Request) -> Response {
    // Once a token is set, only its holder may change it.
    if !state.token_ok(auth::presented_token(req.headers())) {
        return error_response(StatusCode::UNAUTHORIZED, auth::UNAUTHORIZED);
    }
    let bytes = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return error_response(StatusCode::PAYLOAD_TOO_LARGE, "init body over 1 MiB"),
    };
    let body: InitRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, format!("invalid init body: {e}"))
            }
        }
    };
    match state.apply_init(body) {
        Ok(_) => {
            let mut resp = no_store(StatusCode::NO_CONTENT.into_response());
            resp.headers_mut().insert(
                "x-envd-version",
                HeaderValue::from_static(ENVD_PROTOCOL_VERSION),
            );
            resp
        }
        Err(e @ InitError::User(_)) | Err(e @ InitError::MetadataKey(_)) => {
            error_response(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => {
            tracing::error!(err = %e, "init failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot apply init")
        }
    }
}

async fn envs(State(state): State<Arc<Envd>>) -> Response {
    no_store(Json(state.default_env()).into_response())
}

async fn metrics(State(state): State<Arc<Envd>>) -> Response {
    no_store(Json(state.metrics.snapshot()).into_response())
}

/// `syncfs(2)` on the filesystem holding `/` (only that one: in an OCI
/// capsule, `sync(2)` would flush every filesystem of the host).
fn sync_root() {
    if let Ok(root) = std::fs::File::open("/") {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor, open for the duration of the call.
        unsafe { libc::syncfs(root.as_raw_fd()) };
    }
}

async fn prepare_snapshot(State(state): State<Arc<Envd>>) -> Response {
    state.prepare_snapshot();
    // What the capsule wrote reaches its disk: a VM's snapshot keeps its
    // page cache, but a template made from the disk would not see it.
    let _ = tokio::task::spawn_blocking(sync_root).await;
    no_store(StatusCode::NO_CONTENT.into_response())
}
