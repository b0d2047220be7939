//! Harness for the agent's privileged tests: a real agent (real runc,
//! namespaces, nftables, overlayfs) with its own instance name, address
//! pool and data directory, so tests run side by side. Dropping a
//! [`TestAgent`] destroys its capsules and removes its firewall table,
//! runtime state and cgroup parents, also when the test panicked.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envd_client::ExecRequest;
use wrenn_agent::template::Engine;
use wrenn_agent::{Agent, AgentConfig, CreateRequest};
use wrenn_types::ids::CapsuleId;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The static envd (`scripts/test.sh` builds it and sets `ENVD_STATIC_BIN`).
pub fn static_envd() -> PathBuf {
    let path = std::env::var_os("ENVD_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/x86_64-unknown-linux-gnu/release/envd"
            ))
        });
    assert!(
        path.is_file(),
        "{} is missing: scripts/test.sh builds the static envd (ENVD_STATIC_BIN)",
        path.display()
    );
    path
}

pub struct TestAgent {
    pub agent: Arc<Agent>,
    pub data: tempfile::TempDir,
    pub cfg: AgentConfig,
    /// The engine of the capsules [`TestAgent::busybox`] asks for.
    pub engine: Option<Engine>,
}

/// The guest kernel VM tests share: `WRENN_VM_KERNEL`, else
/// `target/wrenn-fixtures/vm-kernel`, downloaded there (Debian's cloud
/// kernel, unpacked, not installed) by the first test that needs it.
pub fn vm_kernel_dir() -> PathBuf {
    let dir = std::env::var_os("WRENN_VM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/wrenn-fixtures/vm-kernel"
            ))
        });
    wrenn_agent::runtime::vm::image::GuestKernel::fetch_debian(&dir)
        .unwrap_or_else(|e| panic!("guest kernel in {}: {e}", dir.display()));
    dir
}

/// A fresh configuration: unique instance, pool and data directory.
pub fn test_config(data: &Path) -> AgentConfig {
    assert!(
        rustix::process::geteuid().is_root(),
        "the agent's tests need root (CI runs them as root)"
    );
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let instance = format!("t{:x}{:x}", pid & 0xfff, n);
    let mut cfg = AgentConfig::new(data.to_owned(), static_envd())
        .with_instance(&instance[..instance.len().min(8)]);
    cfg.network.pool = format!("10.{}.{}.0/24", 100 + n % 100, pid % 256)
        .parse()
        .unwrap();
    cfg.reaper_interval = Duration::from_millis(200);
    cfg
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        TestAgent::start_with(|_| {}).await
    }

    /// An agent whose configuration `tune` adjusts first.
    pub async fn start_with(tune: impl FnOnce(&mut AgentConfig)) -> TestAgent {
        let data = tempfile::Builder::new()
            .prefix("wrenn-agent-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut cfg = test_config(data.path());
        tune(&mut cfg);
        let agent = Agent::open(cfg.clone()).await.expect("agent opens");
        TestAgent {
            agent,
            data,
            cfg,
            engine: None,
        }
    }

    /// An agent whose busybox capsules are microVMs (QEMU; TCG here).
    pub async fn start_vm() -> TestAgent {
        let kernel = vm_kernel_dir();
        let mut t = TestAgent::start_with(|c| c.vm.kernel_dir = kernel).await;
        t.engine = Some(Engine::Vm);
        t
    }

    pub fn busybox(&self) -> CreateRequest {
        let mut r = CreateRequest::new(CapsuleId::random(), "busybox".parse().unwrap());
        r.memory_mb = 128;
        if self.engine == Some(Engine::Vm) {
            // A guest kernel wants more than a container.
            r.memory_mb = 256;
        }
        r.engine = self.engine;
        r
    }

    /// Create a busybox capsule with defaults.
    pub async fn capsule(&self) -> CapsuleId {
        let req = self.busybox();
        let id = req.id.clone();
        self.agent.create(req).await.expect("create");
        id
    }

    /// Run a shell script in a capsule; (exit code, stdout+stderr).
    pub async fn sh(&self, id: &CapsuleId, script: &str) -> (i32, String) {
        let c = self.agent.running(id).expect("capsule is running");
        let mut req = ExecRequest::shell(script);
        req.timeout = Some(Duration::from_secs(30));
        let out = c.envd().exec(req).await.expect("exec");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.exit_code, text)
    }

    /// Host objects this agent could have left behind.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.cfg, self.data.path())
    }
}

