//! envd-client against a real `envd --dev`: every call of the client's API,
//! checked end to end (the client is the code under test here, envd is real).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::{within, Envd};
use envd_client::{ClientError, EnvdClient, ExecEvent, ExecRequest, FileKind, PtySize, Selector};
use futures::StreamExt;

const LIMIT: Duration = Duration::from_secs(20);

fn client(envd: &Envd) -> EnvdClient {
    EnvdClient::new(&format!("http://{}", envd.addr())).expect("valid url")
}

fn temp() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .canonicalize()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    (dir, path)
}

#[tokio::test]
async fn rejects_urls_it_cannot_use() {
    for bad in ["", "ftp://x", "https://x", "not a url"] {
        assert!(
            matches!(EnvdClient::new(bad), Err(ClientError::InvalidUrl(_))),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn wait_healthy_succeeds_and_times_out() {
    let envd = Envd::start();
    within("healthy", LIMIT, client(&envd).wait_healthy(LIMIT))
        .await
        .unwrap();
    // Nothing listens on port 1.
    let dead = EnvdClient::new("http://127.0.0.1:1").unwrap();
    let err = dead
        .wait_healthy(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotHealthy(_)), "{err}");
}

#[tokio::test]
async fn exec_collects_output_and_exit_code() {
    let envd = Envd::start();
    let c = client(&envd);
    let mut req =
        ExecRequest::shell("printf out; printf err >&2; echo \"$GREETING\" ; pwd; exit 7");
    req.envs.insert("GREETING".into(), "hi there".into());
    req.cwd = Some("/tmp".into());
    let out = within("exec", LIMIT, c.exec(req)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "outhi there\n/tmp\n");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.exit_code, 7);
    assert_eq!(out.status, "exit status 7");
    assert!(out.pid > 0);
}

#[tokio::test]
async fn exec_stream_orders_events_and_closes_after_end() {
    let envd = Envd::start();
    let c = client(&envd);
    let mut s = c
        .exec_stream(ExecRequest::shell("echo a; sleep 0.2; echo b"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(ev) = within("event", LIMIT, s.next()).await {
        seen.push(ev.unwrap());
    }
    assert_eq!(
        seen.first(),
        Some(&ExecEvent::Stdout(Bytes::from_static(b"a\n")))
    );
    assert_eq!(
        seen.get(1),
        Some(&ExecEvent::Stdout(Bytes::from_static(b"b\n")))
    );
    assert!(matches!(
        seen.last(),
        Some(ExecEvent::End {
            exit_code: 0,
            exited: true,
            ..
        })
    ));
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn dropping_a_stream_detaches_and_attach_sees_new_output() {
    let envd = Envd::start();
    let c = client(&envd);
    let mut req = ExecRequest::shell("read line; echo got:$line; sleep 60");
    req.stdin = true;
    req.tag = Some("detach-me".into());
    let s = c.exec_stream(req).await.unwrap();
    let pid = s.pid;
    drop(s); // cancellation: the reader stops, the process does not
    let procs = c.list_processes().await.unwrap();
    assert!(procs
        .iter()
        .any(|p| p.pid == pid && p.tag.as_deref() == Some("detach-me")));

    let mut attached = c.attach(Selector::Tag("detach-me".into())).await.unwrap();
    assert_eq!(attached.pid, pid);
    c.stdin_write(Selector::Pid(pid), b"hello\n").await.unwrap();
    let ev = within("attached output", LIMIT, attached.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev, ExecEvent::Stdout(Bytes::from_static(b"got:hello\n")));

    assert!(c.kill(Selector::Pid(pid)).await.unwrap());
    let end = within("end", LIMIT, attached.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(end, ExecEvent::End { exit_code: -1, exited: false, ref status, .. } if status == "signal: killed")
    );
    assert!(
        !c.kill(Selector::Pid(pid)).await.unwrap(),
        "a dead pid is not killable"
    );
    assert!(!c.kill(Selector::Pid(999_999)).await.unwrap());
}

#[tokio::test]
async fn exec_timeout_kills_the_process() {
    let envd = Envd::start();
    let c = client(&envd);
    let mut req = ExecRequest::shell("sleep 30");
    req.timeout = Some(Duration::from_millis(500));
    let err = within("timeout", LIMIT, c.exec(req)).await.unwrap_err();
    match err {
        ClientError::Rpc(e) => assert_eq!(e.code, connectrpc::ErrorCode::DeadlineExceeded),
        other => panic!("expected deadline_exceeded, got {other}"),
    }
    // The kill and the stream's end race; the process is gone moments later.
    within("the killed process to leave the table", LIMIT, async {
        while c
            .list_processes()
            .await
            .unwrap()
            .iter()
            .any(|p| p.cmd == "/bin/sh")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Read terminal output into `screen` until it shows `needle`.
async fn read_until(term: &mut envd_client::ExecStream, screen: &mut String, needle: &str) {
    within(needle, LIMIT, async {
        while !screen.contains(needle) {
            match term.next().await {
                Some(Ok(ExecEvent::Pty(b))) => screen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn pty_round_trip_resize_and_kill() {
    let envd = Envd::start();
    let c = client(&envd);
    let mut term = c
        .pty_start(ExecRequest {
            pty: Some(PtySize {
                cols: 100,
                rows: 30,
            }),
            ..ExecRequest::terminal()
        })
        .await
        .unwrap();
    let pid = term.pid;
    let mut screen = String::new();
    c.pty_input(Selector::Pid(pid), b"stty size\n")
        .await
        .unwrap();
    read_until(&mut term, &mut screen, "30 100").await;
    c.pty_resize(Selector::Pid(pid), 120, 40).await.unwrap();
    c.pty_input(Selector::Pid(pid), b"stty size\n")
        .await
        .unwrap();
    read_until(&mut term, &mut screen, "40 120").await;
    assert!(c.kill(Selector::Pid(pid)).await.unwrap());
    let end = within("pty end", LIMIT, async {
        loop {
            match term.next().await {
                Some(Ok(ExecEvent::Pty(_))) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(end, Some(Ok(ExecEvent::End { exit_code: -1, .. }))),
        "{end:?}"
    );
    // The ended terminal's master is closed at once, not when the process
    // leaves the retained list.
    let ptmx_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", envd.pid()))
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.ends_with("ptmx")))
            .count()
    };
    within("the pty master to close", LIMIT, async {
        while ptmx_fds() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Input to a pipe process through the PTY channel is refused.
    let s = c.exec_stream(ExecRequest::shell("sleep 5")).await.unwrap();
    let err = c.pty_input(Selector::Pid(s.pid), b"x").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rpc(ref e) if e.code == connectrpc::ErrorCode::Internal),
        "{err}"
    );
    c.kill(Selector::Pid(s.pid)).await.unwrap();
}

#[tokio::test]
async fn files_round_trip_unary_and_streaming() {
    let envd = Envd::start();
    let c = client(&envd);
    let (_dir, dir) = temp();
    let small = format!("{dir}/nested/deeper/a \"quoted\".bin");
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    c.write_file(&small, Bytes::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(c.read_file(&small).await.unwrap(), data);

    let big = format!("{dir}/big.bin");
    let chunk = Bytes::from(vec![7u8; 1 << 20]);
    let body = futures::stream::iter((0..10).map(move |_| Ok(chunk.clone())));
    within("upload", LIMIT, c.write_file_stream(&big, body))
        .await
        .unwrap();
    let mut total = 0usize;
    let mut s = c.read_file_stream(&big).await.unwrap();
    while let Some(b) = s.next().await {
        let b = b.unwrap();
        assert!(b.iter().all(|x| *x == 7));
        total += b.len();
    }
    assert_eq!(total, 10 << 20);

    let info = c.stat(&big).await.unwrap();
    assert_eq!(
        (info.kind, info.size, info.mode),
        (FileKind::File, 10 << 20, 0o644)
    );
    assert_eq!(info.permissions, "-rw-r--r--");

    let missing = c.read_file(&format!("{dir}/nope")).await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert_eq!(missing.status(), Some(404));
    assert!(c
        .stat(&format!("{dir}/nope"))
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn directories_list_make_rename_remove() {
    let envd = Envd::start();
    let c = client(&envd);
    let (_dir, dir) = temp();
    assert!(c.make_dir(&format!("{dir}/x/y")).await.unwrap());
    assert!(
        !c.make_dir(&format!("{dir}/x/y")).await.unwrap(),
        "second make_dir reports existing"
    );
    c.write_file(&format!("{dir}/x/y/f"), Bytes::from_static(b"1"))
        .await
        .unwrap();
    let one = c.list_dir(&dir, 1).await.unwrap();
    assert_eq!(
        one.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["x"]
    );
    let all = c.list_dir(&dir, 3).await.unwrap();
    let paths: Vec<_> = all
        .iter()
        .map(|e| e.path.strip_prefix(&dir).unwrap().to_string())
        .collect();
    assert_eq!(paths, ["/x", "/x/y", "/x/y/f"]);
    assert_eq!(all[0].kind, FileKind::Dir);

    let moved = c
        .rename(&format!("{dir}/x/y/f"), &format!("{dir}/z/g"))
        .await
        .unwrap();
    assert_eq!(moved.path, format!("{dir}/z/g"));
    c.remove(&format!("{dir}/x")).await.unwrap();
    c.remove(&format!("{dir}/x")).await.unwrap(); // missing is fine
    let left = c.list_dir(&dir, 2).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["z", "g"]
    );
}

#[tokio::test]
async fn init_sets_defaults_and_snapshot_prepare_answers() {
    let envd = Envd::start();
    let c = client(&envd);
    let env = BTreeMap::from([("CAPSULE_FLAVOUR".to_string(), "mint".to_string())]);
    c.post_init(Some("root"), env).await.unwrap();
    let out = c
        .exec(ExecRequest::shell("echo $CAPSULE_FLAVOUR $USER"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"mint root\n");
    let err = c
        .post_init(Some("no-such-user"), BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    c.prepare_snapshot().await.unwrap();
    let m = c.metrics().await.unwrap();
    assert!(
        m.mem_total > 0 && m.cpu_count > 0 && m.disk_total > 0,
        "{m:?}"
    );
}

#[tokio::test]
async fn access_token_is_sent_on_every_call() {
    let envd = Envd::start_with_token("s3cret").await;
    let url = format!("http://{}", envd.addr());
    let anonymous = EnvdClient::new(&url).unwrap();
    let err = anonymous
        .exec(ExecRequest::shell("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Rpc(ref e) if e.code == connectrpc::ErrorCode::Unauthenticated),
        "{err}"
    );
    assert_eq!(
        anonymous
            .read_file("/etc/hostname")
            .await
            .unwrap_err()
            .status(),
        Some(401)
    );
    let authed = EnvdClient::with_access_token(&url, "s3cret").unwrap();
    assert_eq!(
        authed
            .exec(ExecRequest::shell("echo ok"))
            .await
            .unwrap()
            .stdout,
        b"ok\n"
    );
    authed.read_file("/etc/hostname").await.unwrap();
}

/// A process that writes and exits at once must not lose its output (the
/// pumps once missed data the reactor had not reported readable yet).
#[tokio::test]
async fn fast_exits_never_lose_output() {
    let envd = Envd::start();
    let c = client(&envd);
    for i in 0..150 {
        let out = within(
            "exec",
            LIMIT,
            c.exec(ExecRequest::new("/bin/echo", [format!("n{i}")])),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, format!("n{i}\n").as_bytes(), "run {i}");
    }
}
