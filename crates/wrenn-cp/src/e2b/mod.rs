//! E2B's API, served by the same control plane for the same teams and
//! capsules (a sandbox ID is a capsule ID), so that E2B's unmodified SDKs
//! work by setting `E2B_API_KEY`, `E2B_API_URL` and `E2B_SANDBOX_URL`.
//! `docs/e2b-compat-plan.md` is the contract, read from the SDKs' source.
//!
//! - [`sandboxes`]: the REST routes (`/sandboxes`, `/v2/sandboxes`, …).
//!   Every refusal is `{"code": <status>, "message"}`: the SDKs parse that
//!   shape and nothing else, and the JS SDK decides on `body.code`.
//! - [`dataplane`]: envd and user ports, routed by `E2b-Sandbox-Id` /
//!   `E2b-Sandbox-Port`, by Host `49983-{id}.{domain}`, or (a signed
//!   `/files` URL with no routing) by the signature; gone sandboxes answer
//!   E2B's 502 JSON.
//! - [`deadline`]: E2B's timeout is absolute (`endAt`); the control plane
//!   kills or pauses a capsule when it passes.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::auth::{authenticate, Caller};
use crate::db::DbError;
use crate::error::ApiError;
use crate::server::Cp;

pub mod dataplane;
pub mod deadline;
pub mod sandboxes;

/// What the E2B surface keeps in memory.
#[derive(Debug, Default)]
pub struct E2bState {
    pub idempotency: sandboxes::Idempotency,
    /// Woken when a deadline moves.
    pub deadlines: tokio::sync::Notify,
    /// The debug-mode capsule, once known.
    pub debug: tokio::sync::Mutex<Option<wrenn_types::ids::CapsuleId>>,
}

/// Every E2B REST route.
pub fn routes() -> Router<Arc<Cp>> {
    use sandboxes as s;
    Router::new()
        .route("/sandboxes", post(s::create).get(s::list_v1))
        .route("/sandboxes/metrics", get(s::bulk_metrics))
        .route("/sandboxes/{id}", get(s::detail).delete(s::kill))
        .route("/sandboxes/{id}/timeout", post(s::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(s::refresh))
        .route("/sandboxes/{id}/pause", post(s::pause))
        .route("/sandboxes/{id}/resume", post(s::resume))
        .route("/sandboxes/{id}/connect", post(s::connect))
        .route("/sandboxes/{id}/metrics", get(s::metrics))
        .route("/sandboxes/{id}/logs", get(s::logs_v1))
        .route("/v2/sandboxes", post(s::create).get(s::list))
        .route("/v2/sandboxes/{id}/connect", post(s::connect))
        .route("/v2/sandboxes/{id}/logs", get(s::logs_v2))
}

/// Whether a path belongs to E2B's API (its fallbacks answer in E2B's shape).
pub fn is_e2b_path(path: &str) -> bool {
    let path = path.strip_prefix("/v2").unwrap_or(path);
    under(path, "/sandboxes") || not_served(path)
}

/// `path` is `root` or below it.
fn under(path: &str, root: &str) -> bool {
    path.strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Parts of E2B's API this server does not serve (templates are built with
/// recipes, `wrenn template build`; snapshots, forks, network rules,
/// secrets and volumes do not exist here): a 501 that says so, where a 404
/// would read as "no such sandbox" or "no such template" to the SDKs.
fn not_served(path: &str) -> bool {
    let path = path
        .strip_prefix("/v2")
        .or_else(|| path.strip_prefix("/v3"))
        .unwrap_or(path);
    [
        "/templates",
        "/default-templates",
        "/snapshots",
        "/secrets",
        "/volumes",
    ]
    .iter()
    .any(|root| under(path, root))
        || path.strip_prefix("/sandboxes/").is_some_and(|rest| {
            matches!(
                rest.split_once('/'),
                Some((_, "network" | "fork" | "snapshots"))
            )
        })
}

/// An E2B REST refusal: `{"code": <status>, "message": …}`.
#[derive(Debug, Clone)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

pub type E2bResult<T> = Result<T, E2bError>;

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        E2bError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("sandbox \"{id}\" doesn't exist or you don't have access to it"),
        )
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError::new(e.status, e.message)
    }
}

