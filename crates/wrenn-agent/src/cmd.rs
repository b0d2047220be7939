//! Running the host tools the agent drives (`ip`, `nft`, `tc`, the OCI
//! runtime). Synchronous on purpose: callers are already off the async
//! runtime (`spawn_blocking`), as kernel-facing code should be.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

/// A tool that could not be run or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("{program} is not installed")]
    Missing { program: String },
    #[error("run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Run `program args…`, feeding `stdin`; returns stdout on success.
pub fn run<I, S>(program: &str, args: I, stdin: Option<&[u8]>) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CmdError::Missing {
            program: program.to_owned(),
        },
        _ => CmdError::Spawn {
            program: program.to_owned(),
            source,
        },
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes its stdin; its status says why.
        let _ = pipe.write_all(data);
    }
    let out = child.wait_with_output().map_err(|source| CmdError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            program: program.to_owned(),
            args: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` (a name looked up on `PATH`, or a path) exists.
pub fn on_path(program: &str) -> bool {
    let p = std::path::Path::new(program);
    if p.components().count() > 1 {
        return p.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}