pub fn leftovers(cfg: &AgentConfig, data: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let inst = &cfg.instance;
    for (_, n) in wrenn_agent::network::list_netns(inst) {
        v.push(format!("netns {n}"));
    }
    for (_, n) in wrenn_agent::network::list_links(inst) {
        v.push(format!("link {n}"));
    }
    for m in wrenn_agent::rootfs::mounts_under(data) {
        v.push(format!("mount {}", m.display()));
    }
    let cg = wrenn_agent::cgroup::Cgroups::host();
    for ctl in ["memory", "pids", "cpu", "freezer", ""] {
        let dir = cg.root.join(ctl).join(inst);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                v.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(data.join("capsules")) {
        for e in rd.flatten() {
            v.push(format!("dir {}", e.path().display()));
        }
    }
    let rules = std::process::Command::new("nft")
        .args(["list", "table", "inet", inst])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rules.stdout);
    if text.contains("elements") {
        v.push(format!("nft elements: {text}"));
    }
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&ps.stdout).lines() {
        if l.contains(&format!("--root=/run/{inst}")) || l.contains(&data.display().to_string()) {
            v.push(format!("process {l}"));
        }
    }
    v
}

/// Remove everything an instance may own on the host.
pub fn scrub(cfg: &AgentConfig) {
    let inst = &cfg.instance;
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", inst])
        .output();
    wrenn_agent::cgroup::Cgroups::host().remove_parent(inst);
    let _ = std::fs::remove_dir_all(&cfg.state_root);
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let agent = self.agent.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(agent.destroy_all())
        });
        scrub(&self.cfg);
    }
}

/// What [`file_round_trip`] writes.
pub const FILE_BYTES: &[u8] = b"data\x00\xff";

/// Write [`FILE_BYTES`] at `path` through envd, read it back, find it
/// listed in its directory.
pub async fn file_round_trip(envd: &envd_client::EnvdClient, path: &str) {
    envd.write_file(path, bytes::Bytes::from_static(FILE_BYTES))
        .await
        .unwrap();
    assert_eq!(&envd.read_file(path).await.unwrap()[..], FILE_BYTES);
    let (dir, name) = path.rsplit_once('/').unwrap();
    let names: Vec<String> = envd
        .list_dir(dir, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.iter().any(|n| n == name), "{names:?}");
}

