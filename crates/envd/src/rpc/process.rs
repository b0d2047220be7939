//! `process.Process` over [`crate::process`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffa::MessageField;
use connectrpc::{
    ConnectError, InboundStream, RequestContext, Response, ServiceRequest, ServiceResult,
    ServiceStream,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use wrenn_proto::process as pb;
use wrenn_proto::process::__buffa::oneof as pb_oneof;

use super::{internal, keepalive_interval, rpc_user};
use crate::paths;
use crate::process::{
    EndInfo, Event, InputKind, ProcessError, ProcessSpec, PtySize, RequestedConfig, Selector,
};
use crate::state::Envd;

/// The `process.Process` service.
pub struct ProcessRpc {
    state: Arc<Envd>,
}

impl ProcessRpc {
    pub fn new(state: Arc<Envd>) -> Self {
        Self { state }
    }

    /// The running process `sel` names.
    fn running(
        &self,
        sel: Option<&pb::ProcessSelector>,
    ) -> Result<Arc<crate::process::Process>, ConnectError> {
        self.state
            .processes
            .find_running(&selector(sel)?)
            .map_err(process_error)
    }
}

fn process_error(e: ProcessError) -> ConnectError {
    let msg = e.to_string();
    match e {
        ProcessError::NotFound(_) => ConnectError::not_found(msg),
        ProcessError::Spawn(s) => ConnectError::invalid_argument(format!("{s:#}")),
        ProcessError::ReservedTag(_) => ConnectError::invalid_argument(msg),
        ProcessError::StdinClosed | ProcessError::NotPty | ProcessError::PtyInputOnPipe => {
            ConnectError::internal(msg)
        }
        ProcessError::Input { .. } | ProcessError::Signal { .. } | ProcessError::Resize { .. } => {
            internal("process", format!("{e:#}"))
        }
    }
}

fn selector(sel: Option<&pb::ProcessSelector>) -> Result<Selector, ConnectError> {
    match sel.and_then(|s| s.selector.as_ref()) {
        Some(pb_oneof::process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(*pid)),
        Some(pb_oneof::process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag.clone())),
        None => Err(ConnectError::invalid_argument(
            "a process selector (pid or tag) is required",
        )),
    }
}

fn pty_size(pty: Option<&pb::PTY>) -> Option<PtySize> {
    pty.map(|p| {
        let size = p.size.as_option();
        let clamp = |v: u32, default: u16| {
            if v == 0 {
                default
            } else {
                v.min(u16::MAX as u32) as u16
            }
        };
        PtySize {
            cols: clamp(size.map_or(0, |s| s.cols), 80),
            rows: clamp(size.map_or(0, |s| s.rows), 24),
        }
    })
}

fn event_to_pb(ev: Event) -> pb::ProcessEvent {
    use pb_oneof::process_event::Event as E;
    let data = |o| {
        E::Data(Box::new(pb::process_event::DataEvent {
            output: Some(o),
            ..Default::default()
        }))
    };
    use pb_oneof::process_event::data_event::Output;
    let event = match ev {
        Event::Start { pid } => E::Start(Box::new(pb::process_event::StartEvent {
            pid,
            ..Default::default()
        })),
        Event::Stdout(b) => data(Output::Stdout(b.to_vec())),
        Event::Stderr(b) => data(Output::Stderr(b.to_vec())),
        Event::Pty(b) => data(Output::Pty(b.to_vec())),
        Event::End(EndInfo {
            exit_code,
            exited,
            status,
            error,
        }) => E::End(Box::new(pb::process_event::EndEvent {
            exit_code,
            exited,
            status,
            error,
            ..Default::default()
        })),
    };
    pb::ProcessEvent {
        event: Some(event),
        ..Default::default()
    }
}

fn keepalive_event() -> pb::ProcessEvent {
    pb::ProcessEvent {
        event: Some(pb_oneof::process_event::Event::Keepalive(Box::default())),
        ..Default::default()
    }
}

