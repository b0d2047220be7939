//! Benchmarks of envd, each against a baseline measured in the same run, so
//! that a noisy machine shows up in both numbers and the ratio stays
//! meaningful:
//!
//! 1. `exec`: `/bin/true` through envd vs fork+exec+wait here (p50/p99);
//! 2. `stream`: `cat` of a large file through envd vs `cat FILE > /dev/null`;
//! 3. `files`: upload and download through `/files` vs loopback TCP;
//! 4. `pty`: keystroke→echo through an envd PTY vs a local `openpty`.
//!
//! [`run`] starts one `envd --dev` child and a temporary directory, runs the
//! selected benchmarks, and removes both on every exit path (drop guards).

mod data;
mod envd;
mod exec;
mod files;
mod pty;
mod report;
mod stats;
mod stream;

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use envd_client::EnvdClient;

pub use report::{table, Check, Goal, Outcome};

/// One benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    Exec,
    Stream,
    Files,
    Pty,
}

impl Bench {
    pub const ALL: [Bench; 4] = [Bench::Exec, Bench::Stream, Bench::Files, Bench::Pty];
}

impl fmt::Display for Bench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bench::Exec => "exec",
            Bench::Stream => "stream",
            Bench::Files => "files",
            Bench::Pty => "pty",
        })
    }
}

/// Sizes and iteration counts.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Measured execs of each kind (exec).
    pub execs: usize,
    /// Bytes of the file cat streams (stream).
    pub stream_bytes: u64,
    /// Bytes uploaded and downloaded (files).
    pub files_bytes: u64,
    /// Measured keystrokes on each PTY (pty).
    pub keystrokes: usize,
    /// Runs of each throughput measurement; medians are reported.
    pub reps: usize,
    /// Unmeasured iterations before the latency samples.
    pub warmup: usize,
}

impl Sizes {
    /// The full run: a few minutes on a small machine.
    pub fn full() -> Self {
        Sizes {
            execs: 1000,
            stream_bytes: 1 << 30,
            files_bytes: 1 << 30,
            keystrokes: 500,
            reps: 5,
            warmup: 20,
        }
    }

    /// A few seconds in all, for CI: keeps the benchmarks from rotting.
    pub fn smoke() -> Self {
        Sizes {
            execs: 20,
            stream_bytes: 16 << 20,
            files_bytes: 16 << 20,
            keystrokes: 20,
            reps: 1,
            warmup: 2,
        }
    }
}

/// What to run, and where.
#[derive(Debug, Clone)]
pub struct Config {
    pub benches: Vec<Bench>,
    pub sizes: Sizes,
    /// Marks the JSON lines; `sizes` already reflect it.
    pub smoke: bool,
    /// The `envd` binary to start.
    pub envd_bin: PathBuf,
    /// Where the temporary directory (data files, envd's log) goes.
    pub tmp_parent: PathBuf,
}

/// Runs the selected benchmarks, calling `on_result` after each one.
pub async fn run(config: &Config, mut on_result: impl FnMut(&Outcome)) -> Result<Vec<Outcome>> {
    // Declared before `envd` so it is removed after envd is killed.
    let tmp = tempfile::Builder::new()
        .prefix("wrenn-bench-")
        .tempdir_in(&config.tmp_parent)
        .with_context(|| format!("create a temp dir in {}", config.tmp_parent.display()))?;
    let envd = envd::Envd::start(&config.envd_bin, tmp.path())?;
    let client = EnvdClient::new(envd.url())?;
    client
        .wait_healthy(Duration::from_secs(10))
        .await
        .context("envd did not become healthy")?;
    progress(format_args!(
        "envd pid {} at {}; temp dir {}",
        envd.pid(),
        envd.url(),
        tmp.path().display()
    ));

    let sizes = &config.sizes;
    let mut outcomes = Vec::new();
    for &bench in &config.benches {
        let outcome = match bench {
            Bench::Exec => {
                progress(format_args!("exec: {} execs of each kind", sizes.execs));
                exec::run(&client, sizes.execs, sizes.warmup).await
            }
            Bench::Stream => {
                let file = tmp.path().join("stream.bin");
                progress(format_args!(
                    "stream: writing a {} MiB file",
                    sizes.stream_bytes >> 20
                ));
                let written =
                    tokio::task::block_in_place(|| data::write_file(&file, sizes.stream_bytes));
                progress(format_args!("stream: {} rep(s) of each kind", sizes.reps));
                let result = match written {
                    Ok(()) => stream::run(&client, &file, sizes.stream_bytes, sizes.reps).await,
                    Err(e) => Err(e),
                };
                let _ = std::fs::remove_file(&file);
                result
            }
            Bench::Files => {
                progress(format_args!(
                    "files: {} rep(s) of {} MiB up, down, over loopback and to disk",
                    sizes.reps,
                    sizes.files_bytes >> 20
                ));
                files::run(&client, tmp.path(), sizes.files_bytes, sizes.reps).await
            }
            Bench::Pty => {
                progress(format_args!(
                    "pty: {} keystrokes on each PTY",
                    sizes.keystrokes
                ));
                pty::run(&client, sizes.keystrokes, sizes.warmup).await
            }
        };
        let outcome = outcome
            .with_context(|| format!("{bench} benchmark; envd log tail:\n{}", envd.log_tail()))?;
        on_result(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Bound on moving `bytes` through envd: generous (10 MB/s) so a slow
/// machine is measured rather than failed, but a stuck transfer ends.
fn transfer_timeout(bytes: u64) -> Duration {
    Duration::from_secs(30 + bytes / 10_000_000)
}

fn progress(args: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "[wrenn-bench] {args}");
}
