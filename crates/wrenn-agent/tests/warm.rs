//! Warm pools: capsules booted in advance are handed out under the
//! requested ID with the request's settings, refilled, and dropped when a
//! restarted agent finds them unclaimed.

mod common;

use common::TestAgent;
use wrenn_agent::config::WarmPool;
use wrenn_agent::template::Engine;
use wrenn_agent::{Agent, CreateRequest};
use wrenn_types::ids::CapsuleId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_capsules_are_claimed_and_refilled() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-warm")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    let busybox = "busybox".parse().unwrap();
    cfg.warm_pools = vec![WarmPool {
        template: "busybox".parse().unwrap(),
        engine: None,
        size: 2,
        vcpus: 1,
        memory_mb: 256,
    }];
    let agent = Agent::open(cfg.clone()).await.unwrap();
    let t = TestAgent {
        agent: agent.clone(),
        data,
        cfg: cfg.clone(),
        engine: None,
    };
    agent.fill_warm_pools().await;
    assert_eq!(agent.warm_count(&busybox), 2);
    assert!(agent.list().is_empty(), "warm capsules are nobody's");

    let mut req = CreateRequest::new(CapsuleId::random(), busybox.clone());
    req.memory_mb = 256;
    req.env.insert("GREETING".into(), "hi".into());
    req.internet = false;
    req.timeout_sec = 300;
    let id = req.id.clone();
    let info = agent.create(req).await.unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.timeout_sec, 300);
    assert!(!info.internet);
    assert_eq!(agent.warm_count(&busybox), 1, "taken from the pool");
    let (code, out) = t.sh(&id, "echo $GREETING $WRENN_SANDBOX_ID").await;
    assert_eq!((code, out), (0, format!("hi {id}\n")));
    assert_eq!(agent.list().len(), 1);

    // a request of another shape boots a capsule of its own
    let mut other = t.busybox();
    other.memory_mb = 64;
    agent.create(other).await.unwrap();
    assert_eq!(agent.warm_count(&busybox), 1);

    agent.fill_warm_pools().await;
    assert_eq!(agent.warm_count(&busybox), 2, "refilled");

    // A new agent on the same data dir drops the unclaimed warm capsules
    // and keeps the claimed one.
    let mut cfg2 = cfg.clone();
    cfg2.warm_pools.clear();
    let again = Agent::open(cfg2).await.unwrap();
    assert_eq!(again.list().len(), 2);
    assert_eq!(again.warm_count(&busybox), 0);
    let dirs = std::fs::read_dir(t.data.path().join("capsules"))
        .unwrap()
        .count();
    assert_eq!(dirs, 2, "the warm capsules' directories are gone");
    again.destroy_all().await;
    drop(again);
    drop(t);
    let left = common::leftovers(&cfg, std::path::Path::new("/nonexistent"));
    assert!(left.is_empty(), "{left:#?}");
}

/// A pool of VM capsules for a template whose default engine is OCI: a
/// request for a VM takes one (a booted guest: no boot on the request's
/// path), a request for the template's default does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_vm_capsules_are_claimed() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-warm-vm")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    cfg.vm.kernel_dir = common::vm_kernel_dir();
    let busybox: wrenn_types::ids::TemplateName = "busybox".parse().unwrap();
    cfg.warm_pools = vec!["busybox:vm=1".parse().unwrap()];
    cfg.warm_pools[0].memory_mb = 256;
    let agent = Agent::open(cfg.clone()).await.unwrap();
    let t = TestAgent {
        agent: agent.clone(),
        data,
        cfg: cfg.clone(),
        engine: Some(Engine::Vm),
    };
    agent.fill_warm_pools().await;
    assert_eq!(agent.warm_count(&busybox), 1);

    // the template's default engine (OCI): not from the pool
    let oci = {
        let mut r = t.busybox();
        r.engine = None;
        r.memory_mb = 256;
        r
    };
    let info = agent.create(oci).await.unwrap();
    assert_eq!(info.engine, Engine::Oci);
    assert_eq!(agent.warm_count(&busybox), 1);

    let req = t.busybox();
    let id = req.id.clone();
    let t0 = std::time::Instant::now();
    let info = agent.create(req).await.unwrap();
    let claimed_in = t0.elapsed();
    assert_eq!(info.engine, Engine::Vm);
    assert_eq!(agent.warm_count(&busybox), 0, "taken from the pool");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (code, out) = t.sh(&id, "echo $WRENN_SANDBOX_ID; uname -r").await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], id.as_str());
    assert_ne!(
        lines[1],
        host_kernel.trim(),
        "a guest kernel, not the host's"
    );
    eprintln!("a warm VM capsule claimed in {claimed_in:?}");

    agent.destroy_all().await;
    let left = t.leftovers();
    assert!(left.is_empty(), "{left:#?}");
}

fn internet_set(instance: &str) -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "set", "inet", instance, "internet"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_network_slots_are_used_and_drained() {
    let data = tempfile::Builder::new()
        .prefix("wrenn-netpool")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut cfg = common::test_config(data.path());
    cfg.net_pool = 2;
    let agent = Agent::open(cfg.clone()).await.unwrap();
    let t = TestAgent {
        agent: agent.clone(),
        data,
        cfg: cfg.clone(),
        engine: None,
    };
    agent.fill_net_pool().await;
    assert_eq!(
        wrenn_agent::network::list_netns(&cfg.instance).len(),
        2,
        "two slots prepared"
    );

    let mut offline = t.busybox();
    offline.internet = false;
    let off = offline.id.clone();
    let info = agent.create(offline).await.unwrap();
    let off_ip = info.ip.unwrap().to_string();
    assert!(
        !internet_set(&cfg.instance).contains(&off_ip),
        "a prepared slot had its internet switched off"
    );
    let on = t.capsule().await;
    let on_ip = agent.info_of(&on).unwrap().ip.unwrap().to_string();
    assert!(internet_set(&cfg.instance).contains(&on_ip));
    assert_eq!(t.sh(&off, "echo ok").await, (0, "ok\n".to_string()));
    assert_eq!(
        wrenn_agent::network::list_netns(&cfg.instance).len(),
        2,
        "both taken, none built inline"
    );

    agent.fill_net_pool().await;
    assert_eq!(wrenn_agent::network::list_netns(&cfg.instance).len(), 4);
    agent.destroy_all().await;
    let left = t.leftovers();
    assert!(left.is_empty(), "{left:#?}");
}
