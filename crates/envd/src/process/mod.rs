//! Processes started by clients: the table, each process's output fan-out,
//! input, signals and PTY resizing. Knows nothing of the wire.
//!
//! Concurrency protocol: the table is a `Mutex<HashMap>` held only for
//! lookups and inserts. Each process has one supervisor task (waits for the
//! exit status from the [`Reaper`](crate::reaper::Reaper), then for the output
//! pumps, then publishes the end event and moves the process to the retained
//! list for [`RETAIN_FOR`]) and one pump task per output fd.
//!
//! Slow-reader policy: every subscriber gets a channel of [`EVENT_BUFFER`]
//! events. A full channel **blocks** the pump, so a stalled client stalls the
//! process's output (its pipe fills and its writes block) and memory stays
//! bounded at `EVENT_BUFFER` chunks per subscriber. A subscriber that accepts
//! nothing for [`SLOW_READER_GRACE`] is dropped; its stream then ends with
//! `resource_exhausted`, and the process and the other subscribers go on.

mod output;
mod spawn;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::reaper::{ExitStatus, Reaper};
use crate::users::User;

pub use spawn::{set_workload_nice, SpawnError};

/// Capacity of every subscriber's event channel.
pub const EVENT_BUFFER: usize = 256;
/// A subscriber that takes no event for this long is dropped.
pub const SLOW_READER_GRACE: Duration = Duration::from_secs(30);
/// How long an ended process can still be connected to.
pub const RETAIN_FOR: Duration = Duration::from_secs(30);
/// Largest stdout/stderr chunk.
pub const PIPE_CHUNK: usize = 32 * 1024;
/// Largest PTY chunk.
pub const PTY_CHUNK: usize = 16 * 1024;
/// Reserved tag (E2B uses it for its system cgroup).
pub const RESERVED_TAG: &str = "_system";

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// What to run, fully resolved (user, cwd and env decided by the caller).
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// The environment exactly as the process gets it, in order.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub user: User,
    pub tag: Option<String>,
    pub pty: Option<PtySize>,
    pub stdin: bool,
    /// Kill the process at this instant (`Connect-Timeout-Ms` on Start).
    pub deadline: Option<Instant>,
    /// What the client asked for, echoed back by `List`.
    pub config: RequestedConfig,
}

/// A process's configuration as the client sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestedConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// How a process ended, as E2B's envd reports it (Go's `ProcessState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndInfo {
    pub exit_code: i32,
    pub exited: bool,
    pub status: String,
    pub error: Option<String>,
}

impl EndInfo {
    fn from_status(status: ExitStatus) -> Self {
        match status {
            ExitStatus::Exited(code) => {
                let text = format!("exit status {code}");
                Self {
                    exit_code: code,
                    exited: true,
                    error: (code != 0).then(|| text.clone()),
                    status: text,
                }
            }
            ExitStatus::Signaled(sig) => {
                let text = format!("signal: {}", signal_name(sig));
                Self {
                    exit_code: -1,
                    exited: false,
                    status: text.clone(),
                    error: Some(text),
                }
            }
        }
    }
}

/// Go's names for signals, which clients match on.
fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "hangup".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGQUIT => "quit".into(),
        libc::SIGILL => "illegal instruction".into(),
        libc::SIGTRAP => "trace/breakpoint trap".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGBUS => "bus error".into(),
        libc::SIGFPE => "floating point exception".into(),
        libc::SIGKILL => "killed".into(),
        libc::SIGUSR1 => "user defined signal 1".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGUSR2 => "user defined signal 2".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGALRM => "alarm clock".into(),
        libc::SIGTERM => "terminated".into(),
        other => format!("signal {other}"),
    }
}

/// One event of a process's life, in order: `Start`, output, `End`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start { pid: u32 },
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End(EndInfo),
}

/// Which input channel bytes are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Stdin,
    Pty,
}

/// Selects a process by pid or tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "process with pid {pid}"),
            Selector::Tag(tag) => write!(f, "process with tag {tag}"),
        }
    }
}

