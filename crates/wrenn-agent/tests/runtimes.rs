//! The same capsule on another OCI runtime, where it is installed
//! (`scripts/test.sh` installs it): `crun`, through the hybrid-cgroup
//! workaround on v1/hybrid hosts. (gVisor's runsc is not tested yet: the
//! 2022 Debian build boots `runsc run` bundles here, but its sandbox dies
//! at network setup with ours; see docs/agent.md.)

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
    meta.runtime = Some(RuntimeChoice {
        binary: binary.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
    });
    a.templates().commit(staged, meta).unwrap();

    let mut req = t.busybox();
    req.template = name;
    let id = req.id.clone();
    let info = a
        .create(req)
        .await
        .unwrap_or_else(|e| panic!("create on {binary}: {e}"));
    assert_eq!(info.runtime, binary);
    let (code, out) = t
        .sh(&id, "echo on-$((40+2)); cat /proc/1/cmdline | tr '\\0' ' '")
        .await;
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
