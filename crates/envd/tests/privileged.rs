//! Tests that need root: envd as PID 1 of a bare busybox rootfs in its own
//! PID and mount namespaces, an upload into a full filesystem, and the port
//! forwarder inside a network namespace. Each cleans up what it creates (a
//! guard per namespace, mount and process), also when it fails.
//!
//! Off root they print why and return; CI runs them as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{within, Envd};
use envd_client::{EnvdClient, ExecRequest};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (CI runs it as root)");
            return;
        }
    };
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The static envd (`scripts/test.sh` builds it and sets `ENVD_STATIC_BIN`).
fn static_envd() -> PathBuf {
    let path = std::env::var_os("ENVD_STATIC_BIN")
        .map(PathBuf::from)
        .expect("ENVD_STATIC_BIN must name the static envd (scripts/test.sh builds it)");
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// A busybox-only rootfs with envd at `/envd`, and nothing mounted.
fn busybox_rootfs() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["bin", "tmp", "etc", "root"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "cat", "ls", "sleep", "echo", "ps", "grep", "true", "tr", "stty",
    ] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::copy(static_envd(), r.join("envd")).unwrap();
    root
}

#[tokio::test]
async fn envd_is_init_of_a_bare_busybox_rootfs() {
    require_root!();
    let root = busybox_rootfs();
    // --kill-child: if the test dies, envd (PID 1 there) and the whole PID
    // namespace die with unshare; the mount namespace goes with them.
    let envd = Envd::spawn(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--propagation",
                "private",
                "chroot",
            ])
            .arg(root.path())
            .args([
                "/envd",
                "--port",
                "0",
                "--addr",
                "127.0.0.1",
                "--port-forward",
                "off",
            ]),
    );
    let c = EnvdClient::new(&format!("http://{}", envd.addr())).unwrap();
    within(
        "healthy",
        Duration::from_secs(10),
        c.wait_healthy(Duration::from_secs(10)),
    )
    .await
    .unwrap();

    // envd is PID 1 and mounted /proc and /dev/pts itself (the rootfs had none).
    let out = c
        .exec(ExecRequest::shell(
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /dev/pts/ptmx; echo $HOME",
        ))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/envd --port 0"), "{text}");
    assert!(
        text.contains("/dev/pts/ptmx") && text.ends_with("/root\n"),
        "{text}"
    );

    // envd raised its soft open-files limit to the hard one.
    let limits = c
        .exec(ExecRequest::shell("cat /proc/1/limits"))
        .await
        .unwrap();
    let limits = String::from_utf8_lossy(&limits.stdout).into_owned();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("limits list open files")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(nofile[0], nofile[1], "{limits}");

    // Orphans are reaped: a grandchild outlives its parent and is adopted by envd.
    c.exec(ExecRequest::shell("(sleep 0.3 &) ; true"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let states = c
        .exec(ExecRequest::shell("cat /proc/[0-9]*/stat"))
        .await
        .unwrap();
    let zombies: Vec<_> = String::from_utf8_lossy(&states.stdout)
        .lines()
        .filter(|l| {
            l.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .map(str::to_string)
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    // A PTY works without /dev/pts in the template.
    let mut term = c.pty_start(ExecRequest::terminal()).await.unwrap();
    c.pty_input(term.pid.into(), b"echo pty-$((40+2))\n")
        .await
        .unwrap();
    let mut screen = String::new();
    within("pty echo", Duration::from_secs(10), async {
        while !screen.contains("pty-42") {
            if let Some(Ok(envd_client::ExecEvent::Pty(b))) = term.next().await {
                screen.push_str(&String::from_utf8_lossy(&b));
            }
        }
    })
    .await;

    // SIGTERM to PID 1 is passed on to the workload before envd exits.
    let mut req = ExecRequest::shell(
        "trap 'echo term > /tmp/got-term; exit 0' TERM; while true; do sleep 0.05; done",
    );
    req.tag = Some("trapper".into());
    let _trapper = c.exec_stream(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", envd.pid())).unwrap();
    let envd_host_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    run(Command::new("kill").args(["-TERM", &envd_host_pid.to_string()]));
    let marker = root.path().join("tmp/got-term");
    // The shell creates the file, then writes it: wait for the content.
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = || std::fs::read_to_string(&marker).unwrap_or_default();
    while read() != "term\n" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(read(), "term\n");
}

/// A tmpfs of `size` mounted on a fresh temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path()));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn an_upload_that_fills_the_disk_fails_cleanly() {
    require_root!();
    let fs = Tmpfs::mount("1m");
    let envd = Envd::start();
    let c = EnvdClient::new(&format!("http://{}", envd.addr())).unwrap();
    let dir = fs.path().to_str().unwrap();

    // A new file: 507, and nothing left behind.
    let big = Bytes::from(vec![1u8; 2 << 20]);
    let err = c
        .write_file(&format!("{dir}/new.bin"), big.clone())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(507), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(!fs.path().join("new.bin").exists());

    // Replacing a file: 507, and the old contents survive.
    let keep = fs.path().join("keep.txt");
    std::fs::write(&keep, b"precious").unwrap();
    let body = futures::stream::iter((0..4).map(|_| Ok(Bytes::from(vec![2u8; 1 << 20]))));
    let err = c
        .write_file_stream(keep.to_str().unwrap(), body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(507), "{err}");
    assert_eq!(std::fs::read(&keep).unwrap(), b"precious");
    let leftovers: Vec<_> = std::fs::read_dir(fs.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("keep.txt")]);
}

/// A network namespace with an "external" interface, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(addr: &str) -> Self {
        let name = format!("wrenn-fwd-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // A veth pair with both ends inside: ext0 plays the capsule's eth0.
        ns.exec(&[
            "ip", "link", "add", "ext0", "type", "veth", "peer", "name", "ext1",
        ]);
        ns.exec(&["ip", "addr", "add", addr, "dev", "ext0"]);
        ns.exec(&["ip", "link", "set", "ext0", "up"]);
        ns.exec(&["ip", "link", "set", "ext1", "up"]);
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left in the namespace would keep it alive: kill them.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl_ok(ns: &Netns, url: &str) -> bool {
    ns.command(&["curl", "-sf", "--max-time", "1", "-o", "/dev/null", url])
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn localhost_listeners_are_forwarded_to_the_external_address() {
    require_root!();
    let ns = Netns::create("10.233.7.1/24");
    let _envd = KillOnDrop(
        ns.command(&[
            env!("CARGO_BIN_EXE_envd"),
            "--dev",
            "--port-forward",
            "on",
            "--port",
            "49983",
            "--addr",
            "127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let url = "http://10.233.7.1:8123/";
    let envd_post = |path: &str| {
        let url = format!("http://127.0.0.1:49983{path}");
        ns.command(&[
            "curl",
            "-sf",
            "--max-time",
            "2",
            "-X",
            "POST",
            "-o",
            "/dev/null",
            &url,
        ])
        .status()
        .is_ok_and(|s| s.success())
    };
    wait_for("envd to listen", Duration::from_secs(10), || {
        envd_post("/init")
    });
    assert!(!curl_ok(&ns, url), "nothing listens yet");
    let server = KillOnDrop(
        ns.command(&[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "8123",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_for("the forward to come up", Duration::from_secs(10), || {
        curl_ok(&ns, url)
    });
    // Before a snapshot the forwarder stops; the next /init brings it back.
    assert!(envd_post("/snapshot/prepare"));
    wait_for(
        "forwarding to stop at /snapshot/prepare",
        Duration::from_secs(2),
        || !curl_ok(&ns, url),
    );
    assert!(envd_post("/init"));
    wait_for(
        "the forward to come back after /init",
        Duration::from_secs(10),
        || curl_ok(&ns, url),
    );
    drop(server);
    wait_for("the forward to go away", Duration::from_secs(10), || {
        !curl_ok(&ns, url)
    });
}
