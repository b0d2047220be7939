//! The `/v1` API (also served under `/api/v1`): one file per resource.
//! Handlers parse and authorize, then call the agent or the database;
//! errors leave as [`ApiError`] JSON, never as axum's plain-text
//! rejections (the [`ApiJson`] extractor replaces `Json`).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use wrenn_types::ids::CapsuleId;

use crate::auth::Caller;
use crate::db::{now_ms, CapsuleRow};
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::model::Status;
use crate::server::Cp;

pub mod builds;
pub mod capsules;
pub mod exec;
pub mod files;
pub mod hosts;
pub mod keys;
pub mod pty;
pub mod snapshots;
pub mod stats;
pub mod tar;
pub mod ws;

/// Every `/v1` route.
pub fn routes() -> Router<Arc<Cp>> {
    Router::new()
        .route("/v1/capsules", post(capsules::create).get(capsules::list))
        .route("/v1/capsules/stats", get(stats::stats))
        .route("/v1/capsules/usage", get(stats::usage))
        .route(
            "/v1/capsules/{id}",
            get(capsules::get).delete(capsules::destroy),
        )
        .route("/v1/capsules/{id}/pause", post(capsules::pause))
        .route("/v1/capsules/{id}/resume", post(capsules::resume))
        .route("/v1/capsules/{id}/ping", post(capsules::ping))
        .route("/v1/capsules/{id}/metrics", get(stats::metrics))
        .route("/v1/capsules/{id}/exec", post(exec::exec))
        .route("/v1/capsules/{id}/exec/stream", get(exec::exec_stream))
        .route("/v1/capsules/{id}/processes", get(exec::processes))
        .route("/v1/capsules/{id}/processes/{selector}", delete(exec::kill))
        .route(
            "/v1/capsules/{id}/processes/{selector}/stream",
            get(exec::process_stream),
        )
        .route("/v1/capsules/{id}/pty", get(pty::pty))
        .route("/v1/capsules/{id}/files/write", post(files::write))
        .route("/v1/capsules/{id}/files/read", post(files::read))
        .route("/v1/capsules/{id}/files/list", post(files::list))
        .route("/v1/capsules/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/capsules/{id}/files/remove", post(files::remove))
        .route(
            "/v1/capsules/{id}/files/stream/write",
            post(files::stream_write),
        )
        .route("/v1/capsules/{id}/files/stream/read", post(files::read))
        .route(
            "/v1/capsules/{id}/files/tar",
            get(tar::read).put(tar::write),
        )
        .route(
            "/v1/snapshots",
            post(snapshots::create).get(snapshots::list),
        )
        .route("/v1/snapshots/{name}", delete(snapshots::delete))
        .route("/v1/events/stream", get(crate::events::stream))
        .route("/v1/api-keys", post(keys::create_key).get(keys::list_keys))
        .route("/v1/api-keys/{id}", delete(keys::delete_key))
        .route("/v1/teams", post(keys::create_team).get(keys::list_teams))
        .route("/v1/teams/{id}", get(keys::get_team))
        .route("/v1/admin/builds", post(builds::create))
        .route("/v1/admin/templates", get(snapshots::admin_list))
        .route(
            "/v1/admin/templates/{name}",
            delete(snapshots::admin_delete),
        )
        .route("/v1/hosts", post(hosts::create).get(hosts::list))
        .route("/v1/hosts/register", post(hosts::register))
        .route("/v1/hosts/auth/refresh", post(hosts::refresh))
        .route("/v1/hosts/{id}", get(hosts::get).delete(hosts::delete))
        .route("/v1/hosts/{id}/heartbeat", post(hosts::heartbeat))
        .route("/v1/hosts/sandbox-events", post(hosts::sandbox_event))
}

/// A JSON body: size-capped (413), parsed with serde (400 with the
/// parser's message), an empty body read as `{}`. Unknown fields are
/// ignored, as wrenn's server does.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Cp>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, cp: &Arc<Cp>) -> Result<Self, ApiError> {
        let limit = cp.config.max_json_body;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if is_over_limit(&e) {
                    ApiError::too_large(format!("request body exceeds {limit} bytes"))
                } else {
                    ApiError::invalid(format!("cannot read the request body: {e}"))
                }
            })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Whether reading a body failed on its size limit (not a broken body).
fn is_over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// axum's `Path`, refused as a JSON 400 (`%FF` in an ID, say).
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// axum's `Query`, refused as a JSON 400 (a parameter given twice, say).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

pub fn capsule_id(s: &str) -> ApiResult<CapsuleId> {
    s.parse()
        .map_err(|_| ApiError::invalid("invalid capsule ID"))
}

/// The caller's capsule, or 404.
pub async fn owned(cp: &Cp, caller: &Caller, id: &str) -> ApiResult<CapsuleRow> {
    let id = capsule_id(id)?;
    cp.db
        .capsule(caller.team_id(), &id)
        .await?
        .ok_or_else(ApiError::capsule_not_found)
}

/// The caller's capsule, which must be running, and its host.
pub async fn running(cp: &Cp, caller: &Caller, id: &str) -> ApiResult<(CapsuleRow, Arc<HostConn>)> {
    let (c, host) = running_quiet(cp, caller, id).await?;
    // A data-plane call is activity (the agent restarts the capsule's
    // inactivity timeout for it): shown in `last_active_at`, to the second
    // (best effort: the call goes on without it).
    if now_ms() - c.last_active_at.unwrap_or(0) >= ACTIVITY_GRAIN_MS {
        if let Err(e) = cp.db.touch_capsule(&c.id).await {
            tracing::debug!(capsule = %c.id, error = %e, "activity not recorded");
        }
    }
    Ok((c, host))
}

/// [`running`] for a call that is not activity (pause, ping's own record).
pub async fn running_quiet(
    cp: &Cp,
    caller: &Caller,
    id: &str,
) -> ApiResult<(CapsuleRow, Arc<HostConn>)> {
    let c = owned(cp, caller, id).await?;
    if c.status != Status::Running {
        return Err(ApiError::invalid_state(format!(
            "capsule is not running (status: {})",
            c.status
        )));
    }
    let host = host_of(cp, &c)?;
    Ok((c, host))
}

/// How stale `last_active_at` may be left by data-plane calls (ms).
const ACTIVITY_GRAIN_MS: i64 = 1000;

pub fn host_of(cp: &Cp, c: &CapsuleRow) -> ApiResult<Arc<HostConn>> {
    c.host_id
        .as_ref()
        .and_then(|h| cp.hosts.get(h))
        .ok_or_else(|| ApiError::host_unavailable("the capsule's host is not reachable"))
}

/// After an agent refused an operation because of the capsule's state,
/// bring the database in line with the agent (the reaper may have paused
/// it) and say so in the error.
pub async fn refresh_after(cp: &Cp, c: &CapsuleRow, host: &HostConn, err: ApiError) -> ApiError {
    if err.code == "conflict" {
        crate::reconcile::refresh_capsule(cp, host, c).await;
    }
    err
}
