//! Directories as tar streams (a Wrenn addition; `wrenn cp` uses it):
//!
//! - `GET /v1/capsules/{id}/files/tar?path=DIR` answers the directory's
//!   contents as `application/x-tar`, made by `tar` in the capsule and
//!   streamed as it comes out. A path that is not a directory is a 404.
//!   A failure once bytes have gone out cuts the body (a short read).
//! - `PUT /v1/capsules/{id}/files/tar?path=DIR` unpacks the request body
//!   (a tar stream, not held anywhere on the way) into `DIR`, created if
//!   missing, modes kept; 204. An archive `tar` refuses is a 400 with its
//!   message. Unpacking is not atomic: what a failed or cut-off upload
//!   unpacked before it failed stays.
//!
//! Both run `tar` through envd as the capsule's default user: the
//! archive's bytes go through the process's stdout or stdin, so nothing
//! is staged in a file on either side.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_event::Event;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::{kill_process_request, stdin_request};

use super::files::CHUNK;
use super::running;
use super::ws::{pump, Pumped};
use crate::auth::{random_hex, Caller};
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::server::Cp;

/// The exit code the packing script uses for "not a directory".
const NOT_A_DIRECTORY: i32 = 44;
/// How much of `tar`'s stderr an error message keeps.
const STDERR_KEPT: usize = 2048;

#[derive(Debug, Deserialize)]
pub struct TarQuery {
    #[serde(default)]
    path: String,
}

fn checked(q: &TarQuery) -> ApiResult<&str> {
    if q.path.is_empty() || q.path.len() > 4096 || q.path.contains('\0') {
        return Err(ApiError::invalid(
            "path must be 1 to 4096 bytes, without NUL",
        ));
    }
    Ok(&q.path)
}

fn shell(id: &str, script: &str, path: &str, stdin: Option<&str>) -> pb::ExecRequest {
    pb::ExecRequest {
        id: id.to_owned(),
        cmd: "/bin/sh".into(),
        // the path is `$1`: never part of the script's text
        args: vec!["-c".into(), script.into(), "sh".into(), path.into()],
        stdin: stdin.is_some(),
        tag: stdin.unwrap_or_default().to_owned(),
        ..Default::default()
    }
}

/// The last [`STDERR_KEPT`] bytes of stderr, as text.
#[derive(Debug, Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        let over = self.0.len().saturating_sub(STDERR_KEPT);
        self.0.drain(..over);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).trim().to_owned()
    }
}

