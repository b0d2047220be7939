//! Benchmark 1: the round trip of running `/bin/true` through envd
//! (`EnvdClient::exec`: Start stream, start event, end event) against a plain
//! fork+exec+wait of `/bin/true` in this process (`Command::status`, which std
//! implements with `posix_spawn`). Samples are interleaved so both see the same
//! machine noise. For diagnosis it also times a unary RPC that spawns nothing
//! (`process.List`): the transport's share of the round trip.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use envd_client::{EnvdClient, ExecRequest};
use serde_json::json;

use crate::report::{Check, Goal, Measure, Outcome, Row};
use crate::stats::Latency;

const TRUE: &str = "/bin/true";
/// Bound on one exec through envd.
const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(client: &EnvdClient, iterations: usize, warmup: usize) -> Result<Outcome> {
    for _ in 0..warmup {
        fork_once()?;
        envd_once(client).await?;
        rpc_once(client).await?;
    }
    let mut fork = Vec::with_capacity(iterations);
    let mut envd = Vec::with_capacity(iterations);
    let mut rpc = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        fork.push(fork_once()?);
        envd.push(envd_once(client).await?);
        rpc.push(rpc_once(client).await?);
    }
    let (fork, envd, rpc) = (Latency::of(&fork), Latency::of(&envd), Latency::of(&rpc));
    Ok(Outcome {
        bench: "exec",
        params: json!({ "command": TRUE, "iterations": iterations, "warmup": warmup }),
        rows: vec![
            Row {
                key: "envd",
                label: "envd exec /bin/true".into(),
                measure: Measure::Latency(envd),
            },
            Row {
                key: "fork",
                label: "local fork+exec+wait /bin/true".into(),
                measure: Measure::Latency(fork),
            },
            Row {
                key: "envd_rpc",
                label: "envd unary RPC, no spawn (info)".into(),
                measure: Measure::Latency(rpc),
            },
        ],
        checks: vec![Check {
            what: "p50 envd / p50 fork".into(),
            ratio: envd.p50.as_secs_f64() / fork.p50.as_secs_f64(),
            goal: Some(Goal::AtMost(3.0)),
        }],
    })
}

/// `Command::status` of `/bin/true`, blocking this worker thread (the other
/// workers keep the envd connection alive meanwhile).
fn fork_once() -> Result<Duration> {
    tokio::task::block_in_place(|| {
        let start = Instant::now();
        let status = Command::new(TRUE).status().context("run /bin/true")?;
        let elapsed = start.elapsed();
        ensure!(status.success(), "/bin/true failed: {status}");
        Ok(elapsed)
    })
}

/// `process.List`: a Connect unary round trip that starts nothing.
async fn rpc_once(client: &EnvdClient) -> Result<Duration> {
    let start = Instant::now();
    tokio::time::timeout(EXEC_TIMEOUT, client.list_processes())
        .await
        .context("process.List timed out")?
        .context("process.List")?;
    Ok(start.elapsed())
}

async fn envd_once(client: &EnvdClient) -> Result<Duration> {
    let start = Instant::now();
    let out = tokio::time::timeout(
        EXEC_TIMEOUT,
        client.exec(ExecRequest::new(TRUE, std::iter::empty::<String>())),
    )
    .await
    .context("exec through envd timed out")?
    .context("exec through envd")?;
    let elapsed = start.elapsed();
    ensure!(
        out.exit_code == 0,
        "/bin/true through envd exited {} ({})",
        out.exit_code,
        out.status
    );
    Ok(elapsed)
}
