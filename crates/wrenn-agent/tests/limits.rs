//! cgroup limits on real capsules: a memory hog is OOM-killed inside its
//! capsule only, a fork bomb stops at the pids limit, and the agent and a
//! neighbour keep answering throughout.

mod common;

use std::time::{Duration, Instant};

use common::TestAgent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_pids_limits_hold() {
    let t = TestAgent::start().await;
    let a = &t.agent;
    let neighbour = t.capsule().await;

    let mut req = t.busybox();
    req.memory_mb = 64;
    req.pids_limit = Some(64);
    let id = req.id.clone();
    a.create(req).await.unwrap();

    // memory hog: 256 MiB into a shell variable, in a 64 MiB capsule
    let (code, out) = t
        .sh(
            &id,
            "x=$(head -c 268435456 /dev/zero | tr '\\0' a); echo survived ${#x}",
        )
        .await;
    assert_ne!(code, 0, "the hog was not killed: {out}");
    assert!(!out.contains("survived"), "{out}");
    let m = a.metrics(&id).await.unwrap();
    assert!(
        m.usage.oom_kills >= 1,
        "the kernel's OOM killer acted in the capsule's cgroup: {m:?}"
    );
    // the capsule itself (envd, PID 1) survives and answers
    assert_eq!(t.sh(&id, "echo alive").await, (0, "alive\n".to_string()));

    // fork bomb: processes stop at the limit; envd, the agent and the neighbour answer meanwhile
    let cap = a.running(&id).unwrap();
    let mut bomb = envd_client::ExecRequest::shell("while :; do sleep 1000 & done");
    bomb.tag = Some("bomb".into());
    let _stream = cap.envd().exec_stream(bomb).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = a.metrics(&id).await.unwrap();
    assert!(m.usage.pids <= 64, "pids above the limit: {}", m.usage.pids);
    assert!(
        m.usage.pids >= 50,
        "the bomb did not reach the limit: {}",
        m.usage.pids
    );
    let started = Instant::now();
    assert_eq!(
        t.sh(&neighbour, "echo fine").await,
        (0, "fine\n".to_string())
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "neighbour slow: {:?}",
        started.elapsed()
    );
    assert!(a.list().len() == 2);
    // the capsule under attack can still be destroyed cleanly
    a.destroy(&id).await.unwrap();
    assert_eq!(
        t.sh(&neighbour, "echo still").await,
        (0, "still\n".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_limit_is_applied() {
    let t = TestAgent::start().await;
    let id = t.capsule().await;
    let path = t.agent.cgroup_path(&id);
    let cg = t.agent.cgroups();
    let quota = match cg.mode {
        wrenn_agent::cgroup::CgroupMode::V2 => {
            std::fs::read_to_string(cg.root.join(path.trim_start_matches('/')).join("cpu.max"))
                .unwrap()
        }
        _ => std::fs::read_to_string(
            cg.root
                .join("cpu")
                .join(path.trim_start_matches('/'))
                .join("cpu.cfs_quota_us"),
        )
        .unwrap(),
    };
    assert!(
        quota.starts_with("100000"),
        "1 vCPU = 100 ms per 100 ms period: {quota}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envd_outranks_its_workloads() {
    let t = TestAgent::start().await;
    let id = t.capsule().await;
    // The nice value is the 19th field of /proc/<pid>/stat: the 17th after
    // the command name's closing parenthesis.
    let script = "nice_of() { sed 's/.*) //' \"$1\" | cut -d' ' -f17; }; \
        for t in /proc/1/task/*; do nice_of $t/stat; done | sort -u; \
        echo workload $(nice_of /proc/self/stat); \
        nice -n -1 true 2>/dev/null && echo lowered || echo refused";
    let (code, out) = t.sh(&id, script).await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let [envd, workload, lowered] = lines[..] else {
        panic!("one nice value for every envd thread expected: {out}");
    };
    let workload: i32 = workload.strip_prefix("workload ").unwrap().parse().unwrap();
    let boost = wrenn_types::envd::ENVD_PRIORITY_BOOST;
    assert_eq!(envd.parse::<i32>().unwrap(), workload - boost, "{out}");
    assert_eq!(lowered, "refused", "a workload lowered its nice value");
}
