//! Processes and terminals: relays to the capsule's envd.

use std::sync::Arc;
use std::time::Duration;

use connectrpc::{ConnectError, RequestContext, Response, ServiceResult, ServiceStream};
use envd_client::{ExecEvent, ExecRequest, ExecStream, PtySize, Selector};
use futures::StreamExt;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof as pb_oneof;

use super::{envd_error, AgentRpc};
use crate::agent::Capsule;

/// Unary `Exec` without a timeout runs at most this long (wrenn's default).
const EXEC_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn exec_request(r: &pb::ExecRequest) -> Result<ExecRequest, ConnectError> {
    if r.cmd.is_empty() {
        return Err(ConnectError::invalid_argument("cmd is required"));
    }
    Ok(ExecRequest {
        cmd: r.cmd.clone(),
        args: r.args.clone(),
        envs: r.envs.clone().into_iter().collect(),
        cwd: (!r.cwd.is_empty()).then(|| r.cwd.clone()),
        user: (!r.user.is_empty()).then(|| r.user.clone()),
        tag: (!r.tag.is_empty()).then(|| r.tag.clone()),
        stdin: r.stdin,
        timeout: (r.timeout_sec > 0).then(|| Duration::from_secs(r.timeout_sec.into())),
        pty: None,
    })
}

fn selector(pid: Option<u32>, tag: Option<String>) -> Result<Selector, ConnectError> {
    match (pid, tag) {
        (Some(p), _) => Ok(Selector::Pid(p)),
        (None, Some(t)) if !t.is_empty() => Ok(Selector::Tag(t)),
        _ => Err(ConnectError::invalid_argument(
            "a process pid or tag is required",
        )),
    }
}

fn tag(t: &str) -> Result<Selector, ConnectError> {
    if t.is_empty() {
        return Err(ConnectError::invalid_argument("a terminal tag is required"));
    }
    Ok(Selector::Tag(t.to_owned()))
}

fn event_to_pb(ev: ExecEvent, tag: &str) -> pb::ProcessEvent {
    use pb_oneof::process_event::Event as E;
    let event = match ev {
        ExecEvent::Start { pid } => E::Started(Box::new(pb::ProcessStarted {
            pid,
            tag: tag.to_owned(),
            ..Default::default()
        })),
        ExecEvent::Stdout(b) => E::Stdout(b.to_vec()),
        ExecEvent::Stderr(b) => E::Stderr(b.to_vec()),
        ExecEvent::Pty(b) => E::Pty(b.to_vec()),
        ExecEvent::End {
            exit_code,
            status,
            error,
            ..
        } => E::Ended(Box::new(pb::ProcessEnded {
            exit_code,
            status,
            error: error.unwrap_or_default(),
            ..Default::default()
        })),
    };
    pb::ProcessEvent {
        event: Some(event),
        ..Default::default()
    }
}

/// Relay an envd stream, led by its start event (envd-client consumed it
/// to learn the pid). Each event counts as the capsule's activity; a pause
/// ends the relay ([`super::until_paused`]: the process itself lives on,
/// and a new stream can attach once the capsule is resumed).
fn relay(stream: ExecStream, c: Arc<Capsule>, tag: String) -> ServiceStream<pb::ProcessEvent> {
    let first = event_to_pb(ExecEvent::Start { pid: stream.pid }, &tag);
    let events =
        futures::stream::unfold(
            stream,
            |mut s| async move { s.next().await.map(|ev| (ev, s)) },
        );
    let events = events.map({
        let c = c.clone();
        move |ev| match ev {
            Ok(ev) => {
                c.touch();
                Ok(event_to_pb(ev, &tag))
            }
            Err(e) => Err(envd_error(&c, e)),
        }
    });
    let rest = super::until_paused(events, &c);
    Box::pin(futures::stream::once(async move { Ok(first) }).chain(rest))
}

