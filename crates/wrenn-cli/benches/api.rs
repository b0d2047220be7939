//! Control-plane benchmarks, each against a baseline measured in the same
//! run (the machines are shared and noisy: ratios are what count):
//!
//! 1. **PTY echo under proxy load**: keystroke → echo latency through the
//!    API's PTY WebSocket, idle vs while 16 HTTP and 16 WebSocket streams
//!    pull bulk data through the proxy from other ports of the same
//!    capsule; then the same with `--shared-transport` (proxied requests on
//!    the agent's RPC connection, the seed system's design). Idle and
//!    loaded runs take turns over a few rounds (the load wound down for a
//!    second after each loaded run); the percentiles are over all of each.
//!    Goal: loaded p99 ≤ 1.5× idle p99 with separate transports. For
//!    information, the same terminal straight to the capsule's envd (no
//!    control plane, no agent) in every turn: how much the load stretches
//!    the capsule's own part of the path on this machine.
//! 2. **exec round trip**: `POST /v1/capsules/{id}/exec` of `/bin/true` vs
//!    `runc exec` of the same in the same container. Goal: p50 ≤ 0.3×.
//! 3. **proxy**: `wrk` through the subdomain proxy vs through nginx
//!    proxying to the same upstream (envd's `/health` and an 8 MiB file
//!    in the capsule), and directly. Goal: requests/s ≥ 0.9× nginx. The
//!    two proxies take turns (rounds, each in the other order from the
//!    last); the medians are reported, with the CPU time each proxy
//!    spends per request (all its threads, from `/proc`), which this
//!    machine's load moves less than the rate.
//!
//! `cargo bench -p wrenn-cli --bench api [-- --smoke]` (root; needs the
//! static envd in `ENVD_STATIC_BIN` and the `minimal` template fixture that
//! the agent's tests build in `target/wrenn-fixtures`). `WRENN_BIN` runs
//! another build of `wrenn` instead of this one (A/B runs). To look for
//! where the loaded PTY tail comes from, `WRENN_BENCH_LOAD_NICE=N` runs the
//! load clients at nice N and `WRENN_BENCH_SERVER_NICE=N` starts the
//! capsule's bulk servers under `nice -n N` (diagnostics; off by default).
//! `WRENN_PROXY_PAIR=off` (passed on to `wrenn up`) sends every proxied
//! request through the proxy pool instead of the client connection's own
//! upstream connection (`wrenn_http::Pair`), for A/B runs of one build.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wrenn_sdk::PtyEvent;

const WS_FLOOD: &str = r#"
import base64, hashlib, socket, sys, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHUNK = b"x" * 65536
FRAME = bytes([0x82, 127]) + len(CHUNK).to_bytes(8, "big") + CHUNK
def serve(c):
    try:
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(4096)
            if not d: return
            req += d
        key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")][0]
        acc = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        while True:
            c.sendall(FRAME)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// How long the load gets to wind down after its clients are gone.
const LOAD_SETTLE: Duration = Duration::from_secs(1);

struct Sizes {
    keystrokes: usize,
    echo_rounds: usize,
    execs: usize,
    wrk_secs: u32,
    wrk_rounds: usize,
    streams: usize,
}

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn envd() -> PathBuf {
    std::env::var_os("ENVD_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/x86_64-unknown-linux-gnu/release/envd"))
}

/// A `wrenn up` process on its own data dir, instance and pool.
struct Server {
    child: Child,
    base: String,
    port: u16,
    key: String,
    e2b_key: String,
}

