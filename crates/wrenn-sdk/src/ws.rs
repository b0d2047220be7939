//! The two WebSocket conversations: a process's output (`exec/stream`,
//! `processes/{selector}/stream`: JSON text frames) and a terminal (`pty`:
//! binary frames are bytes, text frames are JSON control messages).

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Error, Result};

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One event of a process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started { pid: u32 },
    Stdout(String),
    Stderr(String),
    Exit { code: i32 },
}

/// A process's output as it comes; ends after [`ExecEvent::Exit`].
#[derive(Debug)]
pub struct ExecStream {
    socket: Socket,
    done: bool,
}

impl ExecStream {
    pub(crate) fn new(socket: Socket) -> Self {
        ExecStream {
            socket,
            done: false,
        }
    }

    /// The next event; `None` once the process exited or the server closed
    /// the stream. An `error` frame from the server is an [`Error::Protocol`].
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        while !self.done {
            let msg = match self.socket.next().await {
                None | Some(Ok(Message::Close(_))) => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
            };
            let v: Value = match serde_json::from_str(&msg) {
                Ok(v) => v,
                Err(e) => return Some(Err(Error::Protocol(e.to_string()))),
            };
            let data = || v["data"].as_str().unwrap_or_default().to_owned();
            let ev = match v["type"].as_str().unwrap_or_default() {
                "start" => ExecEvent::Started {
                    pid: v["pid"].as_u64().unwrap_or(0) as u32,
                },
                "stdout" => ExecEvent::Stdout(data()),
                "stderr" => ExecEvent::Stderr(data()),
                "exit" => {
                    self.done = true;
                    ExecEvent::Exit {
                        code: v["exit_code"].as_i64().unwrap_or(-1) as i32,
                    }
                }
                "error" => {
                    self.done = true;
                    return Some(Err(Error::Stream(data())));
                }
                _ => continue,
            };
            return Some(Ok(ev));
        }
        None
    }

    /// Stop following (the process goes on).
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// What a terminal sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    Output(Vec<u8>),
    Exit { code: i32 },
}

/// A terminal in a capsule. It lives on in the capsule when this is
/// dropped: reattach with its [`tag`](PtySession::tag).
#[derive(Debug)]
pub struct PtySession {
    socket: Socket,
    tag: String,
    pid: u32,
}

impl PtySession {
    pub(crate) async fn open(mut socket: Socket, tag: Option<String>) -> Result<PtySession> {
        // A new session says `started`; a reattach may not (wrenn 0.1.5
        // sends nothing), so output can come first.
        if let Some(tag) = tag {
            return Ok(PtySession {
                socket,
                tag,
                pid: 0,
            });
        }
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value =
                        serde_json::from_str(&t).map_err(|e| Error::Protocol(e.to_string()))?;
                    match v["type"].as_str() {
                        Some("started") => {
                            return Ok(PtySession {
                                socket,
                                tag: v["tag"].as_str().unwrap_or_default().to_owned(),
                                pid: v["pid"].as_u64().unwrap_or(0) as u32,
                            })
                        }
                        Some("error") => {
                            return Err(Error::Stream(
                                v["data"].as_str().unwrap_or("pty refused").to_owned(),
                            ))
                        }
                        _ => continue,
                    }
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Protocol("the server closed the terminal".into())),
            }
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub async fn send(&mut self, input: &[u8]) -> Result<()> {
        self.socket.send(Message::binary(input.to_vec())).await?;
        Ok(())
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let m = json!({"type": "resize", "cols": cols, "rows": rows});
        self.socket.send(Message::text(m.to_string())).await?;
        Ok(())
    }

    /// Kill the terminal's process.
    pub async fn kill(&mut self) -> Result<()> {
        let m = json!({"type": "kill"});
        self.socket.send(Message::text(m.to_string())).await?;
        Ok(())
    }

    /// The next output or the exit; `None` when the connection ends.
    /// Keepalive pings are answered here.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Binary(b)) => return Some(Ok(PtyEvent::Output(b.to_vec()))),
                Ok(Message::Text(t)) => {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    match v["type"].as_str() {
                        Some("exit") => {
                            return Some(Ok(PtyEvent::Exit {
                                code: v["exit_code"].as_i64().unwrap_or(-1) as i32,
                            }))
                        }
                        Some("ping") => {
                            let pong = json!({"type": "pong"}).to_string();
                            if let Err(e) = self.socket.send(Message::text(pong)).await {
                                return Some(Err(e.into()));
                            }
                        }
                        Some("error") if v["fatal"].as_bool().unwrap_or(true) => {
                            return Some(Err(Error::Stream(
                                v["data"].as_str().unwrap_or("terminal error").to_owned(),
                            )))
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    /// Leave the terminal running and close this connection.
    pub async fn detach(mut self) {
        let _ = self.socket.close(None).await;
    }
}
