//! The same capsule on the other OCI runtimes, where they are installed
//! (`scripts/test.sh` installs crun): `crun` (through the hybrid-cgroup
//! workaround on v1/hybrid hosts) and gVisor's `runsc --platform=ptrace`.

mod common;

use common::TestAgent;
use wrenn_agent::state::CapsuleState;
use wrenn_agent::template::RuntimeChoice;

async fn on_runtime(binary: &str, args: &[&str]) {
    let installed = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
        .unwrap_or(false);
    if !installed {
        eprintln!("SKIPPED: {binary} is not installed on this host");
        return;
    }
    let t = TestAgent::start().await;
    let a = &t.agent;
    let name = format!("busybox-{binary}").parse().unwrap();
    let staged = a.templates().stage(&name).unwrap();
    let mut meta = a.templates().get(&"busybox".parse().unwrap()).unwrap();
    meta.layers.insert(0, name.clone());
    meta.name = name.clone();
    meta.runtime = Some(RuntimeChoice { binary: binary.into(), args: args.iter().map(|s| s.to_string()).collect() });
    a.templates().commit(staged, meta).unwrap();

    let mut req = t.busybox();
    req.template = name;
    let id = req.id.clone();
    let info = a.create(req).await.unwrap_or_else(|e| panic!("create on {binary}: {e}"));
    assert_eq!(info.runtime, binary);
    let (code, out) = t.sh(&id, "echo on-$((40+2)); cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("on-42\n/.wrenn/envd"), "{out}");
    a.pause(&id).await.unwrap();
    assert_eq!(a.info_of(&id).unwrap().state, CapsuleState::Paused);
    a.resume(&id).await.unwrap();
    assert_eq!(t.sh(&id, "echo again").await, (0, "again\n".to_string()));
    a.destroy(&id).await.unwrap();
    let left = t.leftovers();
    assert!(left.is_empty(), "{binary}: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crun_runs_capsules() {
    on_runtime("crun", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runsc_runs_capsules() {
    // Debian's runsc (2022) must first prove it can run anything on this
    // kernel: on 6.x kernels its sandbox dies at boot, even for `runsc do`.
    let probe = std::process::Command::new("runsc")
        .args(["--platform=ptrace", "--network=none", "do", "echo", "gvisor-ok"])
        .current_dir("/tmp")
        .output();
    match probe {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("gvisor-ok") => {}
        Ok(_) => {
            eprintln!("SKIPPED: runsc is installed but cannot run a sandbox on this kernel (`runsc do echo` prints nothing)");
            return;
        }
        Err(_) => {
            eprintln!("SKIPPED: runsc is not installed on this host");
            return;
        }
    }
    on_runtime("runsc", &["--platform=ptrace"]).await;
}
