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
//! is staged in a file on either side. A relative path is taken from that
//! user's working directory. A `tar` whose client went away, or whose
//! stream broke, is killed (by a tag of its own).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_event::Event;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::{kill_process_request, stdin_request};

use super::running;
use super::ws::{pump, Pumped};
use super::{files::CHUNK, Path, Query};
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

/// The query's path as the scripts take it: relative paths are made
/// `./…` (so `-` or `CDPATH` cannot send `cd` elsewhere).
fn checked(q: &TarQuery) -> ApiResult<String> {
    let p = &q.path;
    if p.is_empty() || p.len() > 4096 || p.contains('\0') {
        return Err(ApiError::invalid(
            "path must be 1 to 4096 bytes, without NUL",
        ));
    }
    Ok(if p.starts_with('/') {
        p.clone()
    } else {
        format!("./{p}")
    })
}

fn shell(id: &str, script: &str, path: &str, tag: &str, stdin: bool) -> pb::ExecRequest {
    pb::ExecRequest {
        id: id.to_owned(),
        cmd: "/bin/sh".into(),
        // the path is `$1`: never part of the script's text
        args: vec!["-c".into(), script.into(), "sh".into(), path.into()],
        stdin,
        tag: tag.to_owned(),
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

/// Kills a `tar` process unless disarmed (once its end has been seen): a
/// client that goes away, or a stream that breaks, must not leave it
/// running in the capsule (blocked on its stdin, or walking a big tree).
struct KillOnDrop {
    cp: Arc<Cp>,
    host: Arc<HostConn>,
    capsule: String,
    tag: Option<String>,
}

impl KillOnDrop {
    fn new(cp: &Arc<Cp>, host: &Arc<HostConn>, capsule: &str) -> KillOnDrop {
        KillOnDrop {
            cp: cp.clone(),
            host: host.clone(),
            capsule: capsule.to_owned(),
            tag: Some(format!("tar-{}", random_hex(6))),
        }
    }

    fn tag(&self) -> &str {
        self.tag.as_deref().unwrap_or_default()
    }

    fn disarm(&mut self) {
        self.tag = None;
    }
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

fn ended_early() -> ApiError {
    ApiError::agent(&connectrpc::ConnectError::internal(
        "the agent ended the stream early",
    ))
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
        "[ -d \"$1\" ] || {{ echo \"not a directory: $1\" >&2; exit {NOT_A_DIRECTORY}; }}; \
         unset CDPATH; cd -- \"$1\" && exec tar -cf - ."
    );
    let mut guard = KillOnDrop::new(&cp, &host, c.id.as_str());
    let req = shell(c.id.as_str(), &script, &path, guard.tag(), false);
    let stream = host
        .rpc
        .exec_stream(req)
        .await
        .map_err(|e| ApiError::agent(&e))?;
    let mut events = pump(stream, &cp.tasks);
    // Up to the first byte of the archive, an error is still a status.
    let mut stderr = Tail::default();
    let first = loop {
        let ev = match events.recv().await {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return Err(ApiError::agent(&e)),
            None => return Err(ended_early()),
        };
        match ev.event {
            Some(Event::Stdout(b)) => break Bytes::from(b),
            Some(Event::Stderr(b)) => stderr.push(&b),
            Some(Event::Ended(end)) => {
                guard.disarm();
                return Err(if end.exit_code == NOT_A_DIRECTORY {
                    ApiError::not_found(stderr.text())
                } else {
                    ApiError::invalid(format!("tar failed ({}): {}", end.exit_code, stderr.text()))
                });
            }
            _ => {}
        }
    };
    // The guard rides along with the body: dropped with it (a client that
    // stops reading), it kills tar.
    let rest = futures::stream::unfold(Some((events, stderr, guard)), |state| async move {
        let (mut events, mut stderr, mut guard) = state?;
        loop {
            let ev = match events.recv().await {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), None)),
                None => return Some((Err(std::io::Error::other("the stream ended early")), None)),
            };
            match ev.event {
                Some(Event::Stdout(b)) => {
                    return Some((Ok(Bytes::from(b)), Some((events, stderr, guard))));
                }
                Some(Event::Stderr(b)) => stderr.push(&b),
                Some(Event::Ended(end)) => {
                    guard.disarm();
                    if end.exit_code == 0 {
                        return None;
                    }
                    // cuts the body: the client sees a short read
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

/// How long tar gets to finish once its input has ended (or could not all
/// be sent) before it is killed.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `PUT /v1/capsules/{id}/files/tar?path=DIR` — 204.
pub async fn write(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TarQuery>,
    req: Request,
) -> ApiResult<StatusCode> {
    let checked = running(&cp, &caller, &id)
        .await
        .and_then(|(c, host)| Ok((c, host, checked(&q)?)));
    let (c, host, path) = match checked {
        Ok(x) => x,
        Err(e) => return Err(super::files::drain(req, e).await),
    };
    let script = "unset CDPATH; mkdir -p -- \"$1\" && cd -- \"$1\" && exec tar -xpf -";
    // armed before the call: a handler dropped while it starts still kills
    let mut guard = KillOnDrop::new(&cp, &host, c.id.as_str());
    let tag = guard.tag().to_owned();
    let stream = host
        .rpc
        .exec_stream(shell(c.id.as_str(), script, &path, &tag, true))
        .await
        .map_err(|e| ApiError::agent(&e))?;
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
    'body: while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("upload failed: {e}")))?;
        for piece in chunk.chunks(CHUNK) {
            if host
                .rpc
                .send_stdin(stdin(piece.to_vec(), false))
                .await
                .is_err()
            {
                // tar is gone (a bad archive), or the agent is: its end,
                // or the wait below, says which
                sent_all = false;
                break 'body;
            }
        }
    }
    if sent_all {
        // (fails when tar has already finished, at the archive's end
        // marker: its end says how)
        let _ = host.rpc.send_stdin(stdin(Vec::new(), true)).await;
    }
    let ended = match tokio::time::timeout(FINISH_WAIT, done.recv()).await {
        Ok(Some(ended)) => ended?,
        Ok(None) => return Err(ended_early()),
        Err(_) => {
            return Err(ApiError::agent(
                &connectrpc::ConnectError::deadline_exceeded("tar did not finish"),
            ))
        }
    };
    guard.disarm();
    // (tar may stop reading at the archive's end marker: an exit code of
    // 0 is a whole archive unpacked, whatever followed it)
    match ended {
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
