//! Processes: exec (collected), exec streams, PTYs, input, signals.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use buffa::MessageField;
use bytes::Bytes;
use connectrpc::client::{CallOptions, ServerStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wrenn_proto::process as pb;
use wrenn_proto::process::__buffa::oneof as pb_oneof;

use crate::{ClientError, EnvdClient, STREAM_BUFFER};

/// Keepalive interval asked of envd on streams, in seconds.
const KEEPALIVE_SECS: &str = "30";
/// The most output (stdout and stderr together) a foreground
/// [`exec`](EnvdClient::exec) collects: it is answered in one message, and
/// the control plane takes agent messages of up to 16 MiB.
pub const EXEC_OUTPUT_LIMIT: usize = 12 << 20;

/// A command to run.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Run as this user (the capsule's default user when `None`).
    pub user: Option<String>,
    pub tag: Option<String>,
    /// Open a stdin pipe.
    pub stdin: bool,
    /// envd kills the process when this passes.
    pub timeout: Option<Duration>,
    /// Run in a terminal of this size; output then arrives as
    /// [`ExecEvent::Pty`] and input goes through [`EnvdClient::pty_input`].
    pub pty: Option<PtySize>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

impl ExecRequest {
    /// `cmd` with `args`.
    pub fn new(cmd: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            cmd: cmd.into(),
            args: args.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// `/bin/sh -c <script>`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new("/bin/sh", ["-c".to_string(), script.into()])
    }

    /// An interactive `/bin/sh` in an 80×24 terminal with `TERM` set.
    pub fn terminal() -> Self {
        let mut req = Self::new("/bin/sh", ["-i"]);
        req.envs.insert("TERM".into(), "xterm-256color".into());
        req.pty = Some(PtySize::default());
        req
    }
}

/// Selects a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

impl From<u32> for Selector {
    fn from(pid: u32) -> Self {
        Selector::Pid(pid)
    }
}

impl Selector {
    fn to_pb(&self) -> pb::ProcessSelector {
        use pb_oneof::process_selector::Selector as S;
        pb::ProcessSelector {
            selector: Some(match self {
                Selector::Pid(p) => S::Pid(*p),
                Selector::Tag(t) => S::Tag(t.clone()),
            }),
            ..Default::default()
        }
    }
}

/// One event of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Start {
        pid: u32,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End {
        exit_code: i32,
        exited: bool,
        status: String,
        error: Option<String>,
    },
}

/// A collected run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub status: String,
}

/// A live process stream. Events arrive in order and the channel closes after
/// `End`; dropping the handle stops reading (the process keeps running).
#[derive(Debug)]
pub struct ExecStream {
    pub pid: u32,
    rx: mpsc::Receiver<Result<ExecEvent, ClientError>>,
    task: JoinHandle<()>,
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ExecStream {
    /// The next event; `None` once the stream is over.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, ClientError>> {
        self.rx.recv().await
    }

