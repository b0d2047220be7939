//! `GET /v1/capsules/{id}/pty`: an interactive terminal over a WebSocket,
//! in the SDK 0.3.0 framing — raw bytes in binary frames both ways, JSON
//! control frames as text (`start`/`connect`, `resize`, `kill`, `pong` in;
//! `started`, `exit`, `error`, `ping` out).
//!
//! The terminal belongs to the capsule, not the socket: a disconnect
//! leaves it running and `{"type":"connect","tag":…}` reattaches (new
//! output only). Input frames go through a queue of [`INPUT_QUEUE`] frames
//! and [`INPUT_BUDGET`] bytes to one
//! task that sends them to the agent, merging frames that queued up while
//! the previous call was in flight; output keeps flowing meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_event::Event as Ev;

use super::ws::{pump, send_json};
use super::{running, Path};
use crate::auth::{random_hex, Caller};
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::server::Cp;

pub const INPUT_QUEUE: usize = 64;
/// Bytes of input queued for the agent at most: each frame holds permits
/// for its size (a bigger one, all of them) until the agent has it. The
/// queue's 64 frames of up to 64 MiB each let one socket pin gigabytes.
pub const INPUT_BUDGET: usize = 16 << 20;
pub const PING_EVERY: Duration = Duration::from_secs(30);
const FIRST_FRAME_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct Control {
    #[serde(rename = "type", default)]
    kind: String,
    cmd: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    cols: i64,
    #[serde(default)]
    rows: i64,
}

async fn fatal(socket: &mut WebSocket, msg: &str) {
    send_json(socket, json!({"type": "error", "data": msg, "fatal": true})).await;
    let _ = socket.send(Message::Close(None)).await;
}

pub async fn pty(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = super::ws::upgrade(ws)?;
    let (c, host) = match running(&cp, &caller, &id).await {
        Ok(found) => found,
        Err(e) => return Ok(super::ws::refuse(ws, e, super::ws::Session::Pty)),
    };
    let id = c.id.to_string();
    Ok(ws.on_upgrade(move |socket| session(cp, host, id, socket)))
}