struct EventStream {
    rx: mpsc::Receiver<Event>,
    keepalive: tokio::time::Interval,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

/// Turn a subscription into an RPC stream: events as they come, a keepalive
/// after every `keepalive` of silence, ending after `End`. Once `deadline`
/// passes the stream ends with `deadline_exceeded` (what connect-go does with
/// the request context), also when the end event it raced with is the kill
/// the deadline caused.
fn event_stream<T: Send + 'static>(
    rx: mpsc::Receiver<Event>,
    keepalive: Duration,
    deadline: Option<Instant>,
    wrap: fn(pb::ProcessEvent) -> T,
) -> ServiceStream<T> {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = EventStream {
        rx,
        keepalive: interval,
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
        done: false,
    };
    let stream = futures::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let expiry = async {
            match s.deadline.as_mut() {
                Some(d) => d.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            biased;
            ev = s.rx.recv() => match ev {
                Some(Event::End(_)) if deadline_passed(deadline) => {
                    s.done = true;
                    Err(ConnectError::deadline_exceeded("deadline exceeded: the process was killed"))
                }
                Some(ev) => {
                    s.done = matches!(ev, Event::End(_));
                    s.keepalive.reset();
                    Ok(wrap(event_to_pb(ev)))
                }
                None => {
                    s.done = true;
                    Err(ConnectError::resource_exhausted(
                        "the process output stream was closed: the reader fell behind or envd is stopping",
                    ))
                }
            },
            () = expiry => {
                s.done = true;
                Err(ConnectError::deadline_exceeded("stream deadline exceeded"))
            }
            _ = s.keepalive.tick() => Ok(wrap(keepalive_event())),
        };
        Some((item, s))
    });
    Box::pin(stream)
}