impl Server {
    fn start(data: &Path, instance: &str, pool: &str, shared: bool) -> Result<Server> {
        // WRENN_BIN: another build of `wrenn` to measure (A/B runs).
        let bin = std::env::var_os("WRENN_BIN")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wrenn")), PathBuf::from);
        let mut cmd = Command::new(bin);
        cmd.args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--no-code-runner",
            "--no-code-interpreter",
            "--instance",
            instance,
            "--pool",
            pool,
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--envd")
        .arg(envd())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if shared {
            cmd.arg("--shared-transport");
        }
        let mut child = cmd.spawn().context("start wrenn up")?;
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let base = line
            .trim()
            .strip_prefix("wrenn listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .to_owned();
        let port = base.rsplit(':').next().unwrap_or("0").parse()?;
        let key = std::fs::read_to_string(data.join("admin-api-key"))?
            .trim()
            .to_owned();
        let e2b_key = std::fs::read_to_string(data.join("admin-e2b-api-key"))?
            .trim()
            .to_owned();
        // ready when the default template is
        for _ in 0..600 {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
                use std::io::{Read, Write};
                c.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                let mut s = String::new();
                c.read_to_string(&mut s)?;
                Ok(s.starts_with("HTTP/1.0 200") || s.starts_with("HTTP/1.1 200"))
            });
            if ok.unwrap_or(false) {
                return Ok(Server {
                    child,
                    base,
                    port,
                    key,
                    e2b_key,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("wrenn up did not become ready")
    }

    /// A capsule's envd access token, from E2B's sandbox detail.
    fn envd_token(&self, id: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            c,
            "GET /sandboxes/{id} HTTP/1.0\r\nX-API-KEY: {}\r\n\r\n",
            self.e2b_key
        )?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        let body = s.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let v: Value = serde_json::from_str(body).with_context(|| format!("detail: {s}"))?;
        v["envdAccessToken"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no envdAccessToken in {v}"))
    }

    fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Server {
    /// A client of this server's API (wrenn-sdk, as the `wrenn` command).
    fn api(&self) -> Result<wrenn_sdk::Client> {
        Ok(wrenn_sdk::Client::new(&self.base, &self.key)?)
    }
}

async fn sh(api: &wrenn_sdk::Client, id: &str, script: &str) -> Result<String> {
    let out = api
        .exec(id, &wrenn_sdk::Command::shell(script), 120)
        .await?;
    if out.exit_code != 0 {
        bail!(
            "{script}: exit {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A terminal running `cat`: through the API's PTY WebSocket, or straight
/// to the capsule's envd (what the API's hops add is the difference).
enum Term {
    Api(wrenn_sdk::PtySession),
    Envd(envd_client::EnvdClient, envd_client::ExecStream),
}

impl Term {
    async fn open(s: &Server, id: &str, direct: Option<&Direct>) -> Result<Term> {
        Ok(match direct {
            None => Term::Api(s.api()?.pty(id, Some("/bin/cat"), 200, 50, None).await?),
            Some(d) => {
                let c = envd_client::EnvdClient::with_access_token(&d.url, &d.token)?;
                let mut req = envd_client::ExecRequest::new("/bin/cat", Vec::<String>::new());
                req.pty = Some(envd_client::PtySize {
                    cols: 200,
                    rows: 50,
                });
                let stream = c.pty_start(req).await?;
                Term::Envd(c, stream)
            }
        })
    }

    async fn send(&mut self, input: &[u8]) -> Result<()> {
        match self {
            Term::Api(p) => p.send(input).await?,
            Term::Envd(c, st) => c.pty_input(st.pid.into(), input).await?,
        }
        Ok(())
    }

    /// The next event: `Some(output)`, or `None` for one that is not output.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        match self {
            Term::Api(p) => match p.next().await {
                Some(Ok(PtyEvent::Output(b))) => Ok(Some(b)),
                Some(Ok(_)) => Ok(None),
                other => bail!("no echo: {other:?}"),
            },
            Term::Envd(_, st) => match st.next().await {
                Some(Ok(envd_client::ExecEvent::Pty(b))) => Ok(Some(b.to_vec())),
                Some(Ok(_)) => Ok(None),
                other => bail!("no echo: {other:?}"),
            },
        }
    }

    /// The next output (waiting 10 s at most).
    async fn output(&mut self) -> Result<Vec<u8>> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.next()).await {
                Ok(Ok(Some(b))) => return Ok(b),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("no output in 10 s"),
            }
        }
    }

    async fn close(self) -> Result<()> {
        match self {
            Term::Api(mut p) => {
                p.kill().await?;
                p.detach().await;
            }
            Term::Envd(c, st) => {
                c.kill(st.pid.into()).await?;
            }
        }
        Ok(())
    }
}

/// Where the capsule's envd answers, and its access token.
struct Direct {
    url: String,
    token: String,
}

/// Keystroke → echo latencies on a `cat` PTY.
async fn pty_echo(
    s: &Server,
    id: &str,
    direct: Option<&Direct>,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut pty = Term::open(s, id, direct).await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let key = b"abcdefghijklmnopqrstuvwxyz"[i % 26];
        let t0 = Instant::now();
        pty.send(&[key]).await?;
        while !pty.output().await?.contains(&key) {}
        lat.push(t0.elapsed());
        if i % 40 == 39 {
            // End the line. The terminal echoes the newline, then cat
            // prints the line back: read both (two line ends), or the next
            // keystroke would take the line's copy of its letter for its
            // echo.
            pty.send(b"\n").await?;
            let mut ends = 0;
            while ends < 2 {
                ends += pty.output().await?.iter().filter(|&&b| b == b'\n').count();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    pty.close().await?;
    Ok(lat)
}

/// 16 HTTP + 16 WebSocket streams pulling bulk data through the proxy.
fn start_load(
    rt: &tokio::runtime::Handle,
    s: &Server,
    id: &str,
    streams: usize,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (stop, bytes) = (stop.clone(), bytes.clone());
        let port = s.port;
        let id = id.to_owned();
        if i % 2 == 0 {
            tasks.push(rt.spawn(async move {
                let http = wrenn_http::client(wrenn_http::HttpVersion::Http1);
                while !stop.load(Ordering::Relaxed) {
                    let req = http::Request::builder()
                        .uri(format!("http://127.0.0.1:{port}/big"))
                        .header("host", format!("8080-{id}.localhost:{port}"))
                        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                        .expect("request");
                    let Ok(resp) = http.request(req).await else {
                        continue;
                    };
                    let mut body = resp.into_body();
                    while let Some(Ok(f)) = body.frame().await {
                        bytes.fetch_add(
                            f.data_ref().map_or(0, |d| d.len()) as u64,
                            Ordering::Relaxed,
                        );
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            }));
        } else {
            tasks.push(rt.spawn(async move {
                let Ok(mut req) = format!("ws://127.0.0.1:{port}/").into_client_request() else {
                    return;
                };
                if let Ok(h) = format!("8081-{id}.localhost:{port}").parse() {
                    req.headers_mut().insert("host", h);
                }
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    match ws.next().await {
                        Some(Ok(m)) => {
                            bytes.fetch_add(m.len() as u64, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
            }));
        }
    }
    tasks
}

/// One round's latencies on one terminal path: idle, then loaded.
type Round = (Vec<Duration>, Vec<Duration>);

/// Percentiles of one terminal path, idle and loaded.
struct Echo {
    idle_p50: Duration,
    idle_p99: Duration,
    load_p50: Duration,
    load_p99: Duration,
    /// Each round's loaded p99 / idle p99.
    round_ratios: Vec<f64>,
    split: String,
}

impl Echo {
    fn of(rounds: &[Round]) -> Echo {
        let all = |f: fn(&Round) -> &Vec<Duration>| -> Vec<Duration> {
            rounds.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        let (idle, loaded) = (all(|r| &r.0), all(|r| &r.1));
        Echo {
            idle_p50: pct(idle.clone(), 50.0),
            idle_p99: pct(idle, 99.0),
            load_p50: pct(loaded.clone(), 50.0),
            load_p99: pct(loaded, 99.0),
            split: Echo::split(rounds),
            round_ratios: rounds
                .iter()
                .map(|(i, l)| ms(pct(l.clone(), 99.0)) / ms(pct(i.clone(), 99.0)).max(1e-9))
                .collect(),
        }
    }

    /// Diagnostic: p50/p99 of the first keystroke after each pause (the
    /// 20 ms at a line end) and of the others, idle and loaded.
    fn split(rounds: &[Round]) -> String {
        let part = |loaded: bool, first: bool| -> Vec<Duration> {
            rounds
                .iter()
                .flat_map(|r| if loaded { &r.1 } else { &r.0 }.iter().enumerate())
                .filter(|(i, _)| (*i > 0 && i % 40 == 0) == first)
                .map(|(_, d)| *d)
                .collect()
        };
        // (a smoke run's few keystrokes have no pause)
        let at = |v: &[Duration], p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                ms(pct(v.to_vec(), p))
            }
        };
        let mut out = String::new();
        for (name, first) in [("after a pause", true), ("others", false)] {
            let (i, l) = (part(false, first), part(true, first));
            out += &format!(
                " {name}: idle p50 {:.2} p99 {:.2}, loaded p50 {:.2} p99 {:.2} ms;",
                at(&i, 50.0),
                at(&i, 99.0),
                at(&l, 50.0),
                at(&l, 99.0)
            );
        }
        out
    }

    fn ratio(&self) -> f64 {
        ms(self.load_p99) / ms(self.idle_p99).max(1e-9)
    }
}

struct EchoRun {
    /// Through the API (what the goal is about).
    api: Echo,
    /// Straight to envd, when measured (diagnostic: the capsule's part).
    direct: Option<Echo>,
    load_mb_s: f64,
}

/// Idle and loaded runs of [`pty_echo`] in `sz.echo_rounds` rounds, taking
/// turns (each round in the other order from the last), so that the
/// machine's drift over the run weighs on both; the percentiles are over
/// every keystroke of each kind. With `direct`, every turn also times a
/// terminal straight to envd, right after the one through the API.
async fn echo_bench(s: &Server, id: &str, direct: Option<&Direct>, sz: &Sizes) -> Result<EchoRun> {
    let paths: Vec<Option<&Direct>> = std::iter::once(None).chain(direct.map(Some)).collect();
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); paths.len()];
    let (mut moved, mut secs) = (0u64, 0f64);
    for round in 0..sz.echo_rounds {
        let (mut idle, mut loaded) = (Vec::new(), Vec::new());
        for loaded_turn in [round % 2 == 1, round % 2 == 0] {
            if loaded_turn {
                let (lat, b, t) = echo_under_load(s, id, &paths, sz).await?;
                (moved, secs) = (moved + b, secs + t);
                loaded = lat;
            } else {
                for p in &paths {
                    idle.push(pty_echo(s, id, *p, sz.keystrokes).await?);
                }
            }
        }
        for (k, (i, l)) in idle.into_iter().zip(loaded).enumerate() {
            rounds[k].push((i, l));
        }
    }
    Ok(EchoRun {
        api: Echo::of(&rounds[0]),
        direct: rounds.get(1).map(|r| Echo::of(r)),
        load_mb_s: moved as f64 / secs.max(1e-9) / 1e6,
    })
}

/// [`pty_echo`] on each path in turn while `sz.streams` proxy streams run:
/// their latencies, and the bytes the load moved meanwhile in how many
/// seconds.
async fn echo_under_load(
    s: &Server,
    id: &str,
    paths: &[Option<&Direct>],
    sz: &Sizes,
) -> Result<(Vec<Vec<Duration>>, u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    // The load clients run on a runtime of their own: they stand for other
    // users, and must not queue in front of the measured terminal's client
    // on this process's workers.
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-load")
        .on_thread_start(|| {
            let nice = std::env::var("WRENN_BENCH_LOAD_NICE").ok();
            if let Some(n) = nice.and_then(|n| n.parse().ok()) {
                // SAFETY: a plain syscall on the calling thread (who = 0).
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
            }
        })
        .enable_all()
        .build()?;
    let tasks = start_load(
        load_rt.handle(),
        s,
        id,
        sz.streams,
        stop.clone(),
        bytes.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b0 = bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut loaded = Vec::new();
    let mut failed = None;
    for p in paths {
        match pty_echo(s, id, *p, sz.keystrokes).await {
            Ok(l) => loaded.push(l),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let moved = bytes.load(Ordering::Relaxed) - b0;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    load_rt.shutdown_background();
    // The servers' side of the streams ends once it sees the clients gone;
    // the next turn (idle, or a new load) starts after that.
    tokio::time::sleep(LOAD_SETTLE).await;
    match failed {
        Some(e) => Err(e),
        None => Ok((loaded, moved, secs)),
    }
}

fn runc_exec_once(instance: &str, container: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let st = Command::new("runc")
        .arg(format!("--root=/run/{instance}/runc"))
        .args(["exec", container, "/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("runc exec failed: {st}");
    }
    Ok(t0.elapsed())
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    mb_s: f64,
}

fn wrk(url: &str, headers: &[String], secs: u32) -> Result<Wrk> {
    let mut cmd = Command::new("wrk");
    // (an 8 MiB answer under this load can take over wrk's default 2 s)
    cmd.args([
        "-t2",
        "-c32",
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "10s",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().context("run wrk (apt install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let grab = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    };
    let rps: f64 = grab("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk: {text}"))?;
    let unit = |v: &str| -> f64 {
        let (n, mul) = if let Some(x) = v.strip_suffix("us") {
            (x, 0.001)
        } else if let Some(x) = v.strip_suffix("ms") {
            (x, 1.0)
        } else if let Some(x) = v.strip_suffix('s') {
            (x, 1000.0)
        } else {
            (v, 1.0)
        };
        n.parse::<f64>().unwrap_or(f64::NAN) * mul
    };
    let p50 = grab("50%").map(|v| unit(&v)).unwrap_or(f64::NAN);
    let xfer = grab("Transfer/sec:").unwrap_or_default();
    let mb = if let Some(x) = xfer.strip_suffix("GB") {
        x.parse::<f64>().unwrap_or(0.0) * 1073.741824
    } else if let Some(x) = xfer.strip_suffix("MB") {
        x.parse::<f64>().unwrap_or(0.0) * 1.048576
    } else if let Some(x) = xfer.strip_suffix("KB") {
        x.parse::<f64>().unwrap_or(0.0) * 0.001024
    } else {
        0.0
    };
    let errors = text
        .lines()
        .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if errors {
        eprintln!("wrk reported errors for {url}:\n{text}");
    }
    Ok(Wrk {
        rps,
        p50_ms: p50,
        mb_s: mb,
    })
}

/// One proxy's side of the comparison: where `wrk` goes, and the
/// processes whose CPU time is the proxy's.
struct Proxied<'a> {
    url: String,
    headers: Vec<String>,
    pids: &'a [u32],
}

/// One proxy's medians over the rounds.
struct Turns {
    wrk: Wrk,
    cpu_us: f64,
    /// wrenn: the median of the rounds' rate ratios to nginx, and each.
    ratio: f64,
    ratios: String,
}

/// CPU time (user + system) of every thread of `pids`, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    let mut ticks = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // fields after the command name (which may hold spaces): utime
            // and stime are the 12th and 13th
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            ticks += f.iter().sum::<u64>();
        }
    }
    ticks
}

/// `wrk` through `a` and `b` in turns, `rounds` times each (the order
/// flips every round); medians of each, and of the rounds' ratios a/b.
fn take_turns(a: &Proxied, b: &Proxied, rounds: usize, secs: u32) -> Result<(Turns, Turns)> {
    let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let one = |p: &Proxied| -> Result<(Wrk, f64)> {
        let before = cpu_ticks(p.pids);
        let w = wrk(&p.url, &p.headers, secs)?;
        let spent = (cpu_ticks(p.pids) - before) as f64 * tick_us;
        let us = spent / (w.rps * f64::from(secs)).max(1.0);
        Ok((w, us))
    };
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            xs.push(one(a)?);
            ys.push(one(b)?);
        } else {
            ys.push(one(b)?);
            xs.push(one(a)?);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = xs.iter().zip(&ys).map(|(x, y)| x.0.rps / y.0.rps).collect();
    let shown = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(" ");
    let turns = |v: &[(Wrk, f64)], ratio: f64, ratios: String| Turns {
        wrk: Wrk {
            rps: median(v.iter().map(|x| x.0.rps).collect()),
            p50_ms: median(v.iter().map(|x| x.0.p50_ms).collect()),
            mb_s: median(v.iter().map(|x| x.0.mb_s).collect()),
        },
        cpu_us: median(v.iter().map(|x| x.1).collect()),
        ratio,
        ratios,
    };
    Ok((
        turns(&xs, median(ratios), shown),
        turns(&ys, f64::NAN, String::new()),
    ))
}

struct Nginx(Child, PathBuf);

impl Nginx {
    fn start(dir: &Path, upstream: &str) -> Result<(Nginx, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::create_dir_all(dir.join("logs"))?;
        let conf = format!(
            "worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
               upstream u {{ server {upstream}; keepalive 64; }}\n\
               server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://u; proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nginx (apt install nginx-light)")?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok((Nginx(child, dir.to_owned()), port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nginx did not start")
    }
}

impl Nginx {
    /// The worker processes (the master's children).
    fn workers(&self) -> Vec<u32> {
        let pid = self.0.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGQUIT) };
        let _ = self.0.wait();
        let _ = &self.1;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let sz = if smoke {
        Sizes {
            keystrokes: 10,
            echo_rounds: 1,
            execs: 5,
            wrk_secs: 1,
            wrk_rounds: 1,
            streams: 4,
        }
    } else {
        Sizes {
            keystrokes: 1000,
            echo_rounds: 4,
            execs: 200,
            wrk_secs: 4,
            wrk_rounds: 5,
            streams: 32,
        }
    };
    let minimal = std::env::var_os("WRENN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wrenn-fixtures"))
        .join("templates/minimal");
    if !minimal.is_dir() {
        bail!(
            "{} is missing: the agent's tests build it (cargo test -p wrenn-agent)",
            minimal.display()
        );
    }
    let data = tempfile::Builder::new()
        .prefix("wrenn-bench-api")
        .tempdir_in("/var/tmp")?;
    std::fs::create_dir_all(data.path().join("templates"))?;
    std::os::unix::fs::symlink(&minimal, data.path().join("templates/minimal"))?;
    let instance = format!("wb{:x}", std::process::id() & 0xffff);
    let pool = format!(
        "10.{}.{}.0/24",
        200 + std::process::id() % 50,
        std::process::id() % 250
    );
    let mut server = Server::start(data.path(), &instance, &pool, false)?;
    let spec = wrenn_sdk::CreateCapsule {
        template: Some("minimal".into()),
        vcpus: Some(2),
        memory_mb: Some(1024),
        ..Default::default()
    };
    let id = server.api()?.create_capsule(&spec).await?.id;
    // Ctrl-C or SIGTERM ends the run, not the process: what follows must
    // still take the capsule, its network and its mounts down.
    let result = tokio::select! {
        r = run(&mut server, data.path(), &id, &instance, &pool, &sz) => r,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    let _ = server.api()?.destroy_capsule(&id).await;
    server.stop();
    scrub(&instance, data.path());
    result
}

/// Remove what an agent keeps for its instance between runs (the firewall
/// table, runtime state, cgroup parents): the benchmark's instance is gone.
/// The first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn scrub(instance: &str, data: &Path) {
    // Capsules outlive their agent by design: anything still running in
    // the instance's cgroups (a build the run cut off) is killed first.
    if let Ok(out) = Command::new("find")
        .arg(format!("/sys/fs/cgroup/pids/{instance}"))
        .args(["-name", "cgroup.procs"])
        .output()
    {
        for procs in String::from_utf8_lossy(&out.stdout).lines() {
            for pid in std::fs::read_to_string(procs).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(data))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = Command::new("umount").args(["-l", m]).status();
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if ns.starts_with(&format!("{instance}-")) {
                let _ = Command::new("ip").args(["netns", "delete", ns]).status();
            }
        }
    }
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", instance])
        .status();
    let _ = std::fs::remove_dir_all(format!("/run/{instance}"));
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for ctl in rd.flatten() {
            let dir = ctl.path().join(instance);
            if dir.is_dir() {
                let _ = Command::new("find")
                    .arg(&dir)
                    .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .status();
            }
        }
    }
}

async fn run(
    server: &mut Server,
    data: &Path,
    id: &str,
    instance: &str,
    pool: &str,
    sz: &Sizes,
) -> Result<()> {
    // bulk servers: 8 MiB over HTTP on 8080, an endless WebSocket on 8081
    let api = server.api()?;
    sh(
        &api,
        id,
        "mkdir -p /srv && head -c 8388608 /dev/urandom > /srv/big",
    )
    .await?;
    sh(
        &api,
        id,
        &format!("cat > /srv/ws.py <<'EOF'\n{WS_FLOOD}\nEOF"),
    )
    .await?;
    for (tag, cmd) in [
        ("http", "python3 -m http.server 8080 -d /srv"),
        ("ws", "python3 /srv/ws.py 8081"),
    ] {
        let cmd = match std::env::var("WRENN_BENCH_SERVER_NICE") {
            Ok(n) => format!("nice -n {n} {cmd}"),
            Err(_) => cmd.to_owned(),
        };
        api.exec_background(id, &wrenn_sdk::Command::shell(&cmd), Some(tag))
            .await?;
    }
    let ip = sh(
        &api,
        id,
        "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1",
    )
    .await?
    .trim()
    .to_owned();
    for _ in 0..50 {
        if sh(
            &api,
            id,
            "curl -sf -o /dev/null http://127.0.0.1:8080/big && echo ok",
        )
        .await
        .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!(
        "# wrenn control-plane benchmarks ({})",
        if sz.keystrokes < 50 { "smoke" } else { "full" }
    );
    // 1. PTY echo under load, separate transports
    let direct = Direct {
        url: format!("http://{ip}:49983"),
        token: server.envd_token(id)?,
    };
    let sep = echo_bench(server, id, Some(&direct), sz).await?;
    // 2. exec round trip vs runc exec (interleaved)
    let container = String::from_utf8(
        Command::new("runc")
            .arg(format!("--root=/run/{instance}/runc"))
            .args(["list", "-q"])
            .output()?
            .stdout,
    )?
    .lines()
    .next()
    .context("no runc container")?
    .to_owned();
    let (client, true_cmd) = (
        api,
        wrenn_sdk::Command {
            cmd: "/bin/true".into(),
            ..Default::default()
        },
    );
    let (mut api, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..sz.execs {
        let t0 = Instant::now();
        let out = client.exec(id, &true_cmd, 0).await?;
        anyhow::ensure!(out.exit_code == 0, "/bin/true failed");
        api.push(t0.elapsed());
        raw.push(runc_exec_once(instance, &container)?);
    }
    // 3. proxy vs nginx vs direct, small (envd /health) and 8 MiB (/files)
    let ngx_dir = data.join("nginx");
    let (nginx, nport) = Nginx::start(&ngx_dir, &format!("{ip}:49983"))?;
    let host = format!("49983-{id}.localhost:{}", server.port);
    // envd's /files wants the capsule's access token (E2B's detail shows it)
    let token = format!("X-Access-Token: {}", server.envd_token(id)?);
    let small = "/health".to_owned();
    let big = "/files?path=/srv/big&username=root".to_owned();
    let mut rows = Vec::new();
    let wrenn_pids = [server.child.id()];
    let nginx_pids = nginx.workers();
    for (name, path) in [("small", &small), ("8 MiB", &big)] {
        let through_wrenn = Proxied {
            url: format!("http://127.0.0.1:{}{path}", server.port),
            headers: vec![format!("Host: {host}"), token.clone()],
            pids: &wrenn_pids,
        };
        let through_nginx = Proxied {
            url: format!("http://127.0.0.1:{nport}{path}"),
            headers: vec![token.clone()],
            pids: &nginx_pids,
        };
        let (w, n) = take_turns(&through_wrenn, &through_nginx, sz.wrk_rounds, sz.wrk_secs)?;
        let d = wrk(
            &format!("http://{ip}:49983{path}"),
            std::slice::from_ref(&token),
            sz.wrk_secs,
        )?;
        rows.push((name, w, n, d));
    }
    drop(nginx);

    // 1b. the same PTY benchmark with one shared client for both classes
    server.stop();
    *server = Server::start(data, instance, pool, true)?;
    let shared = echo_bench(server, id, None, sz).await?;

    println!("\n## PTY keystroke echo ({} rounds of {} keystrokes idle and {} loaded, taking turns; percentiles over all; load: {} proxy streams, half HTTP GETs of 8 MiB, half WebSocket floods)", sz.echo_rounds, sz.keystrokes, sz.keystrokes, sz.streams);
    let echo_rows = [
        (
            "API, separate transports (default)",
            &sep.api,
            sep.load_mb_s,
        ),
        (
            "API, one shared HTTP/2 client",
            &shared.api,
            shared.load_mb_s,
        ),
    ];
    let direct_row = sep.direct.as_ref().map(|d| {
        (
            "straight to envd (info: the capsule's part)",
            d,
            sep.load_mb_s,
        )
    });
    for (label, e, mb_s) in echo_rows.into_iter().chain(direct_row) {
        println!(
            "{label:44} idle p50 {:6.2} ms p99 {:6.2} ms | loaded p50 {:6.2} ms p99 {:7.2} ms | p99 ratio {:5.2}× | load moved {:6.1} MB/s",
            ms(e.idle_p50), ms(e.idle_p99), ms(e.load_p50), ms(e.load_p99), e.ratio(), mb_s
        );
        let rounds: Vec<String> = e.round_ratios.iter().map(|x| format!("{x:.2}")).collect();
        println!("{:44} each round's p99 ratio: {}", "", rounds.join(" "));
        println!("{:44}{}", "", e.split);
    }
    println!(
        "goal: loaded p99 ≤ 1.5× idle p99 (API, separate transports): {}",
        if sep.api.ratio() <= 1.5 {
            "met"
        } else {
            "NOT met"
        }
    );
    if let Some(d) = &sep.direct {
        println!(
            "info: how much more the load stretches the API's p99 than envd's own (p99 ratio API / p99 ratio straight to envd): separate transports {:.2}×, shared client {:.2}×",
            sep.api.ratio() / d.ratio().max(1e-9),
            shared.api.ratio() / d.ratio().max(1e-9)
        );
    }
    let r = |a: Duration, b: Duration| ms(a) / ms(b).max(1e-9);
    let (ap, rp) = (pct(api.clone(), 50.0), pct(raw.clone(), 50.0));
    println!(
        "\n## exec round trip of /bin/true ({} each, interleaved)",
        sz.execs
    );
    println!(
        "API POST /exec       p50 {:6.2} ms p99 {:6.2} ms",
        ms(ap),
        ms(pct(api, 99.0))
    );
    println!(
        "runc exec            p50 {:6.2} ms p99 {:6.2} ms",
        ms(rp),
        ms(pct(raw, 99.0))
    );
    println!(
        "ratio API / runc exec p50: {:.3}× (goal ≤ 0.3×): {}",
        r(ap, rp),
        if r(ap, rp) <= 0.3 { "met" } else { "NOT met" }
    );
    println!(
        "\n## proxy (wrk -t2 -c32 -d{}s, {} rounds each, taking turns; medians)",
        sz.wrk_secs, sz.wrk_rounds
    );
    for (name, w, n, d) in &rows {
        println!(
            "{name:6} wrenn {:8.0} req/s p50 {:6.2} ms {:7.1} MB/s {:6.1} µs CPU/req | nginx {:8.0} req/s p50 {:6.2} ms {:7.1} MB/s {:6.1} µs CPU/req | direct {:8.0} req/s p50 {:6.2} ms | wrenn/nginx {}",
            w.wrk.rps, w.wrk.p50_ms, w.wrk.mb_s, w.cpu_us, n.wrk.rps, n.wrk.p50_ms, n.wrk.mb_s, n.cpu_us, d.rps, d.p50_ms,
            // a 1 s smoke run may finish no large request at all
            if n.wrk.rps >= 1.0 && w.ratio.is_finite() {
                format!("{:.2}× (rounds: {})", w.ratio, w.ratios)
            } else {
                "n/a (too few requests)".into()
            }
        );
    }
    Ok(())
}