async fn session(cp: Arc<Cp>, host: Arc<HostConn>, id: String, mut socket: WebSocket) {
    let first = match tokio::time::timeout(FIRST_FRAME_WAIT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Control>(&t).ok(),
        _ => None,
    };
    let Some(first) = first else {
        return fatal(
            &mut socket,
            "first message must be type 'start' or 'connect'",
        )
        .await;
    };
    let (req, tag) = match first.kind.as_str() {
        "start" => {
            let tag = format!("pty-{}", random_hex(4));
            let dim = |v: i64, d: u32| {
                if v > 0 {
                    v.min(u16::MAX as i64) as u32
                } else {
                    d
                }
            };
            let req = pb::PtyAttachRequest {
                id: id.clone(),
                tag: tag.clone(),
                cmd: first
                    .cmd
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "/bin/bash".into()),
                args: first.args,
                cols: dim(first.cols, 80),
                rows: dim(first.rows, 24),
                envs: first.envs.into_iter().collect(),
                cwd: first.cwd.unwrap_or_default(),
                user: first.user.unwrap_or_default(),
                ..Default::default()
            };
            (req, tag)
        }
        "connect" => {
            let Some(tag) = first.tag.filter(|t| !t.is_empty()) else {
                return fatal(&mut socket, "connect needs a tag").await;
            };
            let req = pb::PtyAttachRequest {
                id: id.clone(),
                tag: tag.clone(),
                ..Default::default()
            };
            (req, tag)
        }
        _ => {
            return fatal(
                &mut socket,
                "first message must be type 'start' or 'connect'",
            )
            .await
        }
    };
    let stream = match host.rpc.pty_attach(req).await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("failed to attach: {}", ApiError::agent(&e).message);
            return fatal(&mut socket, &msg).await;
        }
    };
    let mut events = pump(stream, &cp.tasks);
    let (input_tx, input_rx) = mpsc::channel::<Input>(INPUT_QUEUE);
    let budget = Arc::new(Semaphore::new(INPUT_BUDGET));
    let mut sender = cp
        .tasks
        .spawn(send_input(host.clone(), id.clone(), tag.clone(), input_rx));
    // (the input task ends only when its calls fail, or after the loop)
    let mut sender_done = false;
    // an exit or error frame was sent: nothing more is said
    let mut told_end = false;
    // an input call failed: said when the grace ends, unless the terminal's
    // own end comes first
    let mut input_error: Option<connectrpc::ConnectError> = None;
    let grace = tokio::time::sleep(INPUT_ERROR_GRACE);
    tokio::pin!(grace);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Ok(pb::ProcessEvent { event: Some(e), .. })) => {
                    let sent = match e {
                        Ev::Started(s) => {
                            let tag = if s.tag.is_empty() { tag.clone() } else { s.tag };
                            send_json(&mut socket, json!({"type": "started", "tag": tag, "pid": s.pid})).await
                        }
                        Ev::Pty(b) | Ev::Stdout(b) | Ev::Stderr(b) => {
                            socket.send(Message::Binary(Bytes::from(b))).await.is_ok()
                        }
                        Ev::Ended(end) => {
                            send_json(&mut socket, json!({"type": "exit", "exit_code": end.exit_code})).await;
                            told_end = true;
                            break;
                        }
                    };
                    if !sent {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let msg = ApiError::agent(&e).message;
                    send_json(&mut socket, json!({"type": "error", "data": msg, "fatal": true})).await;
                    told_end = true;
                    break;
                }
                None => {
                    send_json(&mut socket, json!({"type": "error", "data": "terminal stream ended", "fatal": true})).await;
                    told_end = true;
                    break;
                }
            },
            sent = &mut sender, if !sender_done => {
                sender_done = true;
                if let Ok(Err(e)) = sent {
                    // Input to a terminal that has just exited fails too:
                    // its exit (and last output) may be on the way, and
                    // wins if it comes within the grace.
                    input_error = Some(e);
                    grace.as_mut().reset(tokio::time::Instant::now() + INPUT_ERROR_GRACE);
                }
            },
            () = &mut grace, if input_error.is_some() => {
                if let Some(e) = input_error.take() {
                    input_failed(&mut socket, &e).await;
                }
                told_end = true;
                break;
            },
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                // (dropped once input has failed: the session is ending)
                Some(Ok(Message::Binary(_))) if input_error.is_some() => {}
                Some(Ok(Message::Binary(b))) => {
                    let n = b.len().clamp(1, INPUT_BUDGET) as u32;
                    let Ok(held) = budget.clone().acquire_many_owned(n).await else { break };
                    if input_tx.send((b, held)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let Ok(ctl) = serde_json::from_str::<Control>(&t) else { continue };
                    match ctl.kind.as_str() {
                        "resize" if ctl.cols > 0 && ctl.rows > 0 => {
                            let req = pb::PtyResizeRequest {
                                id: id.clone(),
                                tag: tag.clone(),
                                cols: ctl.cols.min(u16::MAX as i64) as u32,
                                rows: ctl.rows.min(u16::MAX as i64) as u32,
                                ..Default::default()
                            };
                            if let Err(e) = host.rpc.pty_resize(req).await {
                                tracing::debug!(error = %e, "pty resize failed");
                            }
                        }
                        "kill" => {
                            let req = pb::PtyRef { id: id.clone(), tag: tag.clone(), ..Default::default() };
                            if let Err(e) = host.rpc.pty_kill(req).await {
                                tracing::debug!(error = %e, "pty kill failed");
                            }
                        }
                        // pong, and anything unknown: ignored
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if !send_json(&mut socket, json!({"type": "ping"})).await {
                    break;
                }
            }
        }
    }
    drop(input_tx);
    if !sender_done {
        let sent = sender.await;
        if let (Ok(Err(e)), false) = (sent, told_end) {
            input_failed(&mut socket, &e).await;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// The fatal error frame of a session whose input the agent refused.
async fn input_failed(socket: &mut WebSocket, e: &connectrpc::ConnectError) {
    let msg = format!("terminal input failed: {}", ApiError::agent(e).message);
    send_json(socket, json!({"type": "error", "data": msg, "fatal": true})).await;
}

/// How long a failed input call waits for the terminal's exit frame
/// before it ends the session itself.
const INPUT_ERROR_GRACE: Duration = Duration::from_secs(1);

/// The most input sent to the agent in one call (its messages are capped
/// at 4 MiB): frames that piled up are merged up to it, a larger one (a
/// big paste) is split.
const INPUT_PIECE: usize = 1 << 20;

/// Send queued input to the agent, merging frames that piled up, until the
/// input ends or a call fails.
/// A frame of input and its share of [`INPUT_BUDGET`].
type Input = (Bytes, OwnedSemaphorePermit);

async fn send_input(
    host: Arc<HostConn>,
    id: String,
    tag: String,
    mut rx: mpsc::Receiver<Input>,
) -> Result<(), connectrpc::ConnectError> {
    let mut held: Option<Input> = None;
    loop {
        // (the permits go once the agent has the data)
        let (first, permit) = match held.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        let mut data = first.to_vec();
        let mut permits = vec![permit];
        while data.len() < INPUT_PIECE {
            match rx.try_recv() {
                Ok((more, p)) if data.len() + more.len() <= INPUT_PIECE => {
                    data.extend_from_slice(&more);
                    permits.push(p);
                }
                Ok(more) => {
                    held = Some(more);
                    break;
                }
                Err(_) => break,
            }
        }
        for piece in data.chunks(INPUT_PIECE) {
            let req = pb::PtyInputRequest {
                id: id.clone(),
                tag: tag.clone(),
                data: piece.to_vec(),
                ..Default::default()
            };
            if let Err(e) = host.rpc.pty_input(req).await {
                tracing::debug!(error = %e, "pty input failed");
                return Err(e);
            }
        }
        drop(permits);
    }
}
