//! Benchmark 4: keystroke-to-echo latency of a terminal. `cat` runs on a PTY
//! in the default cooked mode, so the terminal's line discipline echoes each
//! byte as it arrives (cat itself only prints whole lines). One byte is typed
//! at a time and timed until it comes back in the PTY output.
//!
//! Through envd: `pty_start` + `pty_input`, echo read from the PTY stream.
//! Baseline: the same on a PTY this process opens itself (`openpty`), with
//! blocking `write`/`read` on the master. Keystrokes are interleaved.
//!
//! Every [`LINE`] keystrokes a newline is typed (untimed) and its echo plus
//! cat's copy of the line are consumed, so the canonical-mode line buffer
//! (4095 bytes) never fills.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use envd_client::{EnvdClient, ExecEvent, ExecRequest, ExecStream, PtySize, Selector};
use serde_json::json;

use crate::report::{Check, Measure, Outcome, Row};
use crate::stats::Latency;

const CAT: &str = "/bin/cat";
/// Keystrokes between (untimed) newlines.
const LINE: usize = 100;
/// Bound on one keystroke's echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(client: &EnvdClient, keystrokes: usize, warmup: usize) -> Result<Outcome> {
    let mut local = LocalPty::open()?;
    let mut remote = RemotePty::open(client).await?;
    let measured = measure(&mut local, &mut remote, keystrokes, warmup).await;
    // Always end the remote cat, also when measuring failed.
    let closed = remote.close().await;
    let (local, remote) = measured?;
    closed?;

    let (local, remote) = (Latency::of(&local), Latency::of(&remote));
    Ok(Outcome {
        bench: "pty",
        params: json!({ "command": CAT, "keystrokes": keystrokes, "warmup": warmup, "newline_every": LINE }),
        rows: vec![
            Row {
                key: "envd",
                label: "envd PTY keystroke -> echo".into(),
                measure: Measure::Latency(remote),
            },
            Row {
                key: "local_pty",
                label: "local openpty keystroke -> echo".into(),
                measure: Measure::Latency(local),
            },
        ],
        checks: vec![
            Check {
                what: "p50 envd / p50 local PTY (info)".into(),
                ratio: remote.p50.as_secs_f64() / local.p50.as_secs_f64(),
                goal: None,
            },
            Check {
                what: "p99 envd / p99 local PTY (info)".into(),
                ratio: remote.p99.as_secs_f64() / local.p99.as_secs_f64(),
                goal: None,
            },
        ],
    })
}

async fn measure(
    local: &mut LocalPty,
    remote: &mut RemotePty<'_>,
    keystrokes: usize,
    warmup: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut local_samples = Vec::with_capacity(keystrokes);
    let mut remote_samples = Vec::with_capacity(keystrokes);
    let mut line = Vec::with_capacity(LINE);
    for i in 0..warmup + keystrokes {
        if line.len() == LINE {
            // cooked mode: the newline echoes as CRLF, then cat prints the line.
            let expect = [b"\r\n".as_slice(), &line, b"\r\n"].concat();
            local.type_and_wait(b"\n", &expect)?;
            remote.type_and_wait(b"\n", &expect).await?;
            line.clear();
        }
        let key = b'a' + (i % 26) as u8;
        line.push(key);
        let l = local.type_and_wait(&[key], &[key])?;
        let r = remote.type_and_wait(&[key], &[key]).await?;
        if i >= warmup {
            local_samples.push(l);
            remote_samples.push(r);
        }
    }
    Ok((local_samples, remote_samples))
}

/// `cat` on a terminal opened through envd.
struct RemotePty<'a> {
    client: &'a EnvdClient,
    stream: ExecStream,
    /// Output received but not yet matched.
    pending: Vec<u8>,
}

