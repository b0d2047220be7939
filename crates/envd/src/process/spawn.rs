//! Turning a [`ProcessSpec`] into a child: pipes or a PTY, a new process
//! group (or session, for a PTY), the user switch, and registration with the
//! reaper. Runs on a blocking thread (`fork` and friends).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::{ProcessSpec, PtySize};
use crate::reaper::{ExitStatus, Reaper};

/// Why a process could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cwd '{}' does not exist", .0.display())]
    Cwd(PathBuf),
    #[error("cannot run as user '{user}': envd is not root")]
    NotRoot { user: String },
    #[error("start {cmd}: {source}")]
    Exec {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Io { step, source }
}

/// The writable end of a process's stdin.
pub type Input = tokio::net::unix::pipe::Sender;

/// A child that has started, with the parent's ends of its I/O.
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// The nice value children start at: envd's own before it was raised
/// ([`wrenn_types::envd::ENVD_PRIORITY_BOOST`]).
static WORKLOAD_NICE: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// Children from now on start at nice `nice`.
pub fn set_workload_nice(nice: i32) {
    let _ = WORKLOAD_NICE.set(nice);
}

/// Start `spec`'s process.
pub fn spawn(reaper: &Reaper, spec: &ProcessSpec) -> Result<Spawned, SpawnError> {
    if !spec.cwd.is_dir() {
        return Err(SpawnError::Cwd(spec.cwd.clone()));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let switch_user = euid == 0;
    if euid != 0 && spec.user.uid != euid {
        return Err(SpawnError::NotRoot {
            user: spec.user.name.clone(),
        });
    }

    let mut cmd = Command::new(&spec.cmd);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd);

    let mut spawned_io = (None, None, None, None);
    if let Some(size) = spec.pty {
        let (master, slave) = openpty(size)?;
        cmd.stdin(Stdio::from(slave.try_clone().map_err(io("dup pty"))?))
            .stdout(Stdio::from(slave.try_clone().map_err(io("dup pty"))?))
            .stderr(Stdio::from(slave));
        spawned_io.3 = Some(master);
    } else {
        if spec.stdin {
            let (r, w) = pipe()?;
            cmd.stdin(Stdio::from(r));
            spawned_io.0 = Some(w);
        } else {
            cmd.stdin(Stdio::null());
        }
        let (r, w) = output_pipe()?;
        cmd.stdout(Stdio::from(w));
        spawned_io.1 = Some(r);
        let (r, w) = output_pipe()?;
        cmd.stderr(Stdio::from(w));
        spawned_io.2 = Some(r);
    }

    let pty = spec.pty.is_some();
    let workload_nice = WORKLOAD_NICE.get().copied();
    let (uid, gid) = (spec.user.uid, spec.user.gid);
    let groups: Vec<libc::gid_t> = spec.user.groups.clone();
    // SAFETY: the closure runs between fork and exec and only makes raw
    // syscalls on memory allocated before the fork (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if pty {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Workloads die before envd when memory runs out (best effort).
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"100".as_ptr().cast(), 3);
                libc::close(fd);
            }
            if let Some(nice) = workload_nice {
                // Back below envd (raising a nice value needs no privilege;
                // failing only costs envd its lead).
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let mut guard = reaper.lock_for_spawn();
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        cmd: spec.cmd.clone(),
        source,
    })?;
    let pid = child.id();
    let exit = guard.register(pid);
    drop(guard);
    // Dropping `cmd` closes the parent's copies of the child's ends, so pipes
    // reach EOF when the child (and whatever inherited them) is gone.
    drop(cmd);
    drop(child);
    let (stdin, stdout, stderr, pty_master) = spawned_io;
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        pty_master,
        exit,
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io("pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pipe for a process's output, enlarged so a chatty process is woken (and
/// envd reads) less often. The kernel caps the size for non-root; best effort.
fn output_pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    const OUTPUT_PIPE_BYTES: libc::c_int = 1 << 20;
    let (r, w) = pipe()?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, OUTPUT_PIPE_BYTES) };
    Ok((r, w))
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn openpty(size: PtySize) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (mut master, mut slave) = (0, 0);
    let ws = winsize(size);
    // SAFETY: valid out-pointers; null name and termios are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc < 0 {
        return Err(io("openpty")(std::io::Error::last_os_error()));
    }
    // SAFETY: openpty returned two fresh descriptors we now own.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: as above.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((master, slave))
}

/// Set a PTY's window size (the kernel then sends SIGWINCH to its group).
pub fn set_winsize(master: &AsyncFd<OwnedFd>, size: PtySize) -> std::io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write all of `data` to a PTY master.
pub async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| {
            // SAFETY: writing from a valid slice to a descriptor we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Read once from a PTY master into `buf`. `Ok(0)` means the terminal closed
/// (Linux reports that as EIO once the last slave fd is gone).
pub fn read_pty(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: reading into a valid buffer from a descriptor we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EIO) {
        return Ok(0);
    }
    Err(err)
}