    /// Read to the end, collecting output: at most `limit` bytes of it
    /// (stdout and stderr together), or [`ClientError::OutputTooLarge`].
    pub async fn collect(mut self, limit: usize) -> Result<ExecOutput, ClientError> {
        let mut out = ExecOutput {
            pid: self.pid,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit_code: -1,
            status: String::new(),
        };
        while let Some(ev) = self.next().await {
            let ev = ev?;
            if let ExecEvent::Stdout(b) | ExecEvent::Pty(b) | ExecEvent::Stderr(b) = &ev {
                if out.stdout.len() + out.stderr.len() + b.len() > limit {
                    return Err(ClientError::OutputTooLarge { limit });
                }
            }
            match ev {
                ExecEvent::Stdout(b) | ExecEvent::Pty(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Start { .. } => {}
                ExecEvent::End {
                    exit_code, status, ..
                } => {
                    out.exit_code = exit_code;
                    out.status = status;
                    return Ok(out);
                }
            }
        }
        Err(ClientError::Truncated)
    }
}

fn basic_user(user: &str) -> String {
    let raw = format!("{user}:");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn call_options(user: Option<&str>, timeout: Option<Duration>) -> CallOptions {
    let mut o = CallOptions::default().with_header("keepalive-ping-interval", KEEPALIVE_SECS);
    if let Some(u) = user {
        o = o.with_header("authorization", basic_user(u));
    }
    if let Some(t) = timeout {
        o = o.with_timeout(t);
    }
    o
}

fn from_pb(ev: pb::ProcessEvent) -> Option<ExecEvent> {
    use pb_oneof::process_event::data_event::Output;
    use pb_oneof::process_event::Event as E;
    Some(match ev.event? {
        E::Start(s) => ExecEvent::Start { pid: s.pid },
        E::Data(d) => match d.output? {
            Output::Stdout(b) => ExecEvent::Stdout(b.into()),
            Output::Stderr(b) => ExecEvent::Stderr(b.into()),
            Output::Pty(b) => ExecEvent::Pty(b.into()),
        },
        E::End(e) => ExecEvent::End {
            exit_code: e.exit_code,
            exited: e.exited,
            status: e.status,
            error: e.error,
        },
        E::Keepalive(_) => return None,
    })
}

type Body = <connectrpc::client::HttpClient as connectrpc::client::ClientTransport>::ResponseBody;

/// Read the `start` event, then hand the rest of the stream to a task.
async fn into_exec_stream<V, M>(
    mut stream: ServerStream<Body, V>,
    event_of: fn(M) -> Option<pb::ProcessEvent>,
) -> Result<ExecStream, ClientError>
where
    V: buffa::view::MessageView<'static, Owned = M> + Send + 'static,
    M: buffa::view::HasMessageView<View<'static> = V>
        + buffa::Message
        + connectrpc::codec::JsonDeserialize
        + Send
        + 'static,
{
    let first = loop {
        let msg = stream.message::<M>().await?.ok_or(ClientError::Truncated)?;
        match event_of(msg.to_owned_message()).and_then(from_pb) {
            Some(ev) => break ev,
            None => continue,
        }
    };
    let ExecEvent::Start { pid } = first else {
        return Err(ClientError::Decode("the first event was not start".into()));
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let task = tokio::spawn(async move {
        loop {
            let item = match stream.message::<M>().await {
                Ok(Some(msg)) => match event_of(msg.to_owned_message()).and_then(from_pb) {
                    Some(ev) => Ok(ev),
                    None => continue,
                },
                Ok(None) => Err(ClientError::Truncated),
                Err(e) => Err(ClientError::Rpc(e)),
            };
            let last = !matches!(
                item,
                Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_) | ExecEvent::Pty(_))
            );
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    Ok(ExecStream { pid, rx, task })
}

impl EnvdClient {
    /// Start a process and stream its events (a terminal when `req.pty` is set).
    pub async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        let pty = req.pty.map(|size| pb::PTY {
            size: MessageField::some(pb::pty::Size {
                cols: size.cols.into(),
                rows: size.rows.into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let start = pb::StartRequest {
            process: MessageField::some(pb::ProcessConfig {
                cmd: req.cmd,
                args: req.args,
                envs: req.envs.into_iter().collect(),
                cwd: req.cwd,
                ..Default::default()
            }),
            pty: pty.map_or_else(MessageField::none, MessageField::some),
            tag: req.tag,
            stdin: Some(req.stdin),
            ..Default::default()
        };
        let stream = self
            .process
            .start_with_options(start, call_options(req.user.as_deref(), req.timeout))
            .await?;
        into_exec_stream(stream, |r: pb::StartResponse| r.event.into_option()).await
    }

    /// Run a process to the end and collect its output: at most
    /// [`EXEC_OUTPUT_LIMIT`] of it; past that the process is killed and the
    /// answer is [`ClientError::OutputTooLarge`].
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        let stream = self.exec_stream(req).await?;
        let pid = stream.pid;
        let out = stream.collect(EXEC_OUTPUT_LIMIT).await;
        if let Err(ClientError::OutputTooLarge { .. }) = out {
            // nobody will read the rest: the command goes
            let _ = self.kill(Selector::Pid(pid)).await;
        }
        out
    }

    /// Open a terminal: [`exec_stream`](Self::exec_stream) with an 80×24 PTY
    /// unless `req.pty` names a size.
    pub async fn pty_start(&self, mut req: ExecRequest) -> Result<ExecStream, ClientError> {
        req.pty.get_or_insert_with(PtySize::default);
        self.exec_stream(req).await
    }

    /// Attach to a running (or just ended) process: new output only.
    pub async fn attach(&self, selector: Selector) -> Result<ExecStream, ClientError> {
        let req = pb::ConnectRequest {
            process: MessageField::some(selector.to_pb()),
            ..Default::default()
        };
        let stream = self
            .process
            .connect_with_options(req, call_options(None, None))
            .await?;
        into_exec_stream(stream, |r: pb::ConnectResponse| r.event.into_option()).await
    }

    async fn send_input(
        &self,
        selector: Selector,
        input: pb_oneof::process_input::Input,
    ) -> Result<(), ClientError> {
        self.process
            .send_input(pb::SendInputRequest {
                process: MessageField::some(selector.to_pb()),
                input: MessageField::some(pb::ProcessInput {
                    input: Some(input),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Write to a process's stdin pipe.
    pub async fn stdin_write(&self, selector: Selector, data: &[u8]) -> Result<(), ClientError> {
        self.send_input(
            selector,
            pb_oneof::process_input::Input::Stdin(data.to_vec()),
        )
        .await
    }

    /// Type into a terminal.
    pub async fn pty_input(&self, selector: Selector, data: &[u8]) -> Result<(), ClientError> {
        self.send_input(selector, pb_oneof::process_input::Input::Pty(data.to_vec()))
            .await
    }

    /// Close a process's stdin.
    pub async fn close_stdin(&self, selector: Selector) -> Result<(), ClientError> {
        self.process
            .close_stdin(pb::CloseStdinRequest {
                process: MessageField::some(selector.to_pb()),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Resize a terminal.
    pub async fn pty_resize(
        &self,
        selector: Selector,
        cols: u16,
        rows: u16,
    ) -> Result<(), ClientError> {
        self.process
            .update(pb::UpdateRequest {
                process: MessageField::some(selector.to_pb()),
                pty: MessageField::some(pb::PTY {
                    size: MessageField::some(pb::pty::Size {
                        cols: cols.into(),
                        rows: rows.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// SIGKILL a process (and its group). `Ok(false)` if it was not running.
    pub async fn kill(&self, selector: Selector) -> Result<bool, ClientError> {
        self.signal(selector, pb::Signal::SIGNAL_SIGKILL).await
    }

    /// SIGTERM a process (and its group). `Ok(false)` if it was not running.
    pub async fn terminate(&self, selector: Selector) -> Result<bool, ClientError> {
        self.signal(selector, pb::Signal::SIGNAL_SIGTERM).await
    }

    async fn signal(&self, selector: Selector, signal: pb::Signal) -> Result<bool, ClientError> {
        let res = self
            .process
            .send_signal(pb::SendSignalRequest {
                process: MessageField::some(selector.to_pb()),
                signal: signal.into(),
                ..Default::default()
            })
            .await;
        crate::false_on(res, connectrpc::ErrorCode::NotFound)
    }

    /// Running processes: pid, tag, command.
    pub async fn list_processes(&self) -> Result<Vec<ProcessSummary>, ClientError> {
        let resp = self.process.list(pb::ListRequest::default()).await?;
        let list = resp.into_view().to_owned_message();
        Ok(list
            .processes
            .into_iter()
            .map(|p| {
                let (cmd, args) = p
                    .config
                    .as_option()
                    .map(|c| (c.cmd.clone(), c.args.clone()))
                    .unwrap_or_default();
                ProcessSummary {
                    pid: p.pid,
                    tag: p.tag,
                    cmd,
                    args,
                }
            })
            .collect())
    }
}

/// A process envd tracks (`List`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSummary {
    pub pid: u32,
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
}
