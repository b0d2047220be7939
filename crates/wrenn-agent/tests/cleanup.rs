//! Create/destroy cycles leave nothing behind: no netns, veth, mount,
//! cgroup, nft element, process or directory.

mod common;

use common::TestAgent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_cycles_leave_nothing() {
    let cycles: usize = std::env::var("WRENN_CLEANUP_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let t = TestAgent::start().await;
    for i in 0..cycles {
        let id = t.capsule().await;
        if i % 10 == 0 {
            assert_eq!(t.sh(&id, "echo $((1+1))").await, (0, "2\n".to_string()));
        }
        t.agent.destroy(&id).await.unwrap();
    }
    let left = t.leftovers();
    assert!(left.is_empty(), "after {cycles} cycles: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_undoes_its_steps() {
    let t = TestAgent::start().await;
    // envd cannot start: a template whose start breaks nothing but whose
    // user does not exist makes /init fail after every other step ran.
    let mut req = t.busybox();
    req.default_user = Some("nobody-here".into());
    let err = t.agent.create(req.clone()).await.unwrap_err();
    assert!(err.to_string().contains(req.id.as_str()), "{err}");
    assert_eq!(
        t.agent.info_of(&req.id).unwrap_err().kind(),
        wrenn_agent::ErrorKind::NotFound
    );
    let left = t.leftovers();
    assert!(left.is_empty(), "after a failed create: {left:#?}");
    // and the same ID can be used again
    req.default_user = None;
    t.agent.create(req).await.unwrap();
}