impl From<DbError> for E2bError {
    fn from(e: DbError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        // The Python SDK resends any request answered 502 or 504 unless
        // told not to: after an agent failed or timed out half way, a
        // resent create or pause would act twice.
        if matches!(
            self.status,
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
        ) {
            resp.headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

/// The caller of an E2B route: `X-API-KEY` (either key kind of a team).
#[derive(Debug, Clone)]
pub struct E2bCaller(pub Caller);

impl FromRequestParts<Arc<Cp>> for E2bCaller {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, cp: &Arc<Cp>) -> Result<Self, E2bError> {
        let unauthorized = |m: &str| E2bError::new(StatusCode::UNAUTHORIZED, m);
        let Some(value) = parts.headers.get(&wrenn_http::relay::X_API_KEY) else {
            return Err(unauthorized("missing X-API-KEY header"));
        };
        let presented = value
            .to_str()
            .map_err(|_| unauthorized("invalid API key"))?;
        let (key, team) = authenticate(&cp.db, presented.trim()).await?;
        Ok(E2bCaller(Caller { team, key }))
    }
}

/// A JSON body for an E2B route: size-capped, empty read as `{}`, errors
/// in E2B's shape.
#[derive(Debug)]
pub struct E2bJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Cp>> for E2bJson<T> {
    type Rejection = E2bError;

    async fn from_request(req: Request, cp: &Arc<Cp>) -> Result<Self, E2bError> {
        crate::api::ApiJson::<T>::from_request(req, cp)
            .await
            .map(|j| E2bJson(j.0))
            .map_err(E2bError::from)
    }
}

/// The E2B fallbacks, in E2B's shape. An E2B path no route took: 501 for
/// a part of the API not served, 404 for any other.
pub fn not_found(path: &str) -> Response {
    if not_served(path) {
        return E2bError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{path} is not supported by this server (wrenn)"),
        )
        .into_response();
    }
    E2bError::new(StatusCode::NOT_FOUND, "no such route").into_response()
}

pub fn method_not_allowed() -> Response {
    E2bError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_failures_are_not_resent() {
        for (status, resend) in [
            (StatusCode::BAD_GATEWAY, Some("false")),
            (StatusCode::GATEWAY_TIMEOUT, Some("false")),
            (StatusCode::SERVICE_UNAVAILABLE, None),
            (StatusCode::NOT_FOUND, None),
        ] {
            let resp = E2bError::new(status, "x").into_response();
            let said = resp
                .headers()
                .get("should-retry")
                .map(|v| v.to_str().unwrap());
            assert_eq!(said, resend, "{status}");
        }
    }

    #[test]
    fn parts_not_served_are_told_apart() {
        for path in [
            "/templates",
            "/templates/aliases/base",
            "/v2/templates/t/builds/b",
            "/v3/templates",
            "/snapshots",
            "/default-templates",
            "/sandboxes/cl-x/network",
            "/sandboxes/cl-x/fork",
            "/sandboxes/cl-x/snapshots",
        ] {
            assert!(is_e2b_path(path) && not_served(path), "{path}");
        }
        for path in [
            "/sandboxes/cl-x/nope",
            "/sandboxes",
            "/v2/sandboxes/cl-x/logs",
        ] {
            assert!(is_e2b_path(path) && !not_served(path), "{path}");
        }
        for path in [
            "/templatesx",
            "/v1/snapshots",
            "/health",
            "/proxy/cl-x/80/network",
        ] {
            assert!(!is_e2b_path(path), "{path}");
        }
    }

    #[test]
    fn e2b_paths() {
        for p in [
            "/sandboxes",
            "/sandboxes/x/y",
            "/v2/sandboxes",
            "/v2/sandboxes/a",
        ] {
            assert!(is_e2b_path(p), "{p}");
        }
        for p in [
            "/v1/capsules",
            "/sandboxesx",
            "/v2",
            "/health",
            "/v2/capsules",
        ] {
            assert!(!is_e2b_path(p), "{p}");
        }
    }
}
