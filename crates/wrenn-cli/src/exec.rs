//! `wrenn exec ID -- CMD ARGS…`: runs `CMD` (no shell: `-- sh -c '…'` for
//! one) over the `exec/stream` WebSocket, copies its stdout and stderr as
//! they come, and exits with its exit code (255 when it had none: killed by
//! a signal, which the API does not name).

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::{bail, Result};
use clap::Args;
use wrenn_sdk::{Command, ExecEvent};

use crate::config::Global;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Capsule ID.
    id: String,
    /// An environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_parser = crate::capsules::pair)]
    envs: Vec<(String, String)>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn run(g: &Global, a: ExecArgs) -> Result<i32> {
    let mut words = a.command.into_iter();
    let Some(cmd) = words.next() else {
        bail!("no command: wrenn exec ID -- CMD [ARGS…]")
    };
    let c = Command {
        cmd,
        args: words.collect(),
        envs: a.envs.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: a.cwd,
    };
    let mut s = g.client()?.exec_stream(&a.id, &c).await?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = s.next().await {
        match ev? {
            ExecEvent::Stdout(t) => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
            }
            ExecEvent::Stderr(t) => {
                err.write_all(t.as_bytes())?;
                err.flush()?;
            }
            ExecEvent::Exit { code } if code < 0 => {
                eprintln!("wrenn: the command was killed by a signal");
                return Ok(255);
            }
            ExecEvent::Exit { code } => return Ok(code.min(255)),
            ExecEvent::Started { .. } => {}
        }
    }
    bail!("the stream ended before the command did")
}
