//! Benchmark 2: `cat` of a large file through envd (`exec_stream`, counting
//! stdout bytes) against `cat FILE > /dev/null` run here. For diagnosis it also
//! times `cat FILE` into a pipe read by this process, which is what envd does
//! on its side minus the RPC. Runs are interleaved; each figure is the median
//! over `reps` runs and the ratio is the median of the per-run ratios.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use envd_client::{EnvdClient, ExecEvent, ExecRequest};
use serde_json::json;

use crate::report::{Check, Goal, Measure, Outcome, Row};
use crate::stats::{mb_per_s, median};

const CAT: &str = "/bin/cat";

pub async fn run(client: &EnvdClient, file: &Path, size: u64, reps: usize) -> Result<Outcome> {
    let path = file
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", file.display()))?;
    // Warm the page cache and both paths once, unmeasured.
    local_devnull(file)?;
    envd_cat(client, path, size).await?;

    let (mut devnull, mut pipe, mut envd, mut ratios) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let base = mb_per_s(size, local_devnull(file)?);
        let piped = mb_per_s(size, local_pipe(file, size)?);
        let through = mb_per_s(size, envd_cat(client, path, size).await?);
        devnull.push(base);
        pipe.push(piped);
        envd.push(through);
        ratios.push(through / base);
    }
    let row = |key, label: &str, rates: &[f64]| Row {
        key,
        label: label.into(),
        measure: Measure::Throughput {
            bytes: size,
            runs: rates.to_vec(),
        },
    };
    let pipe_ratios: Vec<f64> = envd.iter().zip(&pipe).map(|(e, p)| e / p).collect();
    Ok(Outcome {
        bench: "stream",
        params: json!({ "bytes": size, "reps": reps }),
        rows: vec![
            row("envd", "envd exec_stream cat FILE", &envd),
            row("cat_devnull", "local cat FILE > /dev/null", &devnull),
            row("cat_pipe", "local cat FILE | read (info)", &pipe),
        ],
        checks: vec![
            Check {
                what: "MB/s envd / cat>/dev/null".into(),
                ratio: median(&ratios),
                goal: Some(Goal::AtLeast(0.5)),
            },
            Check {
                what: "MB/s envd / cat|pipe (info)".into(),
                ratio: median(&pipe_ratios),
                goal: None,
            },
        ],
    })
}

fn local_devnull(file: &Path) -> Result<Duration> {
    tokio::task::block_in_place(|| {
        let devnull = File::options()
            .write(true)
            .open("/dev/null")
            .context("open /dev/null")?;
        let start = Instant::now();
        let status = Command::new(CAT)
            .arg(file)
            .stdout(devnull)
            .status()
            .context("run cat")?;
        let elapsed = start.elapsed();
        ensure!(status.success(), "cat failed: {status}");
        Ok(elapsed)
    })
}

fn local_pipe(file: &Path, size: u64) -> Result<Duration> {
    tokio::task::block_in_place(|| {
        let start = Instant::now();
        let mut child = Command::new(CAT)
            .arg(file)
            .stdout(Stdio::piped())
            .spawn()
            .context("run cat")?;
        let mut stdout = child.stdout.take().context("cat stdout")?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let read = loop {
            match stdout.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => total += n as u64,
                Err(e) => break Err(e),
            }
        };
        let status = child.wait().context("wait for cat")?;
        let elapsed = start.elapsed();
        read.context("read cat's stdout")?;
        ensure!(status.success(), "cat failed: {status}");
        ensure!(total == size, "cat produced {total} bytes, expected {size}");
        Ok(elapsed)
    })
}

async fn envd_cat(client: &EnvdClient, path: &str, size: u64) -> Result<Duration> {
    let limit = crate::transfer_timeout(size);
    let start = Instant::now();
    let total = tokio::time::timeout(limit, async {
        let mut stream = client
            .exec_stream(ExecRequest::new(CAT, [path]))
            .await
            .context("start cat through envd")?;
        let mut total = 0u64;
        while let Some(event) = stream.next().await {
            match event.context("cat stream")? {
                ExecEvent::Stdout(b) => total += b.len() as u64,
                ExecEvent::End { exit_code: 0, .. } => return Ok(total),
                ExecEvent::End {
                    exit_code, status, ..
                } => bail!("cat through envd exited {exit_code} ({status})"),
                _ => {}
            }
        }
        bail!("cat stream ended without an end event")
    })
    .await
    .map_err(|_| anyhow!("cat through envd took longer than {limit:?}"))??;
    let elapsed = start.elapsed();
    ensure!(
        total == size,
        "cat through envd produced {total} bytes, expected {size}"
    );
    Ok(elapsed)
}