fn deadline_passed(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

fn start_response(event: pb::ProcessEvent) -> pb::StartResponse {
    pb::StartResponse {
        event: MessageField::some(event),
        ..Default::default()
    }
}

fn connect_response(event: pb::ProcessEvent) -> pb::ConnectResponse {
    pb::ConnectResponse {
        event: MessageField::some(event),
        ..Default::default()
    }
}

impl pb::Process for ProcessRpc {
    async fn list(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListRequest>,
    ) -> ServiceResult<pb::ListResponse> {
        let processes = self
            .state
            .processes
            .list()
            .into_iter()
            .map(|p| pb::ProcessInfo {
                config: MessageField::some(pb::ProcessConfig {
                    cmd: p.config.cmd.clone(),
                    args: p.config.args.clone(),
                    envs: p.config.envs.clone().into_iter().collect(),
                    cwd: p.config.cwd.clone(),
                    ..Default::default()
                }),
                pid: p.pid,
                tag: p.tag.clone(),
                ..Default::default()
            })
            .collect();
        Response::ok(pb::ListResponse {
            processes,
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ConnectRequest>,
    ) -> ServiceResult<ServiceStream<pb::ConnectResponse>> {
        let req = request.to_owned_message();
        let sel = selector(req.process.as_option())?;
        let process = self.state.processes.find(&sel).map_err(process_error)?;
        let rx = process.subscribe();
        Ok(Response::new(event_stream(
            rx,
            keepalive_interval(&ctx),
            ctx.deadline(),
            connect_response,
        )))
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::StartRequest>,
    ) -> ServiceResult<ServiceStream<pb::StartResponse>> {
        let req = request.to_owned_message();
        let (_, user) = rpc_user(&self.state, &ctx)?;
        let config = req
            .process
            .as_option()
            .ok_or_else(|| ConnectError::invalid_argument("process is required"))?;
        if config.cmd.is_empty() {
            return Err(ConnectError::invalid_argument("process.cmd is required"));
        }
        let envs: BTreeMap<String, String> = config
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // (`A=B` would reach the process as `A=B=c`, and `""` as `=x`)
        if let Some(k) = envs
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(ConnectError::invalid_argument(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => paths::resolve(c, &user.home),
            None => self.state.default_cwd(&user),
        };
        let spec = ProcessSpec {
            cmd: config.cmd.clone(),
            args: config.args.clone(),
            env: self.state.process_env(&user, &envs),
            cwd,
            user,
            tag: req.tag.clone(),
            pty: pty_size(req.pty.as_option()),
            stdin: req.stdin.unwrap_or(true),
            deadline: ctx.deadline(),
            config: RequestedConfig {
                cmd: config.cmd.clone(),
                args: config.args.clone(),
                envs,
                cwd: config.cwd.clone(),
            },
        };
        let (_process, rx) = self
            .state
            .processes
            .start(spec)
            .await
            .map_err(process_error)?;
        // The deadline also kills the process (its supervisor does that).
        Ok(Response::new(event_stream(
            rx,
            keepalive_interval(&ctx),
            ctx.deadline(),
            start_response,
        )))
    }

    async fn update(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::UpdateRequest>,
    ) -> ServiceResult<pb::UpdateResponse> {
        let req = request.to_owned_message();
        let process = self.running(req.process.as_option())?;
        if let Some(size) = pty_size(req.pty.as_option()) {
            process.resize(size).map_err(process_error)?;
        }
        Response::ok(pb::UpdateResponse::default())
    }

    async fn stream_input(
        &self,
        _ctx: RequestContext,
        mut requests: InboundStream<pb::StreamInputRequest>,
    ) -> ServiceResult<pb::StreamInputResponse> {
        use pb_oneof::stream_input_request::Event as E;
        let first = match requests.next().await {
            Some(item) => item?.to_owned_message(),
            None => {
                return Err(ConnectError::invalid_argument(
                    "the stream carried no start event",
                ))
            }
        };
        let Some(E::Start(start)) = first.event else {
            return Err(ConnectError::invalid_argument(
                "the first StreamInput message must be a start event",
            ));
        };
        let process = self.running(start.process.as_option())?;
        while let Some(item) = requests.next().await {
            match item?.to_owned_message().event {
                Some(E::Data(data)) => write_input(&process, data.input.as_option()).await?,
                Some(E::Keepalive(_)) | None => {}
                Some(E::Start(_)) => {
                    return Err(ConnectError::invalid_argument("a second start event"));
                }
            }
        }
        Response::ok(pb::StreamInputResponse::default())
    }

    async fn send_input(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendInputRequest>,
    ) -> ServiceResult<pb::SendInputResponse> {
        let req = request.to_owned_message();
        let process = self.running(req.process.as_option())?;
        write_input(&process, req.input.as_option()).await?;
        Response::ok(pb::SendInputResponse::default())
    }

    async fn send_signal(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendSignalRequest>,
    ) -> ServiceResult<pb::SendSignalResponse> {
        let req = request.to_owned_message();
        let sig = match req.signal.as_known() {
            Some(pb::Signal::SIGNAL_SIGKILL) => libc::SIGKILL,
            Some(pb::Signal::SIGNAL_SIGTERM) => libc::SIGTERM,
            _ => {
                return Err(ConnectError::unimplemented(format!(
                    "signal {} is not supported: use SIGNAL_SIGTERM or SIGNAL_SIGKILL",
                    req.signal.to_i32()
                )))
            }
        };
        let process = self.running(req.process.as_option())?;
        process.signal(sig).map_err(process_error)?;
        Response::ok(pb::SendSignalResponse::default())
    }

    async fn close_stdin(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CloseStdinRequest>,
    ) -> ServiceResult<pb::CloseStdinResponse> {
        let req = request.to_owned_message();
        let process = self.running(req.process.as_option())?;
        process.close_stdin().await.map_err(process_error)?;
        Response::ok(pb::CloseStdinResponse::default())
    }
}

async fn write_input(
    process: &crate::process::Process,
    input: Option<&pb::ProcessInput>,
) -> Result<(), ConnectError> {
    use pb_oneof::process_input::Input;
    let (kind, data) = match input.and_then(|i| i.input.as_ref()) {
        Some(Input::Stdin(d)) => (InputKind::Stdin, d),
        Some(Input::Pty(d)) => (InputKind::Pty, d),
        None => return Ok(()),
    };
    process.write_input(kind, data).await.map_err(process_error)
}
