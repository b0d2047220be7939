//! The agent RPC over the wire (Connect, binary protobuf, h2c): streams,
//! terminals, chunked file transfer, snapshots, and the errors bad
//! requests get.

mod common;

use std::net::SocketAddr;

use common::TestAgent;
use connectrpc::ErrorCode;
use wrenn_agent::server::AgentServer;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::process_event::Event;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::write_file_stream_request::Msg;
use wrenn_types::ids::CapsuleId;

async fn serve(t: &TestAgent) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let server = AgentServer::new(t.agent.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(l, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

fn cref(id: &str) -> pb::CapsuleRef {
    pb::CapsuleRef {
        id: id.into(),
        ..Default::default()
    }
}

type EventStream = connectrpc::client::ServerStream<
    <connectrpc::client::HttpClient as connectrpc::client::ClientTransport>::ResponseBody,
    pb::__buffa::view::ProcessEventView<'static>,
>;

async fn events(stream: &mut EventStream, until: &str) -> (Vec<Event>, String) {
    let mut seen = Vec::new();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while let Ok(Ok(Some(m))) =
        tokio::time::timeout_at(deadline, stream.message::<pb::ProcessEvent>()).await
    {
        let ev = m.to_owned_message().event.unwrap();
        if let Event::Stdout(b) | Event::Pty(b) = &ev {
            text.push_str(&String::from_utf8_lossy(b));
        }
        let end = matches!(ev, Event::Ended(_));
        seen.push(ev);
        if end || (!until.is_empty() && text.contains(until)) {
            break;
        }
    }
    (seen, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rpc_over_the_wire() {
    let t = TestAgent::start().await;
    let (addr, _stop) = serve(&t).await;
    let c = common::rpc_client(addr, t.agent.token());

    // bad IDs and unknown capsules
    let err = c.get_capsule(cref("../etc")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(
        err.message
            .as_deref()
            .unwrap_or("")
            .contains("invalid capsule ID"),
        "{err:?}"
    );
    let err = c
        .get_capsule(cref(CapsuleId::random().as_str()))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let err = c
        .create_capsule(pb::CreateCapsuleRequest {
            id: CapsuleId::random().into(),
            template: "nope/../x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = c
        .create_capsule(pb::CreateCapsuleRequest {
            id: CapsuleId::random().into(),
            template: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);

    let id = CapsuleId::random().to_string();
    let cap = c
        .create_capsule(pb::CreateCapsuleRequest {
            id: id.clone(),
            template: "busybox".into(),
            memory_mb: 128,
            env: [("FROM_CREATE".to_string(), "yes".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        (cap.state.as_str(), cap.template.as_str(), cap.memory_mb),
        ("running", "busybox", 128)
    );
    assert!(cap.metadata.contains_key("agent_version"));

    // unary exec with env, cwd and a non-zero exit
    let r = c
        .exec(pb::ExecRequest {
            id: id.clone(),
            cmd: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo $FROM_CREATE $X; pwd; echo oops >&2; exit 3".into(),
            ],
            envs: [("X".to_string(), "1".to_string())].into_iter().collect(),
            cwd: "/tmp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (3, &b"yes 1\n/tmp\n"[..], &b"oops\n"[..])
    );

    // streaming exec: started, output, ended
    let mut s = c
        .exec_stream(pb::ExecRequest {
            id: id.clone(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "for i in 1 2 3; do echo line$i; done".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (evs, text) = events(&mut s, "").await;
    assert!(matches!(evs.first(), Some(Event::Started(_))));
    assert!(matches!(evs.last(), Some(Event::Ended(e)) if e.exit_code == 0));
    assert_eq!(text, "line1\nline2\nline3\n");

    // background + connect by tag + list + stdin + kill
    let started = c
        .start_background(pb::ExecRequest {
            id: id.clone(),
            cmd: "cat".into(),
            tag: "echoer".into(),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(started.tag, "echoer");
    let mut s = c
        .connect_process(pb::ProcessRef {
            id: id.clone(),
            selector: Some(pb::__buffa::oneof::process_ref::Selector::Tag(
                "echoer".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    c.send_stdin(pb::StdinRequest {
        id: id.clone(),
        selector: Some(pb::__buffa::oneof::stdin_request::Selector::Tag(
            "echoer".into(),
        )),
        data: b"ping\n".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, text) = events(&mut s, "ping").await;
    assert_eq!(text, "ping\n");
    let list = c.list_processes(cref(&id)).await.unwrap().into_owned();
    assert!(list
        .processes
        .iter()
        .any(|p| p.tag == "echoer" && p.pid == started.pid));
    c.kill_process(pb::KillProcessRequest {
        id: id.clone(),
        selector: Some(pb::__buffa::oneof::kill_process_request::Selector::Tag(
            "echoer".into(),
        )),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .kill_process(pb::KillProcessRequest {
            id: id.clone(),
            selector: Some(pb::__buffa::oneof::kill_process_request::Selector::Pid(
                99999,
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let err = c
        .kill_process(pb::KillProcessRequest {
            id: id.clone(),
            signal: "SIGHUP".into(),
            selector: Some(pb::__buffa::oneof::kill_process_request::Selector::Pid(1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    // PTY: start, input, resize (seen by stty), reattach by tag, kill
    let mut p = c
        .pty_attach(pb::PtyAttachRequest {
            id: id.clone(),
            tag: "term".into(),
            cmd: "/bin/sh".into(),
            args: vec!["-i".into()],
            cols: 80,
            rows: 24,
            ..Default::default()
        })
        .await
        .unwrap();
    c.pty_resize(pb::PtyResizeRequest {
        id: id.clone(),
        tag: "term".into(),
        cols: 132,
        rows: 43,
        ..Default::default()
    })
    .await
    .unwrap();
    c.pty_input(pb::PtyInputRequest {
        id: id.clone(),
        tag: "term".into(),
        data: b"stty size\n".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, text) = events(&mut p, "43 132").await;
    assert!(text.contains("43 132"), "{text}");
    drop(p);
    let mut again = c
        .pty_attach(pb::PtyAttachRequest {
            id: id.clone(),
            tag: "term".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.pty_input(pb::PtyInputRequest {
        id: id.clone(),
        tag: "term".into(),
        data: b"echo re$((1+1))\n".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, text) = events(&mut again, "re2").await;
    assert!(text.contains("re2"), "{text}");
    c.pty_kill(pb::PtyRef {
        id: id.clone(),
        tag: "term".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .pty_resize(pb::PtyResizeRequest {
            id: id.clone(),
            tag: "term".into(),
            cols: 0,
            rows: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    // files: 1 MiB of varied bytes up in 64 KiB chunks, down as a stream
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut msgs = vec![pb::WriteFileStreamRequest {
        msg: Some(Msg::Meta(Box::new(pb::FileMeta {
            id: id.clone(),
            path: "/data/blob.bin".into(),
            ..Default::default()
        }))),
        ..Default::default()
    }];
    msgs.extend(data.chunks(64 << 10).map(|ch| pb::WriteFileStreamRequest {
        msg: Some(Msg::Chunk(ch.to_vec())),
        ..Default::default()
    }));
    // without its end message, an upload is cut short: nothing is written
    let cut = c
        .write_file_stream(futures::stream::iter(msgs.clone()))
        .await
        .unwrap_err();
    assert_eq!(cut.code, ErrorCode::Canceled, "{cut:?}");
    // (a new file is written in place, as E2B's envd does, and removed
    // once envd sees the body broken, which can be just after the agent
    // answered: the full suite's load opened that gap)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let read = c
            .read_file(pb::PathRequest {
                id: id.clone(),
                path: "/data/blob.bin".into(),
                ..Default::default()
            })
            .await;
        match read {
            Err(gone) if gone.code == ErrorCode::NotFound => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "a cut upload left a file: {:?}",
                other.map(|r| r.into_owned().content.len())
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    msgs.push(pb::WriteFileStreamRequest {
        msg: Some(Msg::End(true)),
        ..Default::default()
    });
    c.write_file_stream(futures::stream::iter(msgs))
        .await
        .unwrap();
    let mut rs = c
        .read_file_stream(pb::PathRequest {
            id: id.clone(),
            path: "/data/blob.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut back = Vec::new();
    let mut biggest = 0;
    while let Some(m) = rs.message::<pb::FileChunk>().await.unwrap() {
        let data = m.to_owned_message().data;
        biggest = biggest.max(data.len());
        back.extend_from_slice(&data);
    }
    assert!(biggest <= 64 << 10, "a {biggest}-byte chunk");
    assert!(
        back == data,
        "round trip of {} bytes, got {}",
        data.len(),
        back.len()
    );
    let err = c
        .write_file_stream(futures::stream::iter(vec![pb::WriteFileStreamRequest {
            msg: Some(Msg::Chunk(b"x".to_vec())),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "chunk before meta");

    c.write_file(pb::WriteFileRequest {
        id: id.clone(),
        path: "/data/small.txt".into(),
        content: b"small".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = c
        .read_file(pb::PathRequest {
            id: id.clone(),
            path: "/data/small.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.content, b"small");
    let made = c
        .make_dir(pb::PathRequest {
            id: id.clone(),
            path: "/data/sub/dir".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(made.created);
    let list = c
        .list_dir(pb::PathRequest {
            id: id.clone(),
            path: "/data".into(),
            depth: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    let mut names: Vec<(String, String)> = list
        .entries
        .iter()
        .map(|e| (e.path.clone(), e.r#type.clone()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("/data/blob.bin".into(), "file".into()),
            ("/data/small.txt".into(), "file".into()),
            ("/data/sub".into(), "directory".into()),
            ("/data/sub/dir".into(), "directory".into()),
        ]
    );
    c.remove_path(pb::PathRequest {
        id: id.clone(),
        path: "/data/small.txt".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .read_file(pb::PathRequest {
            id: id.clone(),
            path: "/data/small.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let err = c
        .read_file(pb::PathRequest {
            id: id.clone(),
            path: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    // metrics
    let m = c.get_metrics(cref(&id)).await.unwrap().into_owned();
    assert!(
        m.memory_bytes > 0 && m.pids >= 1 && m.disk_bytes >= 1 << 20,
        "{m:?}"
    );

    // snapshot → template → a new capsule that has the file; the template is in use
    let tpl = c
        .create_snapshot(pb::SnapshotRequest {
            id: id.clone(),
            name: "with-blob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        tpl.layers,
        vec!["with-blob".to_string(), "busybox".to_string()]
    );
    assert_eq!(
        c.get_capsule(cref(&id)).await.unwrap().into_owned().state,
        "paused"
    );
    let err = c
        .exec(pb::ExecRequest {
            id: id.clone(),
            cmd: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
    let child = CapsuleId::random().to_string();
    c.create_capsule(pb::CreateCapsuleRequest {
        id: child.clone(),
        template: "with-blob".into(),
        memory_mb: 128,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = c
        .exec(pb::ExecRequest {
            id: child.clone(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "wc -c < /data/blob.bin; ls /data".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "1048576\nblob.bin\nsub\n"
    );
    let templates = c
        .list_templates(pb::Empty::default())
        .await
        .unwrap()
        .into_owned();
    assert!(templates.templates.iter().any(|t| t.name == "with-blob"));
    let err = c
        .delete_template(pb::TemplateRef {
            name: "with-blob".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "in use by a capsule");
    c.destroy_capsule(cref(&child)).await.unwrap();
    c.delete_template(pb::TemplateRef {
        name: "with-blob".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // lifecycle verbs over RPC
    let r = c.resume_capsule(cref(&id)).await.unwrap().into_owned();
    assert_eq!(r.state, "running");
    let r = c
        .ping_capsule(pb::PingRequest {
            id: id.clone(),
            timeout_sec: Some(600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.timeout_sec, 600);
    let r = c
        .set_internet(pb::SetInternetRequest {
            id: id.clone(),
            enabled: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(!r.internet);
    let r = c.hibernate_capsule(cref(&id)).await.unwrap().into_owned();
    assert_eq!(r.state, "hibernated");
    let err = c.pause_capsule(cref(&id)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
    c.destroy_capsule(cref(&id)).await.unwrap();
    let err = c.destroy_capsule(cref(&id)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let left = t.leftovers();
    assert!(left.is_empty(), "{left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_pauses_or_destroys_idle_capsules() {
    let t = TestAgent::start().await;
    let (addr, _stop) = serve(&t).await;
    let c = common::rpc_client(addr, t.agent.token());
    let mut told = t.agent.subscribe_auto_pauses();
    let pausing = CapsuleId::random().to_string();
    let dying = CapsuleId::random().to_string();
    for (id, destroy) in [(&pausing, false), (&dying, true)] {
        c.create_capsule(pb::CreateCapsuleRequest {
            id: id.clone(),
            template: "busybox".into(),
            memory_mb: 64,
            timeout_sec: 3,
            destroy_on_timeout: destroy,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // activity (ping) keeps them alive past their timeout
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        c.ping_capsule(pb::PingRequest {
            id: pausing.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.ping_capsule(pb::PingRequest {
            id: dying.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let ok = common::eventually(8, || t.agent.info_of(&dying.parse().unwrap()).is_err()).await;
    assert!(ok, "destroyed after its timeout");
    let p = pausing.parse().unwrap();
    assert!(
        common::eventually(8, || t
            .agent
            .info_of(&p)
            .map(|i| i.state.as_str() == "paused")
            .unwrap_or(false))
        .await
    );
    let list = c
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(list.auto_paused_ids, vec![pausing.clone()]);
    let list = c
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert!(list.auto_paused_ids.is_empty(), "drained on read");
    // and as it happened, to whoever follows them (the pause only)
    assert_eq!(
        told.try_recv().map(|id| id.to_string()),
        Ok(pausing.clone())
    );
    assert!(told.try_recv().is_err(), "one pause, one report");
}

/// A 64 MiB `busybox` capsule with an inactivity timeout of `timeout_sec`
/// (0: none); its ID.
async fn busybox(c: &common::RpcClient, timeout_sec: u64) -> String {
    let id = CapsuleId::random().to_string();
    c.create_capsule(pb::CreateCapsuleRequest {
        id: id.clone(),
        template: "busybox".into(),
        memory_mb: 64,
        timeout_sec,
        ..Default::default()
    })
    .await
    .unwrap();
    id
}

/// `sh -c script` streamed, once its output shows `first`.
async fn sh_stream(c: &common::RpcClient, id: &str, script: &str, first: &str) -> EventStream {
    let mut s = c
        .exec_stream(pb::ExecRequest {
            id: id.into(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    if !first.is_empty() {
        let (_, text) = events(&mut s, first).await;
        assert!(text.contains(first), "{text:?}");
    }
    s
}

/// The stream's next item: the pause's `failed_precondition`, within `wait`.
async fn ends_paused(s: &mut EventStream, wait: std::time::Duration) {
    let end = tokio::time::timeout(wait, s.message::<pb::ProcessEvent>())
        .await
        .expect("the stream ended in time");
    let err = end.map(|m| m.map(|m| m.to_owned_message())).unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition, "{err:?}");
    assert!(
        err.message.as_deref().unwrap_or("").contains("was paused"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_activity_and_end_when_their_capsule_pauses() {
    let t = TestAgent::start().await;
    let (addr, _stop) = serve(&t).await;
    let c = common::rpc_client(addr, t.agent.token());
    let id = busybox(&c, 2).await;
    let state = || t.agent.info_of(&id.parse().unwrap()).unwrap().state;
    // printing for 5 s, past its 2 s timeout, with no call meanwhile: the
    // output watched is activity, so the reaper leaves it running
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.5; done";
    let mut s = sh_stream(&c, &id, script, "").await;
    let (evs, text) = events(&mut s, "").await;
    assert!(
        matches!(evs.last(), Some(Event::Ended(e)) if e.exit_code == 0),
        "{evs:?}"
    );
    assert_eq!(text.lines().count(), 10, "{text:?}");
    assert_eq!(state().as_str(), "running");
    // a silent command: the reaper pauses the capsule, and the stream ends
    // then, instead of waiting on a frozen envd
    let mut s = sh_stream(&c, &id, "echo go; sleep 60", "go").await;
    ends_paused(&mut s, std::time::Duration::from_secs(10)).await;
    assert_eq!(state().as_str(), "paused");
    // the process lives on: resumed, it can be attached to again
    c.resume_capsule(cref(&id)).await.unwrap();
    let list = c.list_processes(cref(&id)).await.unwrap().into_owned();
    assert!(
        list.processes
            .iter()
            .any(|p| p.args.iter().any(|a| a.contains("sleep 60"))),
        "{list:?}"
    );
    c.destroy_capsule(cref(&id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_a_pause_racing_are_serialized() {
    let t = TestAgent::start().await;
    let (addr, _stop) = serve(&t).await;
    let c = common::rpc_client(addr, t.agent.token());
    let id = busybox(&c, 0).await;
    // a stream open across a snapshot ends with it (the snapshot pauses)
    let mut s = sh_stream(&c, &id, "echo go; sleep 60", "go").await;
    for i in 0..8 {
        let snap = c.create_snapshot(pb::SnapshotRequest {
            id: id.clone(),
            name: format!("race-{i}"),
            ..Default::default()
        });
        let (snap, pause) = tokio::join!(snap, c.pause_capsule(cref(&id)));
        // whichever came second found the capsule paused: a clean refusal,
        // never runc's "container not running"
        snap.unwrap();
        if let Err(e) = pause {
            assert_eq!(e.code, ErrorCode::FailedPrecondition, "round {i}: {e:?}");
        }
        let state = t.agent.info_of(&id.parse().unwrap()).unwrap().state;
        assert_eq!(state.as_str(), "paused");
        if i == 0 {
            ends_paused(&mut s, std::time::Duration::from_secs(10)).await;
        }
        c.resume_capsule(cref(&id)).await.unwrap();
    }
    c.destroy_capsule(cref(&id)).await.unwrap();
    for i in 0..8 {
        c.delete_template(pb::TemplateRef {
            name: format!("race-{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// A raw HTTP/1.1 GET to the agent, with `token` if given: the status and
/// body, or None if nothing came back within `wait`.
async fn http_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    wait: std::time::Duration,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| {
        format!("{}: {t}\r\n", wrenn_agent::auth::AGENT_TOKEN_HEADER)
    });
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut out))
        .await
        .ok()?
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text))
}

/// Only the holder of the agent's token drives it: RPC and port proxy
/// without it (or with another) are refused as unauthenticated, `/health`
/// stays open, and the token stops at the agent: a capsule's server never
/// sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_wants_its_token() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestAgent::start().await;
    let (addr, _stop) = serve(&t).await;
    let token = t.agent.token().to_string();
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()));
    let file = t.data.path().join(wrenn_agent::auth::TOKEN_FILE);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let unknown = CapsuleId::random().to_string();
    let bare = common::RpcClient::new(
        connectrpc::client::HttpClient::plaintext(),
        connectrpc::client::ClientConfig::new(format!("http://{addr}").parse().unwrap()),
    );
    let err = bare.get_capsule(cref(&unknown)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthenticated, "{err:?}");
    let wrong = common::rpc_client(addr, &"0".repeat(64));
    let err = wrong.get_capsule(cref(&unknown)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthenticated, "{err:?}");
    let right = common::rpc_client(addr, &token);
    let err = right.get_capsule(cref(&unknown)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");

    let wait = std::time::Duration::from_secs(10);
    assert_eq!(http_get(addr, "/health", None, wait).await.unwrap().0, 200);
    let id = t.capsule().await;
    let proxied = format!("/proxy/{id}/8000/");
    let (status, body) = http_get(addr, &proxied, None, wait).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthenticated"), "{body}");
    let (status, _) = http_get(addr, &proxied, Some("nope"), wait).await.unwrap();
    assert_eq!(status, 401);

    // what a capsule's server receives through the proxy
    // (nc's stdin stays open: at its end busybox nc hangs up, which under
    // load came before the request had been read)
    t.spawn(&id, "nc", "sleep 60 | nc -l -p 8000 > /tmp/request")
        .await;
    // port 8000 is 1F40; state 0A is LISTEN
    let listening = "i=0; while [ $i -lt 100 ]; do \
         grep -qs ':1F40 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 && exit 0; i=$((i+1)); sleep 0.1; done; exit 1";
    assert_eq!(t.sh(&id, listening).await.0, 0, "nc never listened");
    let short = std::time::Duration::from_secs(2);
    let _ = http_get(addr, &proxied, Some(&token), short).await;
    let (_, seen) = t
        .sh(
            &id,
            "i=0; while [ ! -s /tmp/request ] && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done; \
             cat /tmp/request",
        )
        .await;
    assert!(seen.starts_with("GET / HTTP/1.1"), "{seen:?}");
    assert!(
        !seen
            .to_ascii_lowercase()
            .contains(wrenn_agent::auth::AGENT_TOKEN_HEADER)
            && !seen.contains(&token),
        "the token reached the capsule: {seen:?}"
    );
    t.agent.destroy(&id).await.unwrap();
}

/// `sh -c script` in capsule `id`: its exit code, and its stdout followed
/// by its stderr.
async fn sh(c: &common::RpcClient, id: &str, script: &str) -> (i32, String) {
    let (code, out, err) = common::rpc_sh(c, id, script).await;
    (code, out + &err)
}

/// Template `name` of the agent behind `c`, as ExportTemplate streams it.
async fn export(c: &common::RpcClient, name: &str) -> Vec<Vec<u8>> {
    let mut s = c
        .export_template(pb::TemplateRef {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut chunks = Vec::new();
    while let Some(m) = s.message::<pb::FileChunk>().await.unwrap() {
        chunks.push(m.to_owned_message().data);
    }
    chunks
}

/// Feed `chunks` to ImportTemplate as `name`, the last message saying
/// `end` only if `end`.
async fn import(
    c: &common::RpcClient,
    name: &str,
    chunks: &[Vec<u8>],
    end: bool,
) -> Result<pb::Template, connectrpc::ConnectError> {
    let mut msgs: Vec<pb::ImportTemplateRequest> = chunks
        .iter()
        .map(|d| pb::ImportTemplateRequest {
            data: d.clone(),
            ..Default::default()
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(pb::ImportTemplateRequest::default());
    }
    msgs[0].name = name.into();
    msgs.last_mut().unwrap().end = end;
    c.import_template(futures::stream::iter(msgs))
        .await
        .map(|t| t.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_moves_to_another_agent_whole() {
    let (a, b) = (TestAgent::start().await, TestAgent::start().await);
    let ((addr_a, _stop_a), (addr_b, _stop_b)) = (serve(&a).await, serve(&b).await);
    let ca = common::rpc_client(addr_a, a.agent.token());
    let cb = common::rpc_client(addr_b, b.agent.token());
    // a capsule's changes of every kind an overlay layer records: a file
    // owned by a user with its mode, a hard link, a removed file of the
    // lower layer (a whiteout) and a directory replaced (opaque)
    let id = busybox(&ca, 0).await;
    let (code, out) = sh(
        &ca,
        &id,
        "mkdir -p /data && echo kept > /data/f && chown 1000:1001 /data/f && chmod 640 /data/f \
         && ln /data/f /data/g && rm /bin/sleep && rm -r /usr/sbin && mkdir /usr/sbin \
         && echo only > /usr/sbin/only && echo done",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "done\n"));
    let snap = |id: &str, name: &str| {
        ca.create_snapshot(pb::SnapshotRequest {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        })
    };
    snap(&id, "trip").await.unwrap();
    // and one stacked on it
    let child = CapsuleId::random().to_string();
    ca.create_capsule(pb::CreateCapsuleRequest {
        id: child.clone(),
        template: "trip".into(),
        memory_mb: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(sh(&ca, &child, "echo 2 > /data/h").await.0, 0);
    snap(&child, "trip2").await.unwrap();
    for c in [&id, &child] {
        ca.destroy_capsule(cref(c)).await.unwrap();
    }
    let (trip, trip2) = (export(&ca, "trip").await, export(&ca, "trip2").await);

    // the stacked one first: its parent is not on b yet
    let err = import(&cb, "trip2", &trip2, true).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition, "{err:?}");
    assert!(
        err.message.as_deref().unwrap_or("").contains("trip"),
        "{err:?}"
    );
    // cut off (no end), garbage, or under another name: nothing is kept
    let err = import(&cb, "trip", &trip[..trip.len() / 2], false)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Canceled, "{err:?}");
    let err = import(&cb, "trip", &[b"not a tar stream".repeat(100)], true)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    let err = import(&cb, "other", &trip, true).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    assert!(
        err.message
            .as_deref()
            .unwrap_or("")
            .contains("holds template trip"),
        "{err:?}"
    );
    let leftovers = || {
        std::fs::read_dir(b.agent.templates().dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "busybox")
            .collect::<Vec<_>>()
    };
    assert!(
        common::eventually(10, || leftovers().is_empty()).await,
        "{:?}",
        leftovers()
    );

    // an import is dated by its arrival, not by when the layer was made
    // (the control plane's grace for layers no template names yet)
    let made = ca
        .list_templates(pb::Empty::default())
        .await
        .unwrap()
        .into_owned()
        .templates
        .into_iter()
        .find(|t| t.name == "trip")
        .expect("trip on a")
        .created_at;
    let secs = || wrenn_agent::template::now_secs() as i64;
    while secs() <= made {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let arrival = secs();
    let got = import(&cb, "trip", &trip, true).await.unwrap();
    assert_eq!(got.layers, ["trip", "busybox"]);
    assert!(got.created_at >= arrival, "{} < {arrival}", got.created_at);
    let err = import(&cb, "trip", &trip, true).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists, "{err:?}");
    let got = import(&cb, "trip2", &trip2, true).await.unwrap();
    assert_eq!(got.layers, ["trip2", "trip", "busybox"]);

    // a capsule on b sees what the one on a left
    let there = CapsuleId::random().to_string();
    cb.create_capsule(pb::CreateCapsuleRequest {
        id: there.clone(),
        template: "trip2".into(),
        memory_mb: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    let (code, out) = sh(
        &cb,
        &there,
        "cat /data/f /data/h; stat -c '%u:%g %a %h' /data/f; ls /usr/sbin; \
         test -e /bin/sleep && echo sleep is back; test -e /bin/cat && echo cat stays",
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "kept\n2\n1000:1001 640 2\nonly\ncat stays\n")
    );
    cb.destroy_capsule(cref(&there)).await.unwrap();
    for (c, name) in [(&cb, "trip2"), (&cb, "trip"), (&ca, "trip2"), (&ca, "trip")] {
        c.delete_template(pb::TemplateRef {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // a template that is not there
    let mut s = ca
        .export_template(pb::TemplateRef {
            name: "trip".into(),
            ..Default::default()
        })
        .await;
    let err = match &mut s {
        Ok(s) => s.message::<pb::FileChunk>().await.map(|_| ()).unwrap_err(),
        Err(e) => e.clone(),
    };
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
}