/// `GET /v1/capsules/{id}/files/tar?path=DIR`
pub async fn read(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TarQuery>,
) -> ApiResult<Response> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let path = checked(&q)?;
    let script = format!(
        "cd -- \"$1\" 2>/dev/null || {{ echo \"not a directory: $1\" >&2; exit {NOT_A_DIRECTORY}; }}; \
         exec tar -cf - ."
    );
    let stream = host
        .rpc
        .exec_stream(shell(c.id.as_str(), &script, path, None))
        .await
        .map_err(|e| ApiError::agent(&e))?;
    let mut events = pump(stream, &cp.tasks);
    // Up to the first byte of the archive, an error is still a status.
    let mut stderr = Tail::default();
    let first = loop {
        match events.recv().await {
            Some(Ok(ev)) => match ev.event {
                Some(Event::Stdout(b)) => break Bytes::from(b),
                Some(Event::Stderr(b)) => stderr.push(&b),
                Some(Event::Ended(end)) if end.exit_code == NOT_A_DIRECTORY => {
                    return Err(ApiError::not_found(stderr.text()));
                }
                Some(Event::Ended(end)) => {
                    return Err(ApiError::invalid(format!(
                        "tar failed ({}): {}",
                        end.exit_code,
                        stderr.text()
                    )));
                }
                _ => {}
            },
            Some(Err(e)) => return Err(ApiError::agent(&e)),
            None => {
                return Err(ApiError::agent(&connectrpc::ConnectError::internal(
                    "the agent ended the stream early",
                )))
            }
        }
    };
    let rest = futures::stream::unfold(Some((events, stderr)), |state| async move {
        let (mut events, mut stderr) = state?;
        loop {
            let ev = match events.recv().await {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), None)),
                None => return Some((Err(std::io::Error::other("the stream ended early")), None)),
            };
            match ev.event {
                Some(Event::Stdout(b)) => {
                    return Some((Ok(Bytes::from(b)), Some((events, stderr))));
                }
                Some(Event::Stderr(b)) => stderr.push(&b),
                Some(Event::Ended(end)) if end.exit_code == 0 => return None,
                // cuts the body: the client sees a short read
                Some(Event::Ended(end)) => {
                    let why = format!("tar failed ({}): {}", end.exit_code, stderr.text());
                    return Some((Err(std::io::Error::other(why)), None));
                }
                _ => {}
            }
        }
    });
    let body = futures::stream::once(async move { Ok(first) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Kills the unpacking process unless disarmed: a client that goes away
/// mid-upload must not leave `tar` waiting on its stdin.
struct KillOnDrop {
    cp: Arc<Cp>,
    host: Arc<HostConn>,
    capsule: String,
    tag: Option<String>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(tag) = self.tag.take() else {
            return;
        };
        let (host, capsule) = (self.host.clone(), self.capsule.clone());
        self.cp.tasks.spawn(async move {
            let req = pb::KillProcessRequest {
                id: capsule,
                selector: Some(kill_process_request::Selector::Tag(tag)),
                ..Default::default()
            };
            let _ = host.rpc.kill_process(req).await;
        });
    }
}

/// `PUT /v1/capsules/{id}/files/tar?path=DIR` — 204.
pub async fn write(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TarQuery>,
    req: Request,
) -> ApiResult<StatusCode> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let path = checked(&q)?;
    let tag = format!("tar-{}", random_hex(6));
    let script = "mkdir -p -- \"$1\" && cd -- \"$1\" && exec tar -xpf -";
    let stream = host
        .rpc
        .exec_stream(shell(c.id.as_str(), script, path, Some(&tag)))
        .await
        .map_err(|e| ApiError::agent(&e))?;
    let mut guard = KillOnDrop {
        cp: cp.clone(),
        host: host.clone(),
        capsule: c.id.to_string(),
        tag: Some(tag.clone()),
    };
    // The process's events are read as the body goes in (its stderr, its
    // end); `done` has its exit code and the tail of its stderr.
    let mut events = pump(stream, &cp.tasks);
    let (done_tx, mut done) = mpsc::channel::<Result<(i32, String), ApiError>>(1);
    cp.tasks.spawn(async move {
        let _ = done_tx.send(watch(&mut events).await).await;
    });
    let stdin = |data: Vec<u8>, close: bool| pb::StdinRequest {
        id: c.id.to_string(),
        selector: Some(stdin_request::Selector::Tag(tag.clone())),
        data,
        close,
        ..Default::default()
    };
    let mut body = req.into_body().into_data_stream();
    let mut sent_all = true;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("upload failed: {e}")))?;
        let mut refused = false;
        for piece in chunk.chunks(CHUNK) {
            if host
                .rpc
                .send_stdin(stdin(piece.to_vec(), false))
                .await
                .is_err()
            {
                // tar is gone (a bad archive): its end says why
                refused = true;
                break;
            }
        }
        if refused {
            sent_all = false;
            break;
        }
    }
    // Closing fails when tar has already finished (at the archive's end
    // marker): its end says how. Otherwise it is not waited for long.
    let closed = !sent_all || host.rpc.send_stdin(stdin(Vec::new(), true)).await.is_ok();
    let ended = if closed {
        done.recv().await
    } else {
        tokio::time::timeout(std::time::Duration::from_secs(30), done.recv())
            .await
            .ok()
            .flatten()
    };
    let ended = ended.unwrap_or_else(|| {
        Err(ApiError::agent(&connectrpc::ConnectError::internal(
            "the agent ended the stream early",
        )))
    });
    guard.tag = None;
    // (tar may stop reading at the archive's end marker: an exit code of
    // 0 is a whole archive unpacked, whatever followed it)
    match ended? {
        (0, _) => Ok(StatusCode::NO_CONTENT),
        (code, stderr) => Err(ApiError::invalid(format!("tar failed ({code}): {stderr}"))),
    }
}

/// Read a process's events to its end: (exit code, stderr's tail).
async fn watch(events: &mut mpsc::Receiver<Pumped>) -> Result<(i32, String), ApiError> {
    let mut stderr = Tail::default();
    while let Some(ev) = events.recv().await {
        match ev.map_err(|e| ApiError::agent(&e))?.event {
            Some(Event::Stderr(b)) => stderr.push(&b),
            Some(Event::Ended(end)) => return Ok((end.exit_code, stderr.text())),
            _ => {}
        }
    }
    Err(ApiError::agent(&connectrpc::ConnectError::internal(
        "the agent ended the stream early",
    )))
}
