//! Benchmark 3: upload then download of the same bytes through envd's
//! `/files` (`write_file_stream`, `read_file_stream`) against those bytes
//! through a loopback TCP connection in this process (a writer thread and a
//! reader, concurrently). Runs are interleaved; each figure is the median over
//! `reps` runs and each ratio the median of the per-run ratios. For diagnosis
//! it also times writing and reading those bytes to and from a file in the
//! same directory here (envd's disk work without the HTTP).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use bytes::Bytes;
use envd_client::EnvdClient;
use futures::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::data;
use crate::report::{Check, Goal, Measure, Outcome, Row};
use crate::stats::{mb_per_s, median};

/// Read buffer of the loopback baseline's reader.
const READ_BUF: usize = 64 * 1024;

pub async fn run(client: &EnvdClient, dir: &Path, size: u64, reps: usize) -> Result<Outcome> {
    let target = dir.join("upload.bin");
    let path = target
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", target.display()))?
        .to_string();
    let block = Bytes::from(data::pattern(data::BLOCK, 42));

    let local = dir.join("local.bin");
    let (mut tcp, mut up, mut down) = (vec![], vec![], vec![]);
    let (mut disk_write, mut disk_read) = (vec![], vec![]);
    let (mut up_ratios, mut down_ratios) = (vec![], vec![]);
    for _ in 0..reps {
        let base = mb_per_s(size, loopback(&block, size).await?);
        let upload = mb_per_s(size, upload(client, &path, &block, size).await?);
        let download = mb_per_s(size, download(client, &path, size).await?);
        let _ = std::fs::remove_file(&target);
        let local_io = tokio::task::block_in_place(|| local_write_read(&local, &block, size));
        let _ = std::fs::remove_file(&local);
        let (write, read) = local_io?;
        disk_write.push(mb_per_s(size, write));
        disk_read.push(mb_per_s(size, read));
        tcp.push(base);
        up.push(upload);
        down.push(download);
        up_ratios.push(upload / base);
        down_ratios.push(download / base);
    }
    let row = |key, label: &str, rates: &[f64]| Row {
        key,
        label: label.into(),
        measure: Measure::Throughput {
            bytes: size,
            runs: rates.to_vec(),
        },
    };
    Ok(Outcome {
        bench: "files",
        params: json!({ "bytes": size, "reps": reps, "chunk": data::BLOCK, "loopback_read_buf": READ_BUF }),
        rows: vec![
            row("envd_upload", "envd /files upload", &up),
            row("envd_download", "envd /files download", &down),
            row("loopback_tcp", "local loopback TCP", &tcp),
            row("local_write", "local file write (info)", &disk_write),
            row("local_read", "local file read (info)", &disk_read),
        ],
        checks: vec![
            Check {
                what: "MB/s upload / loopback TCP".into(),
                ratio: median(&up_ratios),
                goal: Some(Goal::AtLeast(0.5)),
            },
            Check {
                what: "MB/s download / loopback TCP".into(),
                ratio: median(&down_ratios),
                goal: Some(Goal::AtLeast(0.5)),
            },
        ],
    })
}

/// Writes `size` bytes to `path` (no fsync, as envd does not either), then
/// reads them back in [`READ_BUF`] pieces.
fn local_write_read(path: &Path, block: &Bytes, size: u64) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    for chunk in data::chunks(block, size) {
        file.write_all(&chunk).context("local write")?;
    }
    drop(file);
    let write = start.elapsed();

    let start = Instant::now();
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf).context("local read")? {
            0 => break,
            n => total += n as u64,
        }
    }
    let read = start.elapsed();
    ensure!(total == size, "read back {total} bytes, expected {size}");
    Ok((write, read))
}

async fn upload(client: &EnvdClient, path: &str, block: &Bytes, size: u64) -> Result<Duration> {
    let limit = crate::transfer_timeout(size);
    let body = futures::stream::iter(data::chunks(block, size).map(Ok));
    let start = Instant::now();
    tokio::time::timeout(limit, client.write_file_stream(path, body))
        .await
        .map_err(|_| anyhow!("upload took longer than {limit:?}"))?
        .context("upload through envd")?;
    let elapsed = start.elapsed();
    let written = std::fs::metadata(path).context("stat the upload")?.len();
    ensure!(
        written == size,
        "envd wrote {written} bytes, expected {size}"
    );
    Ok(elapsed)
}

async fn download(client: &EnvdClient, path: &str, size: u64) -> Result<Duration> {
    let limit = crate::transfer_timeout(size);
    let start = Instant::now();
    let total = tokio::time::timeout(limit, async {
        let stream = client
            .read_file_stream(path)
            .await
            .context("download through envd")?;
        let mut stream = std::pin::pin!(stream);
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            total += chunk.context("download body")?.len() as u64;
        }
        anyhow::Ok(total)
    })
    .await
    .map_err(|_| anyhow!("download took longer than {limit:?}"))??;
    let elapsed = start.elapsed();
    ensure!(total == size, "downloaded {total} bytes, expected {size}");
    Ok(elapsed)
}

/// Sends `size` bytes over a fresh loopback connection. The writer runs on a
/// thread of its own (a current-thread runtime), like envd in its own process,
/// so it always runs in parallel with the reader here instead of sometimes
/// sharing the reader's worker. Timed from connect to the reader's EOF.
async fn loopback(block: &Bytes, size: u64) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let chunks = data::chunks(block, size);
    let limit = crate::transfer_timeout(size);
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            tokio::time::timeout(limit, async {
                let mut socket = TcpStream::connect(addr).await?;
                socket.set_nodelay(true)?;
                for chunk in chunks {
                    socket.write_all(&chunk).await?;
                }
                socket.shutdown().await
            })
            .await
            .map_err(|_| std::io::Error::other("loopback writer timed out"))?
        })
    });
    // The writer ends on its own: on success, on error, or at its deadline
    // (the reader dropping the socket makes its writes fail).
    let read = tokio::time::timeout(limit, async {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; READ_BUF];
        let mut total = 0u64;
        loop {
            match socket.read(&mut buf).await? {
                0 => return std::io::Result::Ok(total),
                n => total += n as u64,
            }
        }
    })
    .await;
    let elapsed = start.elapsed();
    drop(listener);
    let written = tokio::task::block_in_place(|| writer.join());
    let total = read
        .map_err(|_| anyhow!("loopback transfer timed out"))?
        .context("loopback read")?;
    written
        .map_err(|_| anyhow!("loopback writer panicked"))?
        .context("loopback write")?;
    ensure!(
        total == size,
        "loopback carried {total} bytes, expected {size}"
    );
    Ok(elapsed)
}
