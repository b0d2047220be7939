//! The full life of a busybox capsule on real runc: create, exec, files,
//! PTY, background process and reconnect, pause (frozen, clock keeps
//! time), resume, hibernate, resume, destroy; nothing left behind.

mod common;

use std::time::Duration;

use common::TestAgent;
use envd_client::{ExecEvent, ExecRequest, Selector};
use wrenn_agent::state::CapsuleState;
use wrenn_agent::ErrorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_on_busybox() {
    let t = TestAgent::start().await;
    let a = &t.agent;
    let id = t.capsule().await;
    let info = a.info_of(&id).unwrap();
    assert_eq!(info.state, CapsuleState::Running);
    assert_eq!(info.runtime, "runc");

    // exec, as PID 1's child, in its own namespaces
    let (code, out) = t
        .sh(
            &id,
            "echo hello; echo $$ > /dev/null; cat /proc/1/cmdline | tr '\\0' ' '; hostname",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("hello\n/.wrenn/envd"), "{out}");
    assert!(out.contains("capsule"), "{out}");
    let (code, _) = t.sh(&id, "exit 7").await;
    assert_eq!(code, 7);

    // files
    let cap = a.running(&id).unwrap();
    let envd = cap.envd();
    common::file_round_trip(&envd, "/home/user/a.txt").await;

    common::pty_round_trip(&envd, Duration::from_secs(10)).await;

    // background process + reconnect by tag
    let mut bg =
        ExecRequest::shell("i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done");
    bg.tag = Some("ticker".into());
    let first = envd.exec_stream(bg).await.unwrap();
    drop(first);
    let mut again = envd.attach(Selector::Tag("ticker".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(ev)) = again.next().await {
            if let ExecEvent::Stdout(b) = ev {
                if String::from_utf8_lossy(&b).contains("tick-") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(got, "reconnected stream shows output");
    drop(again);

    // pause: frozen, data operations refused by the state machine
    let (_, before) = t.sh(&id, "cat /proc/uptime").await;
    a.pause(&id).await.unwrap();
    assert_eq!(a.info_of(&id).unwrap().state, CapsuleState::Paused);
    let err = a.running(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("paused"), "{err}");
    let err = a.pause(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // frozen: envd does not answer while paused
    let health = tokio::time::timeout(Duration::from_millis(700), envd.list_processes()).await;
    assert!(health.is_err(), "a frozen envd must not answer");
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.resume(&id).await.unwrap();
    let err = a.resume(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // the clock kept time across the pause (monotonic uptime advanced ≥ 1 s)
    let (_, after) = t.sh(&id, "cat /proc/uptime").await;
    let up = |s: &str| s.split_whitespace().next().unwrap().parse::<f64>().unwrap();
    assert!(up(&after) - up(&before) >= 1.0, "{before} → {after}");
    let (_, date) = t.sh(&id, "date +%s").await;
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (date.trim().parse::<i64>().unwrap() - host).abs() <= 2,
        "{date} vs {host}"
    );
    let procs = envd.list_processes().await.unwrap();
    assert!(
        procs.iter().any(|p| p.tag.as_deref() == Some("ticker")),
        "background process survived the pause"
    );

    // hibernate: files kept; processes not (no CRIU here), and it says so
    let info = a.hibernate(&id).await.unwrap();
    assert_eq!(info.state, CapsuleState::Hibernated);
    if !a.can_checkpoint() {
        assert!(!info.memory_kept);
    }
    assert_eq!(
        a.running(&id).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    let info = a.resume(&id).await.unwrap();
    assert_eq!(info.state, CapsuleState::Running);
    assert_eq!(
        &envd.read_file("/home/user/a.txt").await.unwrap()[..],
        common::FILE_BYTES
    );
    let (code, out) = t.sh(&id, "echo back").await;
    assert_eq!((code, out.as_str()), (0, "back\n"));

    a.destroy(&id).await.unwrap();
    assert_eq!(a.info_of(&id).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        a.destroy(&id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
