//! WebSocket plumbing shared by the exec stream, process stream and PTY
//! relays.
//!
//! An agent event stream is read by a pump task into a channel of
//! [`RELAY_BUFFER`] events; the socket side selects over that channel and
//! the client's frames. Reading the client continuously is what answers
//! its pings (the SDK closes a socket whose ping goes unanswered for 20 s)
//! and notices disconnects. A stalled client blocks the pump once the
//! buffer is full, which back-pressures the agent stream (never drops
//! process output).

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use connectrpc::client::ServerStream;
use connectrpc::ConnectError;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use wrenn_proto::wrenn::agent::v1 as pb;

/// Events buffered between an agent stream and a socket.
pub const RELAY_BUFFER: usize = 256;

pub type EventStream =
    ServerStream<hyper::body::Incoming, pb::__buffa::view::ProcessEventView<'static>>;

pub type Pumped = Result<pb::ProcessEvent, ConnectError>;

/// Read `stream` into a bounded channel on a task owned by `tasks`. The
/// task ends when the stream ends, fails (the error is the last item) or
/// the receiver is dropped.
pub fn pump(mut stream: EventStream, tasks: &TaskTracker) -> mpsc::Receiver<Pumped> {
    let (tx, rx) = mpsc::channel(RELAY_BUFFER);
    tasks.spawn(async move {
        loop {
            let next = tokio::select! {
                m = stream.message::<pb::ProcessEvent>() => m,
                () = tx.closed() => return,
            };
            match next {
                Ok(Some(m)) => {
                    if tx.send(Ok(m.to_owned_message())).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    rx
}

pub async fn send_json(ws: &mut WebSocket, v: serde_json::Value) -> bool {
    ws.send(Message::Text(Utf8Bytes::from(v.to_string())))
        .await
        .is_ok()
}

/// Decodes a byte stream as UTF-8 across chunk boundaries: a sequence cut
/// at the end of a chunk waits for the next one; invalid bytes become
/// U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        // cut short: keep the tail for the next chunk
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left when the stream ends.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// A WebSocket route reached without a usable upgrade request answers with
/// the JSON error, like every other refusal.
pub fn upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, crate::error::ApiError> {
    ws.map_err(|r| crate::error::ApiError::invalid(format!("a WebSocket upgrade is required: {r}")))
}

/// Which session a refusal ends, which decides its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// `exec/stream`: the client speaks first (`start`).
    Exec,
    /// `processes/{selector}/stream`: the client sends nothing.
    Attach,
    /// `pty`: the client speaks first; the error is `fatal`.
    Pty,
}

/// How long a refused session waits for the client's first frame, and then
/// for its close.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

/// Refuses a WebSocket session in band, as wrenn's server does once the key
/// is good: the upgrade is accepted, one `error` frame says why (capsule not
/// found or not running, its host unreachable), and the socket closes. The
/// SDK ends its iteration on that frame (`StreamErrorEvent`, a fatal
/// `PtyEvent`); refused before the upgrade, it would raise httpx_ws's
/// `WebSocketUpgradeError` instead of the events it documents.
pub fn refuse(ws: WebSocketUpgrade, err: crate::error::ApiError, kind: Session) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        if kind != Session::Attach {
            // Read the client's first frame first: closing with it unread
            // makes the kernel reset the connection, and a reset can reach
            // the client before the error frame is read.
            let _ = tokio::time::timeout(REFUSAL_WAIT, socket.recv()).await;
        }
        let mut frame = serde_json::json!({"type": "error", "data": err.message});
        if kind == Session::Pty {
            frame["fatal"] = true.into();
        }
        if send_json(&mut socket, frame).await && socket.send(Message::Close(None)).await.is_ok() {
            // the client's close (or whatever it still sends: the SDK's
            // terminal sends `kill` on the way out) ends the socket
            let _ = tokio::time::timeout(REFUSAL_WAIT, async {
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_survives() {
        let mut c = Utf8Carry::default();
        let s = "héllo €";
        let b = s.as_bytes();
        let mut out = String::new();
        for ch in b.chunks(1) {
            out.push_str(&c.push(ch));
        }
        out.push_str(&c.finish());
        assert_eq!(out, s);
        assert_eq!(c.push(b"a\xffb"), "a\u{FFFD}b");
    }
}
