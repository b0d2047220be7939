//! Output pumps: one task per output fd reads chunks and fans them out to the
//! process's subscribers under the slow-reader policy in the module above.
//!
//! Once the process has exited, a pump drains what is already buffered in its
//! pipe or terminal and stops, even if a background grandchild still holds the
//! write end: output after the exit belongs to nobody.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{spawn, EndInfo, Event, Process, PIPE_CHUNK, PTY_CHUNK, SLOW_READER_GRACE};

/// The pumps of one process.
pub struct Pumps {
    exited: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Pumps {
    /// Tell the pumps the process exited and wait until they drained.
    pub async fn finish(self) {
        let _ = self.exited.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Start a pump for each output of `process`.
pub fn start_pumps(
    process: &Arc<Process>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
) -> Pumps {
    let (exited, _) = watch::channel(false);
    let mut tasks = Vec::new();
    for (fd, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
        let Some(fd) = fd else { continue };
        match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
            Ok(rx) => tasks.push(tokio::spawn(pump_pipe(
                process.clone(),
                rx,
                stream,
                exited.subscribe(),
            ))),
            Err(err) => tracing::error!(pid = process.pid, %err, "cannot read process output"),
        }
    }
    if let Some(master) = pty {
        tasks.push(tokio::spawn(pump_pty(
            process.clone(),
            master,
            exited.subscribe(),
        )));
    }
    Pumps { exited, tasks }
}

async fn pump_pipe(
    process: Arc<Process>,
    mut rx: tokio::net::unix::pipe::Receiver,
    stream: Stream,
    mut exited: watch::Receiver<bool>,
) {
    let event = |b: Bytes| match stream {
        Stream::Stdout => Event::Stdout(b),
        Stream::Stderr => Event::Stderr(b),
    };
    loop {
        let mut buf = BytesMut::with_capacity(PIPE_CHUNK);
        tokio::select! {
            biased;
            _ = exited.changed() => {
                // Read the fd directly: tokio's `try_read` answers WouldBlock
                // until the reactor has seen readiness, which a process that
                // wrote and exited at once may not have produced yet.
                let mut chunk = vec![0u8; PIPE_CHUNK];
                while let Ok(n) = read_now(rx.as_raw_fd(), &mut chunk) {
                    if n == 0 {
                        break;
                    }
                    fan_out(&process, event(Bytes::copy_from_slice(&chunk[..n]))).await;
                }
                return;
            }
            read = rx.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => fan_out(&process, event(buf.freeze())).await,
            }
        }
    }
}

async fn pump_pty(
    process: Arc<Process>,
    master: Arc<AsyncFd<OwnedFd>>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; PTY_CHUNK];
    loop {
        tokio::select! {
            biased;
            _ = exited.changed() => {
                while let Ok(n) = spawn::read_pty(master.get_ref(), &mut buf) {
                    if n == 0 {
                        break;
                    }
                    fan_out(&process, Event::Pty(Bytes::copy_from_slice(&buf[..n]))).await;
                }
                return;
            }
            ready = master.readable() => {
                let Ok(mut guard) = ready else { return };
                match guard.try_io(|fd| spawn::read_pty(fd.get_ref(), &mut buf)) {
                    Ok(Ok(0)) => return,
                    Ok(Ok(n)) => {
                        fan_out(&process, Event::Pty(Bytes::copy_from_slice(&buf[..n]))).await;
                    }
                    Ok(Err(_)) => return,
                    Err(_would_block) => {}
                }
            }
        }
    }
}

/// One non-blocking `read` of what the pipe holds now (`WouldBlock` when empty).
fn read_now(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: reading into a valid buffer from a descriptor the caller owns.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Deliver `event` to every subscriber, dropping those that are gone or that
/// stalled past the grace period.
async fn fan_out(process: &Process, event: Event) {
    let subscribers: Vec<mpsc::Sender<Event>> = process.lock().subscribers.clone();
    let dropped = deliver(&subscribers, event).await;
    if !dropped.is_empty() {
        process
            .lock()
            .subscribers
            .retain(|s| !dropped.iter().any(|d| d.same_channel(s)));
    }
}

async fn deliver(subscribers: &[mpsc::Sender<Event>], event: Event) -> Vec<mpsc::Sender<Event>> {
    let mut dropped = Vec::new();
    for s in subscribers {
        if s.send_timeout(event.clone(), SLOW_READER_GRACE)
            .await
            .is_err()
        {
            dropped.push(s.clone());
        }
    }
    dropped
}

/// Record the end and send it to every subscriber; later subscribers get it
/// from [`Process::subscribe`].
pub async fn publish_end(process: &Process, end: EndInfo) {
    let subscribers = {
        let mut shared = process.lock();
        shared.end = Some(end.clone());
        std::mem::take(&mut shared.subscribers)
    };
    deliver(&subscribers, Event::End(end)).await;
}
