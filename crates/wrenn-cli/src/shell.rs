//! `wrenn shell ID`: an interactive terminal in a capsule over the PTY
//! WebSocket. The local terminal is in raw mode while it runs (restored on
//! every way out), SIGWINCH resizes the remote one, and the detach keys
//! (ctrl-p ctrl-q, as docker's) leave it running: `--attach TAG` comes
//! back to it. Exits with the remote shell's exit code.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context, Result};
use clap::Args;
use rustix::termios::{self, OptionalActions, Termios};
use tokio::signal::unix::{signal, SignalKind};
use wrenn_sdk::PtyEvent;

use crate::config::Global;

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Capsule ID.
    id: String,
    /// Reattach to a detached terminal (its tag, printed on detach).
    #[arg(long)]
    attach: Option<String>,
    /// The program [default: the server's, /bin/bash].
    #[arg(long)]
    cmd: Option<String>,
    /// Keys that detach, comma-separated (`ctrl-X` or one character).
    #[arg(long, default_value = "ctrl-p,ctrl-q")]
    detach_keys: String,
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin).context("read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw).context("raw mode")?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// (cols, rows) of the local terminal; 80×24 when there is none.
fn size() -> (u16, u16) {
    match termios::tcgetwinsize(std::io::stdout()) {
        Ok(w) if w.ws_col > 0 && w.ws_row > 0 => (w.ws_col, w.ws_row),
        _ => (80, 24),
    }
}

/// `ctrl-p,ctrl-q` → `[0x10, 0x11]`.
fn parse_keys(s: &str) -> Result<Vec<u8>> {
    s.split(',')
        .map(|k| {
            let k = k.trim();
            if let Some(c) = k.strip_prefix("ctrl-") {
                match c.as_bytes() {
                    [b] if b.is_ascii_alphabetic() => Ok(b.to_ascii_lowercase() - b'a' + 1),
                    b"@" => Ok(0),
                    b"[" => Ok(0x1b),
                    _ => bail!("unknown detach key {k:?}"),
                }
            } else if k.len() == 1 {
                Ok(k.as_bytes()[0])
            } else {
                bail!("unknown detach key {k:?}")
            }
        })
        .collect()
}

/// Finds the detach sequence in typed input; bytes that turn out not to be
/// part of it are passed on late but in order.
struct Detach {
    keys: Vec<u8>,
    matched: usize,
}

impl Detach {
    /// (bytes to send, whether the sequence is complete).
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.keys.is_empty() {
                out.push(b);
            } else if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    self.matched = 0;
                    return (out, true);
                }
            } else {
                out.extend_from_slice(&self.keys[..self.matched]);
                self.matched = 0;
                if b == self.keys[0] {
                    self.matched = 1;
                } else {
                    out.push(b);
                }
            }
        }
        (out, false)
    }
}

pub async fn run(g: &Global, a: ShellArgs) -> Result<i32> {
    let mut detach = Detach {
        keys: parse_keys(&a.detach_keys)?,
        matched: 0,
    };
    let (cols, rows) = size();
    let client = g.client()?;
    let mut pty = client
        .pty(&a.id, a.cmd.as_deref(), cols, rows, a.attach.as_deref())
        .await?;
    if a.attach.is_some() {
        // the size may have changed; a resize also makes most programs redraw
        pty.resize(cols, rows).await?;
    }
    let raw = RawMode::enter()?;
    let (tx, mut input) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = signal(SignalKind::window_change())?;
    let mut stdout = std::io::stdout();
    let code = loop {
        tokio::select! {
            Some(typed) = input.recv() => {
                let (send, detached) = detach.feed(&typed);
                if !send.is_empty() {
                    pty.send(&send).await?;
                }
                if detached {
                    let tag = pty.tag().to_owned();
                    pty.detach().await;
                    drop(raw);
                    eprintln!("\r\nwrenn: detached from {tag}; `wrenn shell {} --attach {tag}` comes back", a.id);
                    return Ok(0);
                }
            }
            _ = winch.recv() => {
                let (c, r) = size();
                pty.resize(c, r).await?;
            }
            ev = pty.next() => match ev {
                Some(Ok(PtyEvent::Output(b))) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Ok(PtyEvent::Exit { code })) => break code,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the server closed the terminal"),
            }
        }
    };
    drop(raw);
    Ok(code.clamp(0, 255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys() {
        assert_eq!(parse_keys("ctrl-p,ctrl-q").unwrap(), vec![0x10, 0x11]);
        assert_eq!(parse_keys("x").unwrap(), vec![b'x']);
        assert!(parse_keys("ctrl-").is_err());
        let mut d = Detach {
            keys: vec![0x10, 0x11],
            matched: 0,
        };
        assert_eq!(d.feed(b"ab"), (b"ab".to_vec(), false));
        // split across reads, and a false start passed on
        assert_eq!(d.feed(&[0x10]), (vec![], false));
        assert_eq!(d.feed(b"z"), (vec![0x10, b'z'], false));
        assert_eq!(d.feed(&[b'c', 0x10]), (vec![b'c'], false));
        assert_eq!(d.feed(&[0x11, b'd']), (vec![], true));
    }
}
