//! The one place that calls `waitpid`.
//!
//! As PID 1 envd must reap every zombie, including orphans it never started;
//! in `--dev` it reaps its own children. A single reaper does both, so no
//! other code may wait on a child: spawners register the pid and get its exit
//! status through a oneshot channel.
//!
//! Protocol: spawning and reaping exclude each other through `spawn_lock`.
//! `std::process::Command::spawn` itself waits on a child whose `exec`
//! failed; holding the lock across `spawn` + `register` keeps the reaper from
//! stealing that status, and guarantees that every pid the reaper sees is
//! either registered or an orphan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<u32, oneshot::Sender<ExitStatus>>,
}

/// Handle to the reaper task.
#[derive(Clone)]
pub struct Reaper {
    spawn_lock: Arc<Mutex<Waiters>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

/// Held while spawning; registers the new child before releasing the lock.
pub struct SpawnGuard<'a> {
    waiters: MutexGuard<'a, Waiters>,
}

impl SpawnGuard<'_> {
    /// Ask for `pid`'s exit status.
    pub fn register(&mut self, pid: u32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.waiters.by_pid.insert(pid, tx);
        rx
    }
}

impl Reaper {
    /// Start reaping on SIGCHLD. Must run inside a tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let spawn_lock = Arc::new(Mutex::new(Waiters::default()));
        let lock = spawn_lock.clone();
        let task = tokio::spawn(async move {
            loop {
                reap_all(&lock);
                // A periodic pass as well: signals coalesce, and a child may
                // exit between a pass and the next `recv`.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), sigchld.recv()).await;
            }
        });
        Ok(Self {
            spawn_lock,
            task: Arc::new(task),
        })
    }

    /// Lock out the reaper for the duration of a spawn.
    pub fn lock_for_spawn(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            waiters: self.spawn_lock.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Stop the reaper task.
    pub fn stop(&self) {
        self.task.abort();
    }
}

fn reap_all(lock: &Mutex<Waiters>) {
    let mut waiters = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let exit = if libc::WIFEXITED(status) {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            continue;
        };
        match waiters.by_pid.remove(&(pid as u32)) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => tracing::debug!(pid, ?exit, "reaped orphan"),
        }
    }
}
