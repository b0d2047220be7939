//! The envd under test: a child process on an ephemeral loopback port,
//! killed and reaped on drop (also when a benchmark fails or panics).

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

/// Bound on envd printing its listening address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `envd --dev`.
pub struct Envd {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Envd {
    /// Starts `bin` with its working directory and log file (`envd.log`) in
    /// `dir`, and waits for its `envd listening on <addr>` line.
    pub fn start(bin: &Path, dir: &Path) -> Result<Self> {
        let log = dir.join("envd.log");
        let stderr = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(bin)
            .args(["--dev", "--port", "0", "--addr", "127.0.0.1"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        // Own the child before anything can fail, so a failed start still kills it.
        let mut envd = Envd {
            child,
            url: String::new(),
            log,
        };
        let stdout = envd
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("envd stdout is not piped"))?;
        let (first_line, ready) = mpsc::channel();
        // Reads envd's stdout until EOF (envd exiting), so envd never blocks
        // on a full pipe; not joined because it ends with envd.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            if let Some(line) = lines.next() {
                let _ = first_line.send(line);
            }
            lines.for_each(drop);
        });
        let line = ready.recv_timeout(STARTUP_TIMEOUT).map_err(|err| {
            anyhow!(
                "envd did not announce its address ({err}); exit status {:?}; log:\n{}",
                envd.child.try_wait().ok().flatten(),
                envd.log_tail()
            )
        })?;
        let addr = line
            .strip_prefix("envd listening on ")
            .map(str::trim)
            .ok_or_else(|| anyhow!("unexpected first line from envd: {line:?}"))?;
        envd.url = format!("http://{addr}");
        Ok(envd)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines envd logged, for error reports.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
