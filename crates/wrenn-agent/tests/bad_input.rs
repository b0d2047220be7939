//! Wrong requests get clear errors and leave nothing behind.

mod common;

use common::TestAgent;
use wrenn_agent::template::{RuntimeChoice, TemplateMeta};
use wrenn_agent::{Agent, ErrorKind};
use wrenn_types::ids::CapsuleId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_requests_fail_clearly() {
    let t = TestAgent::start().await;
    let a = &t.agent;

    // unknown capsule, for every verb
    let ghost = CapsuleId::random();
    for err in [
        a.info_of(&ghost).unwrap_err(),
        a.pause(&ghost).await.unwrap_err(),
        a.resume(&ghost).await.unwrap_err(),
        a.hibernate(&ghost).await.unwrap_err(),
        a.destroy(&ghost).await.unwrap_err(),
        a.ping(&ghost, None).unwrap_err(),
        a.running(&ghost).unwrap_err(),
        a.metrics(&ghost).await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert_eq!(err.to_string(), format!("capsule {ghost} not found"));
    }

    // a template that does not exist
    let mut req = t.busybox();
    req.template = "no-such-template".parse().unwrap();
    let err = a.create(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.to_string(), "template no-such-template does not exist");

    // impossible sizes
    let mut req = t.busybox();
    req.vcpus = 0;
    assert_eq!(
        a.create(req).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let mut req = t.busybox();
    req.memory_mb = 4;
    assert_eq!(
        a.create(req).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // a template whose runtime is not installed
    let name = "ghost-runtime".parse().unwrap();
    let staged = a.templates().stage(&name).unwrap();
    let mut meta = a.templates().get(&"busybox".parse().unwrap()).unwrap();
    meta.name = name;
    meta.layers.insert(0, meta.name.clone());
    meta.runtime = Some(RuntimeChoice {
        binary: "/nonexistent/bin/runc".into(),
        args: vec![],
    });
    let meta: TemplateMeta = a.templates().commit(staged, meta).unwrap();
    let mut req = t.busybox();
    req.template = meta.name.clone();
    let err = a.create(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        err.to_string(),
        "runtime /nonexistent/bin/runc is not installed"
    );

    // the same ID twice
    let id = t.capsule().await;
    let mut req = t.busybox();
    req.id = id.clone();
    assert_eq!(
        a.create(req).await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    // illegal transitions
    let err = a.resume(&id).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::FailedPrecondition,
            format!("cannot resume capsule {id}: it is running")
        )
    );
    a.pause(&id).await.unwrap();
    assert_eq!(
        a.running(&id).unwrap_err().to_string(),
        format!("cannot use capsule {id}: it is paused")
    );
    assert_eq!(
        a.ping(&id, None).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    assert!(a.proxy_target(&id, 80).is_err());
    a.hibernate(&id).await.unwrap();
    assert_eq!(
        a.pause(&id).await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    a.destroy(&id).await.unwrap();
    assert!(t.leftovers().is_empty(), "{:#?}", t.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_its_runtime_does_not_start() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(data.path());
    cfg.runtime = RuntimeChoice {
        binary: "no-such-runc".into(),
        args: vec![],
    };
    let err = Agent::open(cfg.clone()).await.unwrap_err();
    assert_eq!(err.to_string(), "runtime no-such-runc is not installed");
    let mut cfg = common::test_config(data.path());
    cfg.instance = "Bad Name".into();
    assert!(Agent::open(cfg)
        .await
        .unwrap_err()
        .to_string()
        .contains("instance"));
    common::scrub(&common::test_config(data.path()));
}
