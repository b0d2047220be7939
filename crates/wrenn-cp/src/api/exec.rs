//! Commands: foreground exec (JSON result), background exec (202),
//! process list and kill, and the exec / process-output WebSockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_event::Event as Ev;

use super::ws::{pump, send_json, Pumped, Session, Utf8Carry};
use super::{refresh_after, running, ApiJson, Path, Query};
use crate::auth::{random_hex, Caller};
use crate::error::{ApiError, ApiResult};
use crate::server::Cp;

pub const DEFAULT_TIMEOUT_SEC: i64 = 30;

#[derive(Debug, Deserialize)]
pub struct ExecBody {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    timeout_sec: Option<i64>,
    #[serde(default)]
    background: bool,
    tag: Option<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    cwd: Option<String>,
}

fn exec_request(
    id: &str,
    cmd: String,
    args: Vec<String>,
    envs: HashMap<String, String>,
    cwd: Option<String>,
) -> pb::ExecRequest {
    pb::ExecRequest {
        id: id.to_owned(),
        cmd,
        args,
        envs: envs.into_iter().collect(),
        cwd: cwd.unwrap_or_default(),
        ..Default::default()
    }
}

/// `POST /v1/capsules/{id}/exec`
pub async fn exec(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Response> {
    if body.cmd.is_empty() {
        return Err(ApiError::invalid("cmd is required"));
    }
    let (c, host) = running(&cp, &caller, &id).await?;
    let cmd = body.cmd.clone();
    let mut req = exec_request(c.id.as_str(), body.cmd, body.args, body.envs, body.cwd);
    if body.background {
        req.tag = body
            .tag
            .unwrap_or_else(|| format!("proc-{}", random_hex(4)));
        let started = match host.rpc.start_background(req).await {
            Ok(s) => s.into_owned(),
            Err(e) => return Err(refresh_after(&cp, &c, &host, ApiError::agent(&e)).await),
        };
        let body = json!({
            "sandbox_id": c.id.to_string(), "cmd": cmd, "pid": started.pid, "tag": started.tag,
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let timeout = body
        .timeout_sec
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_TIMEOUT_SEC);
    req.timeout_sec = timeout.min(u32::MAX as i64) as u32;
    let t0 = Instant::now();
    let opts = connectrpc::client::CallOptions::default()
        .with_timeout(Duration::from_secs(timeout as u64 + 5));
    let out = match host.rpc.exec_with_options(req, opts).await {
        Ok(o) => o.into_owned(),
        Err(e) if e.code == connectrpc::ErrorCode::DeadlineExceeded => {
            let mut err = ApiError::agent(&e);
            err.message = format!("the command did not finish within {timeout} s");
            return Err(err);
        }
        Err(e) => return Err(refresh_after(&cp, &c, &host, ApiError::agent(&e)).await),
    };
    let duration_ms = t0.elapsed().as_millis() as u64;
    let (stdout, stderr, encoding) = match (
        std::str::from_utf8(&out.stdout),
        std::str::from_utf8(&out.stderr),
    ) {
        (Ok(o), Ok(e)) => (o.to_owned(), e.to_owned(), "utf-8"),
        _ => {
            let b = base64::engine::general_purpose::STANDARD;
            (b.encode(&out.stdout), b.encode(&out.stderr), "base64")
        }
    };
    Ok(Json(json!({
        "sandbox_id": c.id.to_string(), "cmd": cmd, "stdout": stdout, "stderr": stderr,
        "exit_code": out.exit_code, "duration_ms": duration_ms, "encoding": encoding,
    }))
    .into_response())
}

/// `GET /v1/capsules/{id}/processes`
pub async fn processes(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (c, host) = running(&cp, &caller, &id).await?;
    let list = match host.rpc.list_processes(super::capsules::cref(&c.id)).await {
        Ok(l) => l.into_owned(),
        Err(e) => return Err(refresh_after(&cp, &c, &host, ApiError::agent(&e)).await),
    };
    let procs: Vec<Value> = list
        .processes
        .iter()
        .map(|p| {
            let mut v = json!({"pid": p.pid, "cmd": p.cmd, "args": p.args});
            if !p.tag.is_empty() {
                v["tag"] = json!(p.tag);
            }
            v
        })
        .collect();
    Ok(Json(json!({ "processes": procs })))
}

enum Selector {
    Pid(u32),
    Tag(String),
}

fn selector(s: &str) -> ApiResult<Selector> {
    if s.is_empty() {
        return Err(ApiError::invalid("empty process selector"));
    }
    Ok(match s.parse::<u32>() {
        Ok(p) => Selector::Pid(p),
        Err(_) => Selector::Tag(s.to_owned()),
    })
}

/// `DELETE /v1/capsules/{id}/processes/{selector}?signal=SIGKILL|SIGTERM`
pub async fn kill(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path((id, sel)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let signal = q.get("signal").map(String::as_str).unwrap_or("SIGKILL");
    if !matches!(signal, "SIGKILL" | "SIGTERM") {
        return Err(ApiError::invalid("signal must be SIGKILL or SIGTERM"));
    }
    let sel = selector(&sel)?;
    let (c, host) = running(&cp, &caller, &id).await?;
    use wrenn_proto::wrenn::agent::v1::__buffa::oneof::kill_process_request::Selector as S;
    let req = pb::KillProcessRequest {
        id: c.id.to_string(),
        selector: Some(match sel {
            Selector::Pid(p) => S::Pid(p),
            Selector::Tag(t) => S::Tag(t),
        }),
        signal: signal.to_owned(),
        ..Default::default()
    };
    if let Err(e) = host.rpc.kill_process(req).await {
        return Err(refresh_after(&cp, &c, &host, ApiError::agent(&e)).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct StartFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    cwd: Option<String>,
}

const FIRST_FRAME_WAIT: Duration = Duration::from_secs(30);

/// `GET /v1/capsules/{id}/exec/stream` (WebSocket). The key is checked
/// before the upgrade (401); the capsule after it, in band
/// ([`super::ws::refuse`]).
pub async fn exec_stream(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = super::ws::upgrade(ws)?;
    let (c, host) = match running(&cp, &caller, &id).await {
        Ok(found) => found,
        Err(e) => return Ok(super::ws::refuse(ws, e, Session::Exec)),
    };
    Ok(ws.on_upgrade(move |mut socket| async move {
        let start = match tokio::time::timeout(FIRST_FRAME_WAIT, socket.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<StartFrame>(&t).ok(),
            _ => None,
        };
        let Some(start) = start.filter(|s| s.kind == "start" && !s.cmd.is_empty()) else {
            let msg = "first message must be type 'start' with a 'cmd' field";
            send_json(&mut socket, json!({"type": "error", "data": msg})).await;
            return;
        };
        let req = exec_request(c.id.as_str(), start.cmd, start.args, start.envs, start.cwd);
        match host.rpc.exec_stream(req).await {
            Ok(s) => {
                let rx = pump(s, &cp.tasks);
                relay_output(socket, rx).await;
            }
            Err(e) => {
                send_json(
                    &mut socket,
                    json!({"type": "error", "data": ApiError::agent(&e).message}),
                )
                .await;
            }
        }
    }))
}

/// `GET /v1/capsules/{id}/processes/{selector}/stream` (WebSocket): only
/// output produced after attaching.
pub async fn process_stream(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    Path((id, sel)): Path<(String, String)>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = super::ws::upgrade(ws)?;
    let found = match selector(&sel) {
        Ok(sel) => running(&cp, &caller, &id).await.map(|f| (sel, f)),
        Err(e) => Err(e),
    };
    let (sel, (c, host)) = match found {
        Ok(found) => found,
        Err(e) => return Ok(super::ws::refuse(ws, e, Session::Attach)),
    };
    use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_ref::Selector as S;
    let req = pb::ProcessRef {
        id: c.id.to_string(),
        selector: Some(match sel {
            Selector::Pid(p) => S::Pid(p),
            Selector::Tag(t) => S::Tag(t),
        }),
        ..Default::default()
    };
    Ok(ws.on_upgrade(move |mut socket| async move {
        match host.rpc.connect_process(req).await {
            Ok(s) => {
                let rx = pump(s, &cp.tasks);
                relay_output(socket, rx).await;
            }
            Err(e) => {
                let msg = format!(
                    "failed to connect to process: {}",
                    ApiError::agent(&e).message
                );
                send_json(&mut socket, json!({"type": "error", "data": msg})).await;
            }
        }
    }))
}

/// Process events → `start`, `stdout`, `stderr`, `exit` / `error` text
/// frames; ends after `exit` or `error`, or when the client leaves or
/// sends `{"type":"stop"}`.
async fn relay_output(mut socket: WebSocket, mut rx: tokio::sync::mpsc::Receiver<Pumped>) {
    let (mut out, mut err) = (Utf8Carry::default(), Utf8Carry::default());
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let frame = match ev {
                    Some(Ok(pb::ProcessEvent { event: Some(e), .. })) => match e {
                        Ev::Started(s) => {
                            let mut v = json!({"type": "start"});
                            if s.pid != 0 {
                                v["pid"] = json!(s.pid);
                            }
                            v
                        }
                        // (a chunk that ends inside a character may leave
                        // nothing to send yet: no empty frame for it)
                        Ev::Stdout(b) | Ev::Pty(b) => match out.push(&b) {
                            t if t.is_empty() => continue,
                            t => json!({"type": "stdout", "data": t}),
                        },
                        Ev::Stderr(b) => match err.push(&b) {
                            t if t.is_empty() => continue,
                            t => json!({"type": "stderr", "data": t}),
                        },
                        Ev::Ended(end) => {
                            let (o, e) = (out.finish(), err.finish());
                            if !o.is_empty() {
                                send_json(&mut socket, json!({"type": "stdout", "data": o})).await;
                            }
                            if !e.is_empty() {
                                send_json(&mut socket, json!({"type": "stderr", "data": e})).await;
                            }
                            send_json(&mut socket, json!({"type": "exit", "exit_code": end.exit_code})).await;
                            break;
                        }
                    },
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        send_json(&mut socket, json!({"type": "error", "data": ApiError::agent(&e).message})).await;
                        break;
                    }
                    None => {
                        send_json(&mut socket, json!({"type": "error", "data": "the process stream ended without an exit"})).await;
                        break;
                    }
                };
                if !send_json(&mut socket, frame).await {
                    return;
                }
            }
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) if t.contains("\"stop\"") => break,
                Some(Ok(_)) => {}
            }
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