impl AgentRpc {
    pub(super) async fn do_exec(
        &self,
        ctx: RequestContext,
        r: pb::ExecRequest,
    ) -> ServiceResult<pb::ExecResponse> {
        let c = self.running(&r.id)?;
        let mut req = exec_request(&r)?;
        if req.timeout.is_none() {
            req.timeout = Some(ctx.deadline().map_or(EXEC_DEFAULT_TIMEOUT, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            }));
        }
        let out = c.envd().exec(req).await.map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::ExecResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            ..Default::default()
        })
    }

    pub(super) async fn do_exec_stream(
        &self,
        r: pb::ExecRequest,
    ) -> ServiceResult<ServiceStream<pb::ProcessEvent>> {
        let c = self.running(&r.id)?;
        let stream = c
            .envd()
            .exec_stream(exec_request(&r)?)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Ok(Response::new(relay(stream, c.clone(), r.tag)))
    }

    pub(super) async fn do_start_background(
        &self,
        r: pb::ExecRequest,
    ) -> ServiceResult<pb::ProcessStarted> {
        let c = self.running(&r.id)?;
        let mut req = exec_request(&r)?;
        let tag = req.tag.get_or_insert_with(random_tag).clone();
        let stream = c
            .envd()
            .exec_stream(req)
            .await
            .map_err(|e| envd_error(&c, e))?;
        // Dropping the stream stops reading; the process runs on (tagged).
        let pid = stream.pid;
        drop(stream);
        Response::ok(pb::ProcessStarted {
            pid,
            tag,
            ..Default::default()
        })
    }

    pub(super) async fn do_list_processes(
        &self,
        r: pb::CapsuleRef,
    ) -> ServiceResult<pb::ListProcessesResponse> {
        let c = self.running(&r.id)?;
        let list = c
            .envd()
            .list_processes()
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::ListProcessesResponse {
            processes: list
                .into_iter()
                .map(|p| pb::ProcessInfo {
                    pid: p.pid,
                    tag: p.tag.unwrap_or_default(),
                    cmd: p.cmd,
                    args: p.args,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub(super) async fn do_kill_process(
        &self,
        r: pb::KillProcessRequest,
    ) -> ServiceResult<pb::Empty> {
        use pb_oneof::kill_process_request::Selector as S;
        let c = self.running(&r.id)?;
        let sel = match r.selector {
            Some(S::Pid(p)) => selector(Some(p), None)?,
            Some(S::Tag(t)) => selector(None, Some(t))?,
            None => selector(None, None)?,
        };
        let found = match r.signal.as_str() {
            "" | "SIGKILL" | "KILL" | "9" => c.envd().kill(sel).await,
            "SIGTERM" | "TERM" | "15" => c.envd().terminate(sel).await,
            other => {
                return Err(ConnectError::invalid_argument(format!(
                    "signal {other:?}: only SIGKILL and SIGTERM are supported"
                )))
            }
        }
        .map_err(|e| envd_error(&c, e))?;
        if !found {
            return Err(ConnectError::not_found("no such process"));
        }
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_connect_process(
        &self,
        r: pb::ProcessRef,
    ) -> ServiceResult<ServiceStream<pb::ProcessEvent>> {
        use pb_oneof::process_ref::Selector as S;
        let c = self.running(&r.id)?;
        let (sel, tag) = match r.selector {
            Some(S::Pid(p)) => (selector(Some(p), None)?, String::new()),
            Some(S::Tag(t)) => (selector(None, Some(t.clone()))?, t),
            None => (selector(None, None)?, String::new()),
        };
        let stream = c.envd().attach(sel).await.map_err(|e| envd_error(&c, e))?;
        Ok(Response::new(relay(stream, c.clone(), tag)))
    }

    pub(super) async fn do_send_stdin(&self, r: pb::StdinRequest) -> ServiceResult<pb::Empty> {
        use pb_oneof::stdin_request::Selector as S;
        let c = self.running(&r.id)?;
        let sel = match r.selector {
            Some(S::Pid(p)) => selector(Some(p), None)?,
            Some(S::Tag(t)) => selector(None, Some(t))?,
            None => selector(None, None)?,
        };
        let envd = c.envd();
        if !r.data.is_empty() {
            envd.stdin_write(sel.clone(), &r.data)
                .await
                .map_err(|e| envd_error(&c, e))?;
        }
        if r.close {
            envd.close_stdin(sel).await.map_err(|e| envd_error(&c, e))?;
        }
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_pty_attach(
        &self,
        r: pb::PtyAttachRequest,
    ) -> ServiceResult<ServiceStream<pb::ProcessEvent>> {
        let c = self.running(&r.id)?;
        let envd = c.envd();
        if r.cmd.is_empty() {
            let stream = envd
                .attach(tag(&r.tag)?)
                .await
                .map_err(|e| envd_error(&c, e))?;
            return Ok(Response::new(relay(stream, c.clone(), r.tag)));
        }
        let t = if r.tag.is_empty() {
            random_pty_tag()
        } else {
            r.tag.clone()
        };
        let clamp = |v: u32, d: u16| {
            if v == 0 {
                d
            } else {
                v.min(u16::MAX.into()) as u16
            }
        };
        let mut envs: std::collections::BTreeMap<String, String> = r.envs.into_iter().collect();
        envs.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let req = ExecRequest {
            cmd: r.cmd,
            args: r.args,
            envs,
            cwd: (!r.cwd.is_empty()).then_some(r.cwd),
            user: (!r.user.is_empty()).then_some(r.user),
            tag: Some(t.clone()),
            stdin: false,
            timeout: None,
            pty: Some(PtySize {
                cols: clamp(r.cols, 80),
                rows: clamp(r.rows, 24),
            }),
        };
        let stream = envd.pty_start(req).await.map_err(|e| envd_error(&c, e))?;
        Ok(Response::new(relay(stream, c.clone(), t)))
    }

    pub(super) async fn do_pty_input(&self, r: pb::PtyInputRequest) -> ServiceResult<pb::Empty> {
        let c = self.running(&r.id)?;
        c.envd()
            .pty_input(tag(&r.tag)?, &r.data)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_pty_resize(&self, r: pb::PtyResizeRequest) -> ServiceResult<pb::Empty> {
        let c = self.running(&r.id)?;
        if r.cols == 0 || r.rows == 0 || r.cols > 65535 || r.rows > 65535 {
            return Err(ConnectError::invalid_argument(
                "cols and rows must be 1-65535",
            ));
        }
        c.envd()
            .pty_resize(tag(&r.tag)?, r.cols as u16, r.rows as u16)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }

    pub(super) async fn do_pty_kill(&self, r: pb::PtyRef) -> ServiceResult<pb::Empty> {
        let c = self.running(&r.id)?;
        c.envd()
            .kill(tag(&r.tag)?)
            .await
            .map_err(|e| envd_error(&c, e))?;
        Response::ok(pb::Empty::default())
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// wrenn's formats: `proc-` / `pty-` + 8 hex.
fn random_tag() -> String {
    format!("proc-{}", random_hex())
}

fn random_pty_tag() -> String {
    format!("pty-{}", random_hex())
}