/// Open a shell on a PTY, type `echo pty-$((6*7))`, see `pty-42` within
/// `wait`, kill the shell.
pub async fn pty_round_trip(envd: &envd_client::EnvdClient, wait: Duration) {
    use envd_client::{ExecEvent, Selector};
    let mut pty = envd.pty_start(ExecRequest::terminal()).await.unwrap();
    envd.pty_input(Selector::Pid(pty.pid), b"echo pty-$((6*7))\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(wait, async {
        while let Some(Ok(ev)) = pty.next().await {
            if let ExecEvent::Pty(b) = ev {
                seen.extend_from_slice(&b);
                if String::from_utf8_lossy(&seen).contains("pty-42") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(found, "{}", String::from_utf8_lossy(&seen));
    envd.kill(Selector::Pid(pty.pid)).await.unwrap();
}

/// Poll `f` until it is true or `secs` pass.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// The agent binary running as a separate process (for restart tests).
pub struct AgentProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl AgentProcess {
    pub fn spawn(cfg: &AgentConfig) -> AgentProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn-agent"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--instance",
                &cfg.instance,
                "--reaper-interval",
                "200ms",
                "--metrics-save-interval",
                &format!("{}ms", cfg.metrics_save_interval.as_millis()),
            ])
            .arg("--data-dir")
            .arg(&cfg.data_dir)
            .arg("--envd")
            .arg(&cfg.envd_bin)
            .arg("--pool")
            .arg(cfg.network.pool.to_string())
            .arg("--vm-kernel")
            .arg(&cfg.vm.kernel_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn wrenn-agent");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("wrenn-agent listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        AgentProcess { child, addr }
    }

    /// A client with the token the agent made in `data_dir`.
    pub fn client(&self, data_dir: &Path) -> RpcClient {
        let token = std::fs::read_to_string(data_dir.join(wrenn_agent::auth::TOKEN_FILE)).unwrap();
        rpc_client(self.addr, token.trim())
    }

    /// SIGTERM, and wait: a graceful stop (capsules stay, pools drain).
    pub fn stop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub type RpcClient = wrenn_proto::wrenn::agent::v1::AgentClient<connectrpc::client::HttpClient>;

/// `sh -c script` in capsule `id` through the agent's RPC: its exit code,
/// stdout and stderr.
pub async fn rpc_sh(c: &RpcClient, id: &str, script: &str) -> (i32, String, String) {
    use wrenn_proto::wrenn::agent::v1 as pb;
    let r = c
        .exec(pb::ExecRequest {
            id: id.into(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (r.exit_code, text(&r.stdout), text(&r.stderr))
}

/// An RPC client of the agent at `addr` that presents `token`.
pub fn rpc_client(addr: std::net::SocketAddr, token: &str) -> RpcClient {
    let uri: http::Uri = format!("http://{addr}").parse().unwrap();
    RpcClient::new(
        connectrpc::client::HttpClient::plaintext(),
        connectrpc::client::ClientConfig::new(uri)
            .with_default_header(wrenn_agent::auth::AGENT_TOKEN_HEADER, token),
    )
}

/// Where expensive fixtures (the debootstrap `minimal` template) are built
/// once per checkout and shared by every test and test binary.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("WRENN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/wrenn-fixtures"
            ))
        })
}

/// Build (once, under a file lock) the shared `minimal` template and link
/// it into `templates`.
pub fn link_minimal(templates: &Path) {
    let fixtures = fixtures_dir();
    std::fs::create_dir_all(&fixtures).unwrap();
    let lock = std::fs::File::create(fixtures.join(".lock")).unwrap();
    lock.lock().unwrap();
    let store = wrenn_agent::template::TemplateStore::open(fixtures.join("templates")).unwrap();
    let started = std::time::Instant::now();
    let mirror = wrenn_agent::template::host_mirror();
    let mut last = 0;
    wrenn_agent::template::build_minimal(&store, &mirror, &mut |p| {
        if p.steps / 100 != last {
            last = p.steps / 100;
            eprintln!("minimal: {} steps ({} {})", p.steps, p.phase, p.detail);
        }
    })
    .expect("build the minimal template (debootstrap)");
    if started.elapsed() > Duration::from_secs(5) {
        eprintln!("minimal template built in {:?}", started.elapsed());
    }
    drop(lock);
    let link = templates.join("minimal");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(fixtures.join("templates/minimal"), link).unwrap();
    }
}

impl TestAgent {
    /// An agent whose store also holds the shared `minimal` template.
    pub async fn start_with_minimal() -> TestAgent {
        let t = TestAgent::start().await;
        let templates = t.agent.templates().dir().to_owned();
        tokio::task::spawn_blocking(move || link_minimal(&templates))
            .await
            .unwrap();
        t
    }

    /// Start a background process in a capsule (runs on after we stop reading).
    pub async fn spawn(&self, id: &CapsuleId, tag: &str, script: &str) {
        let c = self.agent.running(id).unwrap();
        let mut req = ExecRequest::shell(script);
        req.tag = Some(tag.into());
        drop(
            c.envd()
                .exec_stream(req)
                .await
                .expect("start background process"),
        );
    }
}
