//! Files: write/read/list/mkdir/remove and the streaming variants.
//!
//! Both writes take `multipart/form-data` with the `path` part first and
//! stream the `file` part to the agent in 64 KiB messages as it arrives
//! (never held whole). `files/write` is capped at the configured size
//! (100 MiB; 413); `files/stream/write` is not. The agent commits a file
//! only on the stream's `end` message: an upload that fails half way, or
//! whose client hangs up, stops before it, and envd discards the partial
//! file.
//! Reads stream the agent's chunks straight into the response body; an
//! error before the first byte (missing file) is a proper 404.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::write_file_stream_request::Msg;

use super::{refresh_after, running, ApiJson, Path};
use crate::auth::Caller;
use crate::db::CapsuleRow;
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::server::Cp;

pub const CHUNK: usize = 64 << 10;
/// The longest `path` part.
const MAX_PATH: usize = 4096;
/// The most an upload may send before its file part's bytes begin.
const HEAD_LIMIT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("more than {HEAD_LIMIT} bytes before the file part")]
struct HeadTooLarge;

#[derive(Debug, Deserialize)]
pub struct PathBody {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: u32,
}

fn path_req(c: &CapsuleRow, body: &PathBody) -> ApiResult<pb::PathRequest> {
    if body.path.is_empty() {
        return Err(ApiError::invalid("path is required"));
    }
    Ok(pb::PathRequest {
        id: c.id.to_string(),
        path: body.path.clone(),
        depth: body.depth,
        ..Default::default()
    })
}

/// A file entry as the SDK's model wants it (`type` is file, directory
/// or symlink only; other kinds show as files).
fn entry(e: &pb::FileEntry) -> Value {
    let kind = match e.r#type.as_str() {
        "directory" => "directory",
        "symlink" => "symlink",
        _ => "file",
    };
    json!({
        "name": e.name, "path": e.path, "type": kind, "size": e.size, "mode": e.mode,
        "permissions": e.permissions, "owner": e.owner, "group": e.group,
        "modified_at": e.modified_ms.div_euclid(1000),
        "symlink_target": if e.symlink_target.is_empty() { None } else { Some(&e.symlink_target) },
    })
}

async fn agent_err(
    cp: &Cp,
    c: &CapsuleRow,
    host: &HostConn,
    e: connectrpc::ConnectError,
) -> ApiError {
    refresh_after(cp, c, host, ApiError::agent(&e)).await
}

