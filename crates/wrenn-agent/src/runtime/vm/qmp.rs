//! A QEMU Machine Protocol client: JSON lines over the VMM's unix socket.
//! Synchronous, like the rest of the runtime layer; every read has a
//! timeout so a wedged VMM cannot hang the agent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One QMP connection, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp {0}")]
    Io(#[from] std::io::Error),
    #[error("qmp: {0}")]
    Protocol(String),
    #[error("qmp {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

const IO_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connect and negotiate capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("the VMM closed the socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Run `command` and return its `return` value (events in between are
    /// skipped).
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {v}")));
        }
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`…).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Poll `query-migrate` until the migration settles; `Ok` when it
    /// completed, an error with QEMU's reason when it failed.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None)?;
            match r["status"].as_str().unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(QmpError::Protocol(format!(
                        "migration {}: {}",
                        r["status"].as_str().unwrap_or("?"),
                        r["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() >= deadline => {
                    return Err(QmpError::Protocol(format!(
                        "migration did not finish within {timeout:?}"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Wait until an incoming migration has loaded (the VM is then paused).
    pub fn wait_incoming(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status()?.as_str() {
                "inmigrate" | "prelaunch" if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                "inmigrate" | "prelaunch" => {
                    return Err(QmpError::Protocol(format!(
                        "restore did not finish within {timeout:?}"
                    )))
                }
                "paused" | "postmigrate" | "running" => return Ok(()),
                other => return Err(QmpError::Protocol(format!("restore left the VM {other}"))),
            }
        }
    }
}
