//! `kill -9` the agent with ten capsules running, start it again: all ten
//! are re-adopted and answer with their files and processes intact; one
//! whose container died meanwhile is reported, not forgotten. Network slots
//! the killed agent had prepared are swept; a SIGTERM'd agent drains its own.
//! A VM capsule's VMM outlives the agent too, and is adopted the same way.
//! A capsule's metrics history outlives either kind of stop.

mod common;

use common::{AgentProcess, RpcClient};
use connectrpc::ErrorCode;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::CapsuleId;

async fn exec(c: &RpcClient, id: &str, script: &str) -> (i32, String) {
    let (code, out, _) = common::rpc_sh(c, id, script).await;
    (code, out)
}

/// When each sample of capsule `id`'s finest metrics tier was taken.
async fn history(c: &RpcClient, id: &str) -> Vec<i64> {
    let m = c
        .get_metrics(pb::CapsuleRef {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    m.history.iter().map(|p| p.at_ms).collect()
}

/// Capsule `id`'s history once it holds `n` samples (at most 30 s).
async fn history_of(c: &RpcClient, id: &str, n: usize) -> Vec<i64> {
    for _ in 0..300 {
        let h = history(c, id).await;
        if h.len() >= n {
            return h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("capsule {id}: fewer than {n} samples in 30 s");
}

/// Every sample of `before` is still in `after`, and newer ones follow.
fn kept(before: &[i64], after: &[i64]) {
    assert!(
        after.starts_with(before) && after.len() > before.len(),
        "before the restart: {before:?}\nafter: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_readopts_its_capsules() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-restart")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    // (what a killed agent loses of its capsules' metrics histories)
    cfg.metrics_save_interval = std::time::Duration::from_secs(1);
    let guard = Scrub(cfg.clone());
    let mut first = AgentProcess::spawn(&cfg);
    let c = first.client(&cfg.data_dir);
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = CapsuleId::random().to_string();
        let created = c
            .create_capsule(pb::CreateCapsuleRequest {
                id: id.clone(),
                template: "busybox".into(),
                memory_mb: 64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(created.state, "running");
        c.write_file(pb::WriteFileRequest {
            id: id.clone(),
            path: "/root/marker".into(),
            content: format!("capsule {i}").into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.start_background(pb::ExecRequest {
            id: id.clone(),
            cmd: "sleep".into(),
            args: vec!["1000".into()],
            tag: "keeper".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        ids.push(id);
    }
    let sampled = history_of(&c, &ids[1], 4).await;
    // (a save comes within the interval and a sample of it)
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;

    first.kill9();
    // While the agent is down, one container dies.
    let root = format!("--root={}/runc", cfg.state_root.display());
    let out = std::process::Command::new("runc")
        .args([&root, "kill", &ids[0], "KILL"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..100 {
        let s = std::process::Command::new("runc")
            .args([&root, "state", &ids[0]])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&s.stdout).contains("\"stopped\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let second = AgentProcess::spawn(&cfg);
    let c = second.client(&cfg.data_dir);
    let list = c
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(list.capsules.len(), 10, "every capsule is known again");
    let dead = c
        .get_capsule(pb::CapsuleRef {
            id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    // Its processes are gone: stopped, with the reason, until destroyed.
    assert_eq!(dead.state, "stopped");
    assert!(dead.error.contains("container"), "{}", dead.error);
    let err = c
        .exec(pb::ExecRequest {
            id: ids[0].clone(),
            cmd: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);

    let after = history_of(&c, &ids[1], sampled.len() + 1).await;
    kept(&sampled, &after);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let (code, out) = exec(&c, id, "cat /root/marker").await;
        assert_eq!((code, out), (0, format!("capsule {i}")));
        let procs = c
            .list_processes(pb::CapsuleRef {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_owned();
        assert!(
            procs.processes.iter().any(|p| p.tag == "keeper"),
            "processes outlived the agent"
        );
    }
    // Re-adopted capsules still follow the state machine and tear down fully.
    c.pause_capsule(pb::CapsuleRef {
        id: ids[1].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.resume_capsule(pb::CapsuleRef {
        id: ids[1].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for id in &ids {
        c.destroy_capsule(pb::CapsuleRef {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut second = second;
    second.stop();
    let left = common::leftovers(&cfg, data.path());
    assert!(left.is_empty(), "{left:#?}");
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_saves_its_capsules_metrics_as_it_goes() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-restart-metrics")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    // (no save falls due while the test runs: only the one at SIGTERM)
    cfg.metrics_save_interval = std::time::Duration::from_secs(3600);
    let guard = Scrub(cfg.clone());
    let mut first = AgentProcess::spawn(&cfg);
    let c = first.client(&cfg.data_dir);
    let id = CapsuleId::random().to_string();
    c.create_capsule(pb::CreateCapsuleRequest {
        id: id.clone(),
        template: "busybox".into(),
        memory_mb: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    let sampled = history_of(&c, &id, 4).await;
    first.stop();

    let mut second = AgentProcess::spawn(&cfg);
    let c = second.client(&cfg.data_dir);
    kept(&sampled, &history_of(&c, &id, sampled.len() + 1).await);
    c.destroy_capsule(pb::CapsuleRef {
        id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    second.stop();
    let left = common::leftovers(&cfg, data.path());
    assert!(left.is_empty(), "{left:#?}");
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_readopts_its_vm_capsules() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-restart-vm")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    cfg.vm.kernel_dir = common::vm_kernel_dir();
    let guard = Scrub(cfg.clone());
    let mut first = AgentProcess::spawn(&cfg);
    let c = first.client(&cfg.data_dir);
    let id = CapsuleId::random().to_string();
    let created = c
        .create_capsule(pb::CreateCapsuleRequest {
            id: id.clone(),
            template: "busybox".into(),
            memory_mb: 256,
            engine: "vm".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        (created.state.as_str(), created.engine.as_str()),
        ("running", "vm")
    );
    let (code, _) = exec(&c, &id, "echo vm > /root/marker; sleep 1000 &").await;
    assert_eq!(code, 0);
    first.kill9();

    let second = AgentProcess::spawn(&cfg);
    let c = second.client(&cfg.data_dir);
    let got = c
        .get_capsule(pb::CapsuleRef {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!((got.state.as_str(), got.engine.as_str()), ("running", "vm"));
    assert_eq!(
        exec(
            &c,
            &id,
            "cat /root/marker; ps | grep -q '[s]leep 1000' && echo kept"
        )
        .await,
        (0, "vm\nkept\n".to_string())
    );
    let r = |id: &str| pb::CapsuleRef {
        id: id.into(),
        ..Default::default()
    };
    c.pause_capsule(r(&id)).await.unwrap();
    c.resume_capsule(r(&id)).await.unwrap();
    assert_eq!(
        exec(&c, &id, "cat /root/marker").await,
        (0, "vm\n".to_string())
    );
    c.destroy_capsule(r(&id)).await.unwrap();
    let mut second = second;
    second.stop();
    let left = common::leftovers(&cfg, data.path());
    assert!(left.is_empty(), "{left:#?}");
    drop(guard);
}

/// Removes the instance's firewall table and state even if the test fails.
struct Scrub(wrenn_agent::AgentConfig);

impl Drop for Scrub {
    fn drop(&mut self) {
        // Capsules a failed run left: delete containers, unmount, remove netns.
        let root = format!("--root={}/runc", self.0.state_root.display());
        if let Ok(out) = std::process::Command::new("runc")
            .args([&root, "list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new("runc")
                    .args([&root, "delete", "--force", id])
                    .output();
            }
        }
        // VMMs a failed run left (their command lines name the data dir).
        let _ = std::process::Command::new("pkill")
            .args(["-9", "-f", &self.0.data_dir.display().to_string()])
            .output();
        for m in wrenn_agent::rootfs::mounts_under(&self.0.data_dir) {
            let _ = wrenn_agent::rootfs::unmount_if_mounted(&m);
        }
        for (i, _) in wrenn_agent::network::list_netns(&self.0.instance) {
            let slot = wrenn_agent::network::Slot::new(&self.0.instance, i, &self.0.network.pool);
            let _ = wrenn_agent::network::destroy(&slot);
        }
        common::scrub(&self.0);
    }
}