/// `POST /v1/capsules/{id}/files/write` — 204.
pub async fn write(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let limit = cp.config.max_file_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64 + 64 * 1024) {
        return Err(ApiError::too_large(format!(
            "files/write takes at most {limit} bytes; use files/stream/write"
        )));
    }
    let (c, host) = match running(&cp, &caller, &id).await {
        Ok(x) => x,
        Err(e) => return Err(drain(req, e).await),
    };
    upload(&cp, &c, &host, req, Some(limit)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read (and drop) a refused upload's body before answering, so a client
/// that is still sending sees the error instead of a reset connection.
/// Bounded: at most [`DRAIN_LIMIT`] bytes or [`DRAIN_TIME`].
pub(crate) async fn drain(req: Request, err: ApiError) -> ApiError {
    use http_body_util::BodyExt;
    let mut body = req.into_body();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
    err
}

pub const DRAIN_LIMIT: usize = 8 << 20;
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// `POST /v1/capsules/{id}/files/stream/write` — 204, no size cap.
pub async fn stream_write(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let (c, host) = match running(&cp, &caller, &id).await {
        Ok(x) => x,
        Err(e) => return Err(drain(req, e).await),
    };
    upload(&cp, &c, &host, req, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn upload(
    cp: &Cp,
    c: &CapsuleRow,
    host: &HostConn,
    req: Request,
    limit: Option<usize>,
) -> ApiResult<()> {
    let boundary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| ApiError::invalid("expected a multipart/form-data body"))?;
    // Everything before the file's bytes (preamble, part headers, the path,
    // parts we skip) is held by the parser: bounded, whatever the client
    // declares or leaves out.
    let in_file = Arc::new(AtomicBool::new(false));
    let overlong = Arc::new(AtomicBool::new(false));
    let mut before_file = 0usize;
    let body = req.into_body().into_data_stream().map({
        let (in_file, overlong) = (in_file.clone(), overlong.clone());
        move |chunk| {
            let chunk = chunk?;
            if !in_file.load(Ordering::Relaxed) {
                before_file += chunk.len();
                if before_file > HEAD_LIMIT {
                    overlong.store(true, Ordering::Relaxed);
                    return Err(axum::Error::new(HeadTooLarge));
                }
            }
            Ok(chunk)
        }
    });
    let limits = multer::SizeLimit::new()
        .per_field(HEAD_LIMIT as u64)
        .for_field("path", MAX_PATH as u64)
        .for_field("file", u64::MAX);
    let mut form = multer::Multipart::with_constraints(
        body,
        boundary,
        multer::Constraints::new().size_limit(limits),
    );
    let malformed = |e: multer::Error| match e {
        multer::Error::FieldSizeExceeded { field_name, .. }
            if field_name.as_deref() == Some("path") =>
        {
            ApiError::invalid(format!("path must be 1 to {MAX_PATH} bytes"))
        }
        multer::Error::FieldSizeExceeded { .. } => ApiError::too_large(HeadTooLarge.to_string()),
        _ if overlong.load(Ordering::Relaxed) => ApiError::too_large(HeadTooLarge.to_string()),
        e => ApiError::invalid(format!("malformed multipart body: {e}")),
    };
    let mut path: Option<String> = None;
    loop {
        let field = form.next_field().await.map_err(malformed)?;
        let Some(mut field) = field else {
            return Err(ApiError::invalid(if path.is_none() {
                "the path part is missing"
            } else {
                "the file part is missing"
            }));
        };
        match field.name() {
            Some("path") => {
                // (`text()` decodes lossily: the file would land elsewhere)
                let raw = field.bytes().await.map_err(malformed)?;
                let text = String::from_utf8(raw.to_vec())
                    .map_err(|_| ApiError::invalid("path must be UTF-8"))?;
                if path.is_some() {
                    return Err(ApiError::invalid("more than one path part"));
                }
                if text.is_empty() || text.len() > MAX_PATH {
                    return Err(ApiError::invalid(format!(
                        "path must be 1 to {MAX_PATH} bytes"
                    )));
                }
                path = Some(text);
            }
            Some("file") => {
                let Some(path) = path else {
                    return Err(ApiError::invalid(
                        "the path part must come before the file part",
                    ));
                };
                in_file.store(true, Ordering::Relaxed);
                return send_file(cp, c, host, path, &mut field, limit).await;
            }
            _ => {
                // unknown parts are skipped
                while field.chunk().await.map_err(malformed)?.is_some() {}
            }
        }
    }
}

async fn send_file(
    cp: &Cp,
    c: &CapsuleRow,
    host: &HostConn,
    path: String,
    field: &mut multer::Field<'_>,
    limit: Option<usize>,
) -> ApiResult<()> {
    let (tx, rx) = mpsc::channel::<pb::WriteFileStreamRequest>(8);
    let meta = pb::WriteFileStreamRequest {
        msg: Some(Msg::Meta(Box::new(pb::FileMeta {
            id: c.id.to_string(),
            path,
            ..Default::default()
        }))),
        ..Default::default()
    };
    let _ = tx.send(meta).await;
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let call = host.rpc.write_file_stream(requests);
    tokio::pin!(call);
    let mut total = 0usize;
    let mut tx = Some(tx);
    // Feed chunks while the call runs; the call's end (or failure) wins.
    loop {
        tokio::select! {
            done = &mut call => {
                return match done {
                    Ok(_) if tx.is_none() => Ok(()),
                    Ok(_) => Err(ApiError::agent(&connectrpc::ConnectError::internal("the agent ended the upload early"))),
                    Err(e) => Err(agent_err(cp, c, host, e).await),
                };
            }
            chunk = field.chunk(), if tx.is_some() => {
                let chunk: Option<Bytes> = chunk
                    .map_err(|e| ApiError::invalid(format!("upload failed: {e}")))?;
                let Some(chunk) = chunk else {
                    // end of file: `end`, then closing the stream completes
                    // the call (a stream closed without it, as when this
                    // handler is dropped, makes the agent discard the file)
                    if let Some(t) = tx.take() {
                        let end = pb::WriteFileStreamRequest {
                            msg: Some(Msg::End(true)),
                            ..Default::default()
                        };
                        let _ = t.send(end).await;
                    }
                    continue;
                };
                total += chunk.len();
                if limit.is_some_and(|l| total > l) {
                    // dropping `call` cancels it: envd discards the partial file
                    return Err(ApiError::too_large(format!(
                        "files/write takes at most {} bytes; use files/stream/write",
                        limit.unwrap_or_default()
                    )));
                }
                for piece in chunk.chunks(CHUNK) {
                    let m = pb::WriteFileStreamRequest {
                        msg: Some(Msg::Chunk(piece.to_vec())),
                        ..Default::default()
                    };
                    if let Some(t) = &tx {
                        if t.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// `POST /v1/capsules/{id}/files/read` and `…/files/stream/read`: the raw
/// bytes, streamed (chunked) as the agent sends them.
pub async fn read(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> ApiResult<Response> {
    download(&cp, &caller, &id, &body).await
}

async fn download(cp: &Cp, caller: &Caller, id: &str, body: &PathBody) -> ApiResult<Response> {
    let (c, host) = running(cp, caller, id).await?;
    let req = path_req(&c, body)?;
    let mut stream = match host.rpc.read_file_stream(req).await {
        Ok(s) => s,
        Err(e) => return Err(agent_err(cp, &c, &host, e).await),
    };
    // The first message decides between an error status and a 200.
    let first = match stream.message::<pb::FileChunk>().await {
        Ok(m) => m.map(|m| Bytes::from(m.to_owned_message().data)),
        Err(e) => return Err(agent_err(cp, &c, &host, e).await),
    };
    let rest = futures::stream::unfold(Some(stream), |s| async move {
        let mut s = s?;
        match s.message::<pb::FileChunk>().await {
            Ok(Some(m)) => Some((
                Ok::<_, std::io::Error>(Bytes::from(m.to_owned_message().data)),
                Some(s),
            )),
            Ok(None) => None,
            // truncates the body: the client sees a short read
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    let body = futures::stream::iter(first.map(Ok)).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

/// `POST /v1/capsules/{id}/files/list`
pub async fn list(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> ApiResult<Json<Value>> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let mut req = path_req(&c, &body)?;
    req.depth = req.depth.max(1);
    let list = match host.rpc.list_dir(req).await {
        Ok(l) => l.into_owned(),
        Err(e) => return Err(agent_err(&cp, &c, &host, e).await),
    };
    Ok(Json(
        json!({ "entries": list.entries.iter().map(entry).collect::<Vec<_>>() }),
    ))
}

/// `POST /v1/capsules/{id}/files/mkdir` — 200 with the entry; 409 when
/// the path exists (the SDK then lists the parent).
pub async fn mkdir(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> ApiResult<Json<Value>> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let req = path_req(&c, &body)?;
    let made = match host.rpc.make_dir(req).await {
        Ok(m) => m.into_owned(),
        Err(e) => return Err(agent_err(&cp, &c, &host, e).await),
    };
    if !made.created {
        return Err(ApiError::conflict(format!(
            "{} already exists (already_exists)",
            body.path
        )));
    }
    let trimmed = body.path.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", n)) => ("/".to_owned(), n.to_owned()),
        Some((p, n)) => (p.to_owned(), n.to_owned()),
        None => (".".to_owned(), trimmed.to_owned()),
    };
    let listing = host
        .rpc
        .list_dir(pb::PathRequest {
            id: c.id.to_string(),
            path: parent,
            depth: 1,
            ..Default::default()
        })
        .await
        .map(|l| l.into_owned());
    let found = listing
        .ok()
        .and_then(|l| l.entries.into_iter().find(|e| e.name == name));
    let entry = match found {
        Some(e) => entry(&e),
        None => json!({
            "name": name, "path": body.path, "type": "directory", "size": 0, "mode": 0o40755,
            "permissions": "drwxr-xr-x", "owner": "root", "group": "root",
            "modified_at": crate::db::now_ms() / 1000, "symlink_target": null,
        }),
    };
    Ok(Json(json!({ "entry": entry })))
}

/// `POST /v1/capsules/{id}/files/remove` — 204.
pub async fn remove(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> ApiResult<StatusCode> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let req = path_req(&c, &body)?;
    if let Err(e) = host.rpc.remove_path(req).await {
        return Err(agent_err(&cp, &c, &host, e).await);
    }
    Ok(StatusCode::NO_CONTENT)
}