/// Errors of process operations.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0} not found")]
    NotFound(Selector),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("stdin not enabled or closed")]
    StdinClosed,
    #[error("process has no pty")]
    NotPty,
    #[error("pty input must use the pty field")]
    PtyInputOnPipe,
    #[error("tag '{0}' is reserved")]
    ReservedTag(String),
    #[error("write input to pid {pid}")]
    Input {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("signal pid {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("resize pty of pid {pid}")]
    Resize {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A running (or recently ended) process.
pub struct Process {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: RequestedConfig,
    shared: Mutex<Shared>,
    input: tokio::sync::Mutex<Option<spawn::Input>>,
    pty: bool,
    /// Dropped when the process ends, so its terminal closes at once.
    pty_master: Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

struct Shared {
    subscribers: Vec<mpsc::Sender<Event>>,
    end: Option<EndInfo>,
}

impl Process {
    /// A new subscriber: gets `Start`, then live output (no replay), then
    /// `End`. For an ended process, `Start` and `End` at once.
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let _ = tx.try_send(Event::Start { pid: self.pid });
        let mut shared = self.lock();
        match &shared.end {
            Some(end) => {
                let _ = tx.try_send(Event::End(end.clone()));
            }
            None => shared.subscribers.push(tx),
        }
        rx
    }

    /// Whether the process has ended.
    pub fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send `sig` to the process's group (it leads one), so a shell's children
    /// go with it.
    pub fn signal(&self, sig: i32) -> Result<(), ProcessError> {
        // SAFETY: plain syscalls on our own child's pid.
        let rc = unsafe { libc::kill(-(self.pid as i32), sig) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        if unsafe { libc::kill(self.pid as i32, sig) } == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ESRCH) {
            return Err(ProcessError::NotFound(Selector::Pid(self.pid)));
        }
        Err(ProcessError::Signal {
            pid: self.pid,
            source,
        })
    }

    /// The PTY master while the process runs.
    fn master(&self) -> Result<Arc<AsyncFd<OwnedFd>>, ProcessError> {
        if !self.pty {
            return Err(ProcessError::NotPty);
        }
        self.pty_master
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ProcessError::NotFound(Selector::Pid(self.pid)))
    }

    /// Write input bytes.
    pub async fn write_input(&self, kind: InputKind, data: &[u8]) -> Result<(), ProcessError> {
        match (kind, self.pty) {
            (InputKind::Pty, true) => {
                let master = self.master()?;
                spawn::write_pty(&master, data)
                    .await
                    .map_err(|source| ProcessError::Input {
                        pid: self.pid,
                        source,
                    })
            }
            (InputKind::Pty, false) => Err(ProcessError::NotPty),
            (InputKind::Stdin, true) => Err(ProcessError::PtyInputOnPipe),
            (InputKind::Stdin, false) => {
                let mut input = self.input.lock().await;
                let pipe = input.as_mut().ok_or(ProcessError::StdinClosed)?;
                tokio::io::AsyncWriteExt::write_all(pipe, data)
                    .await
                    .map_err(|source| ProcessError::Input {
                        pid: self.pid,
                        source,
                    })
            }
        }
    }

    /// Close stdin. Closing a closed stdin is fine; a PTY has none.
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        if self.pty {
            return Err(ProcessError::NotPty);
        }
        self.input.lock().await.take();
        Ok(())
    }

    /// Resize the terminal.
    pub fn resize(&self, size: PtySize) -> Result<(), ProcessError> {
        let master = self.master()?;
        spawn::set_winsize(&master, size).map_err(|source| ProcessError::Resize {
            pid: self.pid,
            source,
        })
    }
}

/// Every process envd started and has not forgotten.
pub struct ProcessTable {
    reaper: Reaper,
    inner: Mutex<Table>,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Table {
    running: HashMap<u32, Arc<Process>>,
    retained: Vec<(Instant, Arc<Process>)>,
    supervisors: tokio::task::JoinSet<()>,
}

impl ProcessTable {
    pub fn new(reaper: Reaper) -> Self {
        Self {
            reaper,
            inner: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a process. The returned receiver is its first subscriber, so no
    /// output is lost between start and subscription.
    pub async fn start(
        self: &Arc<Self>,
        spec: ProcessSpec,
    ) -> Result<(Arc<Process>, mpsc::Receiver<Event>), ProcessError> {
        if spec.tag.as_deref() == Some(RESERVED_TAG) {
            return Err(ProcessError::ReservedTag(RESERVED_TAG.into()));
        }
        // Spawn and register on a task of its own: if the caller goes away
        // (client reset, deadline) mid-spawn, the child still lands in the
        // table with a supervisor instead of running unknown to envd.
        let table = self.clone();
        tokio::spawn(async move { table.start_owned(spec).await })
            .await
            .map_err(|e| SpawnError::Io {
                step: "spawn task",
                source: std::io::Error::other(e.to_string()),
            })?
    }

    async fn start_owned(
        self: Arc<Self>,
        spec: ProcessSpec,
    ) -> Result<(Arc<Process>, mpsc::Receiver<Event>), ProcessError> {
        let reaper = self.reaper.clone();
        let spawn_spec = spec.clone();
        let spawned = tokio::task::spawn_blocking(move || spawn::spawn(&reaper, &spawn_spec))
            .await
            .map_err(|e| SpawnError::Io {
                step: "spawn task",
                source: std::io::Error::other(e),
            })??;
        let pid = spawned.pid;
        let kill_on_error = |e: SpawnError| {
            // SAFETY: signalling the group of the child we just started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            e
        };
        let io_err = |step| move |source| SpawnError::Io { step, source };
        let pty_master = match spawned.pty_master {
            // SAFETY: we own the master fd exclusively; nothing else closes it
            // while the AsyncFd holds it.
            Some(fd) => Some(Arc::new(unsafe { AsyncFd::register(fd) }.map_err(|e| {
                kill_on_error(io_err("watch pty")(std::io::Error::from(e)))
            })?)),
            None => None,
        };
        let stdin = spawned
            .stdin
            .map(tokio::net::unix::pipe::Sender::from_owned_fd)
            .transpose()
            .map_err(|e| kill_on_error(io_err("watch stdin")(e)))?;
        let process = Arc::new(Process {
            pid: spawned.pid,
            tag: spec.tag.clone(),
            config: spec.config.clone(),
            shared: Mutex::new(Shared {
                subscribers: Vec::new(),
                end: None,
            }),
            input: tokio::sync::Mutex::new(stdin),
            pty: pty_master.is_some(),
            pty_master: Mutex::new(pty_master.clone()),
        });
        let rx = process.subscribe();
        let outputs = output::start_pumps(&process, spawned.stdout, spawned.stderr, pty_master);
        let table = self.clone();
        let proc2 = process.clone();
        let exit = spawned.exit;
        let deadline = spec.deadline;
        let mut inner = self.lock();
        // Forget supervisors that finished, so the set stays as large as the
        // number of live processes.
        while inner.supervisors.try_join_next().is_some() {}
        inner.running.insert(process.pid, process.clone());
        inner.supervisors.spawn(async move {
            let status = supervise(&proc2, exit, outputs, deadline).await;
            // Nobody can write to an ended process: close its stdin now
            // rather than when the retained entry expires.
            proc2.input.lock().await.take();
            proc2
                .pty_master
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let end = EndInfo::from_status(status);
            output::publish_end(&proc2, end).await;
            table.retire(&proc2);
        });
        Ok((process, rx))
    }

    fn retire(&self, process: &Arc<Process>) {
        let mut inner = self.lock();
        inner.running.remove(&process.pid);
        let now = Instant::now();
        inner
            .retained
            .retain(|(at, _)| now.duration_since(*at) < RETAIN_FOR);
        inner.retained.push((now, process.clone()));
    }

    /// Find a running or retained process.
    pub fn find(&self, selector: &Selector) -> Result<Arc<Process>, ProcessError> {
        let inner = self.lock();
        let now = Instant::now();
        let retained = inner
            .retained
            .iter()
            .filter(|(at, _)| now.duration_since(*at) < RETAIN_FOR)
            .map(|(_, p)| p);
        let mut all = inner.running.values().chain(retained);
        let found = match selector {
            Selector::Pid(pid) => all.find(|p| p.pid == *pid),
            Selector::Tag(tag) => all.find(|p| p.tag.as_deref() == Some(tag.as_str())),
        };
        found
            .cloned()
            .ok_or_else(|| ProcessError::NotFound(selector.clone()))
    }

    /// Find a process that is still running.
    pub fn find_running(&self, selector: &Selector) -> Result<Arc<Process>, ProcessError> {
        let p = self.find(selector)?;
        if p.ended() {
            return Err(ProcessError::NotFound(selector.clone()));
        }
        Ok(p)
    }

    /// Running processes, oldest pid first.
    pub fn list(&self) -> Vec<Arc<Process>> {
        let inner = self.lock();
        let mut all: Vec<_> = inner.running.values().cloned().collect();
        all.sort_by_key(|p| p.pid);
        all
    }

    /// Kill every process and stop supervising.
    pub async fn shutdown(&self) {
        for p in self.list() {
            let _ = p.signal(libc::SIGKILL);
        }
        let mut set = std::mem::take(&mut self.lock().supervisors);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        set.shutdown().await;
    }
}

async fn supervise(
    process: &Process,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    outputs: output::Pumps,
    deadline: Option<Instant>,
) -> ExitStatus {
    tokio::pin!(exit);
    let status = match deadline {
        Some(at) => {
            tokio::select! {
                s = &mut exit => s,
                () = tokio::time::sleep_until(at.into()) => {
                    let _ = process.signal(libc::SIGKILL);
                    exit.await
                }
            }
        }
        None => exit.await,
    };
    // The reaper never drops a registered sender before it sends; a closed
    // channel means the reaper stopped, so report the process as killed.
    let status = status.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
    outputs.finish().await;
    status
}