impl<'a> RemotePty<'a> {
    async fn open(client: &'a EnvdClient) -> Result<Self> {
        let mut req = ExecRequest::new(CAT, Vec::<String>::new());
        req.pty = Some(PtySize::default());
        let stream = tokio::time::timeout(ECHO_TIMEOUT, client.pty_start(req))
            .await
            .context("pty_start timed out")?
            .context("pty_start")?;
        Ok(RemotePty {
            client,
            stream,
            pending: Vec::new(),
        })
    }

    /// Types `input` and returns the time until the output ends with `expect`.
    async fn type_and_wait(&mut self, input: &[u8], expect: &[u8]) -> Result<Duration> {
        let pid = self.stream.pid;
        let start = Instant::now();
        let send = self.client.pty_input(Selector::Pid(pid), input);
        let echo = async {
            while !self.pending.ends_with(expect) {
                match self.stream.next().await {
                    Some(Ok(ExecEvent::Pty(bytes))) => self.pending.extend_from_slice(&bytes),
                    Some(Ok(ExecEvent::End { status, .. })) => bail!("cat ended: {status}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e).context("PTY stream"),
                    None => bail!("PTY stream closed"),
                }
            }
            Ok(start.elapsed())
        };
        let (sent, echoed) = tokio::time::timeout(ECHO_TIMEOUT, async { tokio::join!(send, echo) })
            .await
            .map_err(|_| {
                anyhow!(
                    "no echo of {input:?} within {ECHO_TIMEOUT:?}; pending output {:?}",
                    String::from_utf8_lossy(&self.pending)
                )
            })?;
        sent.context("pty_input")?;
        let elapsed = echoed?;
        self.pending.clear();
        Ok(elapsed)
    }

    async fn close(&self) -> Result<()> {
        self.client
            .kill(Selector::Pid(self.stream.pid))
            .await
            .context("kill the envd PTY")?;
        Ok(())
    }
}

/// `cat` on a terminal opened by this process; killed and reaped on drop.
struct LocalPty {
    child: Child,
    master: OwnedFd,
}

impl LocalPty {
    fn open() -> Result<Self> {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: valid out-pointers; a null name and termios are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("openpty");
        }
        // SAFETY: openpty returned two fresh descriptors that we now own.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [&master, &slave] {
            // SAFETY: fcntl on a descriptor we own; the child must not inherit it
            // (its stdio are dup2'd copies, which do not keep the flag).
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let mut cmd = Command::new(CAT);
        cmd.stdin(slave.try_clone().context("dup pty")?)
            .stdout(slave.try_clone().context("dup pty")?)
            .stderr(slave);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("start cat on a local PTY")?;
        // Dropping `cmd` closes our copies of the slave.
        drop(cmd);
        Ok(LocalPty { child, master })
    }

    /// Types `input` and returns the time until the output ends with `expect`.
    fn type_and_wait(&mut self, input: &[u8], expect: &[u8]) -> Result<Duration> {
        tokio::task::block_in_place(|| {
            let fd = self.master.as_raw_fd();
            let start = Instant::now();
            // SAFETY: writing from a valid slice to a descriptor we own.
            let n = unsafe { libc::write(fd, input.as_ptr().cast(), input.len()) };
            ensure!(
                n == input.len() as isize,
                "write to the local PTY: {}",
                std::io::Error::last_os_error()
            );
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(expect) {
                let left = ECHO_TIMEOUT.saturating_sub(start.elapsed());
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis() as libc::c_int) };
                if ready == 0 {
                    bail!(
                        "no local echo of {input:?} within {ECHO_TIMEOUT:?}; got {:?}",
                        String::from_utf8_lossy(&got)
                    );
                }
                if ready < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err).context("poll the local PTY");
                }
                // SAFETY: reading into a valid buffer from a descriptor we own.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                ensure!(
                    n > 0,
                    "read the local PTY: {}",
                    std::io::Error::last_os_error()
                );
                got.extend_from_slice(&buf[..n as usize]);
            }
            Ok(start.elapsed())
        })
    }
}

impl Drop for LocalPty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
