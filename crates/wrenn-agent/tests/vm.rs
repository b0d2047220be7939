//! VM capsules on QEMU's microvm (TCG here: no usable KVM on these
//! machines): the life of a busybox capsule with its own kernel — exec,
//! files, PTY, the port proxy and port forwarding, metrics, pause with its
//! memory written to a file and the VMM stopped, resume from that file
//! with processes and files intact and the clock caught up, destroy —
//! and what the guest can see of the host: nothing.

mod common;

use std::time::Duration;

use common::TestAgent;
use envd_client::ExecRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wrenn_agent::state::CapsuleState;
use wrenn_agent::template::Engine;
use wrenn_agent::ErrorKind;
use wrenn_types::ids::CapsuleId;

/// `GET /` through the agent's port proxy target for `port`.
async fn http_get(t: &TestAgent, id: &CapsuleId, port: u16) -> Result<String, String> {
    let addr = t.agent.proxy_target(id, port).map_err(|e| e.to_string())?;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(body)
}

async fn eventually_get(t: &TestAgent, id: &CapsuleId, port: u16, want: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        match http_get(t, id, port).await {
            Ok(b) if b.contains(want) => return b,
            Ok(b) => last = b,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("port {port} never served {want:?}: {last}");
}

fn qemu_running_for(t: &TestAgent) -> bool {
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let data = t.data.path().display().to_string();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .any(|l| l.contains("qemu-system") && l.contains(&data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_capsule_lifecycle() {
    let t = TestAgent::start_vm().await;
    let a = &t.agent;
    let id = t.capsule().await;
    let info = a.info_of(&id).unwrap();
    assert_eq!(info.state, CapsuleState::Running);
    assert_eq!(info.engine, Engine::Vm);
    assert!(
        info.runtime.starts_with("qemu-microvm/"),
        "{}",
        info.runtime
    );
    assert_eq!(info.metadata.get("engine").map(String::as_str), Some("vm"));
    assert!(qemu_running_for(&t));

    // envd is the guest's init, on the guest's own kernel
    let (code, out) = t
        .sh(
            &id,
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; uname -r; hostname; \
             echo $WRENN_SANDBOX_ID; cat /run/wrenn/.WRENN_TEMPLATE_ID",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("/.wrenn/envd"), "{out}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        lines[1],
        host_kernel.trim(),
        "the guest runs its own kernel"
    );
    assert!(lines[1].contains("cloud"), "{out}");
    assert_eq!(lines[2], "capsule");
    assert_eq!(lines[3], id.as_str());
    assert_eq!(lines[4], "busybox");
    let (code, _) = t.sh(&id, "exit 7").await;
    assert_eq!(code, 7);

    // files
    let cap = a.running(&id).unwrap();
    let envd = cap.envd();
    common::file_round_trip(&envd, "/root/before.bin").await;

    common::pty_round_trip(&envd, Duration::from_secs(20)).await;

    // an HTTP server in the guest through the port proxy; one bound to
    // 127.0.0.1 only is reached through envd's port forwarder
    let (code, out) = t
        .sh(
            &id,
            "mkdir -p /www && echo served-from-the-vm > /www/index.html && \
             (httpd -p 8080 -h /www; httpd -p 127.0.0.1:8081 -h /www) 2>&1",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    eventually_get(&t, &id, 8080, "served-from-the-vm").await;
    eventually_get(&t, &id, 8081, "served-from-the-vm").await;

    // metrics come from the VMM's cgroup and disk
    let m = a.metrics(&id).await.unwrap();
    assert!(m.usage.cpu_usec > 0 && m.usage.memory_bytes > 0, "{m:?}");
    assert!(m.disk_bytes > 0, "{m:?}");

    // a background counter, then pause: memory to a file, no VMM left
    let mut bg = ExecRequest::shell(
        "i=0; while true; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; sleep 0.2; done",
    );
    bg.tag = Some("counter".into());
    drop(envd.exec_stream(bg).await.unwrap());
    let pid_of_counter = || async {
        envd.list_processes()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.tag.as_deref() == Some("counter"))
            .map(|p| p.pid)
            .expect("counter runs")
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counter_pid = pid_of_counter().await;
    let read_counter = |s: String| s.trim().parse::<u64>().unwrap();
    let before = read_counter(t.sh(&id, "cat /root/counter").await.1);
    assert!(before >= 3, "{before}");

    let info = a.pause(&id).await.unwrap();
    assert_eq!(info.state, CapsuleState::Paused);
    assert!(!qemu_running_for(&t), "a paused VM has no VMM");
    let snap = t
        .data
        .path()
        .join("capsules")
        .join(id.as_str())
        .join("bundle/memory.snap");
    assert!(snap.is_file(), "{} is missing", snap.display());
    assert_eq!(
        a.running(&id).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    assert!(
        http_get(&t, &id, 8080).await.is_err(),
        "a paused VM serves nothing"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let info = a.resume(&id).await.unwrap();
    assert_eq!(info.state, CapsuleState::Running);
    assert!(qemu_running_for(&t));
    assert!(!snap.exists(), "the snapshot is consumed by the resume");
    let after = read_counter(t.sh(&id, "cat /root/counter").await.1);
    assert!(
        after >= before && after < before + 10,
        "the counter continued from {before}, not restarted nor ran while paused: {after}"
    );
    assert_eq!(pid_of_counter().await, counter_pid, "the same process");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = read_counter(t.sh(&id, "cat /root/counter").await.1);
    assert!(later > after, "the counter still counts: {after} → {later}");
    assert_eq!(
        &envd.read_file("/root/before.bin").await.unwrap()[..],
        common::FILE_BYTES
    );
    // the clock caught up with the host (/init after the restore)
    let (_, date) = t.sh(&id, "date +%s").await;
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (date.trim().parse::<i64>().unwrap() - host).abs() <= 2,
        "guest {date} vs host {host}"
    );
    eventually_get(&t, &id, 8080, "served-from-the-vm").await;

    a.destroy(&id).await.unwrap();
    assert_eq!(a.info_of(&id).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(!qemu_running_for(&t));
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Capsule → template on a running VM: what the guest wrote a moment ago
/// (still in its page cache) is in the template, which boots new VM
/// capsules and, from its layer, OCI ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_capsule_becomes_a_template() {
    let t = TestAgent::start_vm().await;
    let a = &t.agent;
    let id = t.capsule().await;
    let (code, out) = t
        .sh(
            &id,
            "echo made-in-the-vm > /root/note && mkdir -p /srv/drop && chmod 1777 /srv/drop \
             && ln -s /root/note /root/link",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    let name: wrenn_types::ids::TemplateName = "vm-snap".parse().unwrap();
    let meta = a
        .snapshot(&id, name.clone(), Default::default())
        .await
        .unwrap();
    assert_eq!(meta.engine, Engine::Vm);
    assert_eq!(meta.layers, vec![name.clone()]);
    assert!(meta.size_bytes > 0);
    assert_eq!(a.info_of(&id).unwrap().state, CapsuleState::Paused);
    assert!(
        !qemu_running_for(&t),
        "a snapshot stops the VMM, as a pause does"
    );

    // a VM capsule from the new template boots from its disk
    let check = "cat /root/note; readlink /root/link; stat -c %a /srv/drop";
    let mut req = t.busybox();
    req.template = name.clone();
    let vm_id = req.id.clone();
    a.create(req).await.unwrap();
    let (code, out) = t.sh(&vm_id, check).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "made-in-the-vm\n/root/note\n1777\n")
    );

    // …and an OCI capsule from its layer
    let mut req = t.busybox();
    req.template = name.clone();
    req.engine = Some(Engine::Oci);
    let oci_id = req.id.clone();
    a.create(req).await.unwrap();
    assert_eq!(a.info_of(&oci_id).unwrap().engine, Engine::Oci);
    let (code, out) = t.sh(&oci_id, check).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "made-in-the-vm\n/root/note\n1777\n")
    );

    // the source capsule resumes as it was
    a.resume(&id).await.unwrap();
    assert_eq!(t.sh(&id, "cat /root/note").await.1, "made-in-the-vm\n");

    for c in [&id, &vm_id, &oci_id] {
        a.destroy(c).await.unwrap();
    }
    a.delete_template(&name).await.unwrap();
    assert!(!t.data.path().join("templates/vm-snap").exists());
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// `--vm-kernel` naming a kernel image file (here the unpacked package's
/// own `vmlinuz`) with `--vm-modules` beside it, instead of a package tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_image_file_boots() {
    let pkg = wrenn_agent::runtime::vm::image::GuestKernel::find(&common::vm_kernel_dir()).unwrap();
    let (image, modules) = (pkg.vmlinuz.clone(), pkg.modules.clone());
    let mut t = TestAgent::start_with(|c| {
        c.vm.kernel_dir = image;
        c.vm.modules = modules;
    })
    .await;
    t.engine = Some(Engine::Vm);
    let id = t.capsule().await;
    assert_eq!(
        t.sh(&id, "uname -r").await,
        (0, format!("{}\n", pkg.release))
    );
    let initrds: Vec<String> = std::fs::read_dir(t.data.path().join("vm"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        initrds
            .iter()
            .any(|n| n.starts_with(&format!("initramfs-{}-", pkg.release))),
        "{initrds:?}"
    );
    t.agent.destroy(&id).await.unwrap();
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_is_destroyed_without_a_vmm() {
    let t = TestAgent::start_vm().await;
    let id = t.capsule().await;
    t.agent.pause(&id).await.unwrap();
    t.agent.destroy(&id).await.unwrap();
    assert!(!qemu_running_for(&t));
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_sees_nothing_of_the_host() {
    let t = TestAgent::start_vm().await;
    let id = t.capsule().await;
    let marker = tempfile::Builder::new()
        .prefix("wrenn-host-marker")
        .tempfile_in("/tmp")
        .unwrap();
    let marker = marker.path().display().to_string();
    let host_pid = std::process::id();
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let (host_init, me) = (comm("1"), comm("self"));
    let (code, out) = t
        .sh(
            &id,
            &format!(
                "ls /proc | grep -c '^[0-9]'; cat /proc/1/comm; \
                 cat /proc/[0-9]*/comm | sort -u | tr '\\n' ' '; echo; \
                 ls /sys/class/net | tr '\\n' ' '; echo; \
                 grep ' / ' /proc/mounts; \
                 test -e {marker} && echo host-file-visible; \
                 test -e /proc/{host_pid}/cmdline && tr '\\0' ' ' < /proc/{host_pid}/cmdline; \
                 true"
            ),
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("host-file-visible"), "{out}");
    assert!(
        !out.contains("/deps/"),
        "the guest read this test's cmdline: {out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    let procs: usize = lines[0].trim().parse().unwrap();
    let host_procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    assert!(
        procs < host_procs,
        "{procs} processes in the guest, {host_procs} on the host"
    );
    assert_eq!(lines[1], "envd", "the guest's PID 1: {out}");
    let guest_names: Vec<&str> = lines[2].split_whitespace().collect();
    for host_only in [host_init.trim(), me.trim()] {
        assert!(
            host_only == "envd" || !guest_names.contains(&host_only),
            "the host's {host_only:?} is visible in the guest: {out}"
        );
    }
    let mut nics: Vec<&str> = lines[3].split_whitespace().collect();
    nics.sort();
    assert_eq!(nics, ["eth0", "lo"], "{out}");
    assert!(lines[4].starts_with("/dev/vda / ext4"), "{out}");
    // the guest's root can do what a container's cannot, to its own kernel only
    let (code, out) = t
        .sh(&id, "mkdir -p /mnt/wrenn-guest && mount -t tmpfs x /mnt/wrenn-guest && echo mounted && umount /mnt/wrenn-guest")
        .await;
    assert_eq!((code, out.as_str()), (0, "mounted\n"));
    let host_mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !host_mounts.contains(" /mnt/wrenn-guest "),
        "a guest mount reached the host"
    );
}
