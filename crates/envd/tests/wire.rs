//! Black-box wire conformance of envd against `specs/e2b-compat.md` §4 (plain HTTP), §5
//! (Connect RPC) and §8 (quirks): each test spawns the real binary on a loopback port and
//! checks the bytes it answers with: status codes, exact content types, envelope framing,
//! proto3 JSON spelling and the binary encodings the SDKs depend on.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use hyper::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use common::proto::{self, Field};
use common::{
    assert_timestamp, chunk, encode_base64, envelope, json_envelope, multipart, query_escape,
    raw_exchange, signature, unix_now, within, EndEvent, Envd, Envelope, Http, ProcessRun, Reply,
    Transport, CONNECT_JSON, CONNECT_PROTO, END_STREAM, JSON, JSON_UTF8, PROTO,
};

const STAT: &str = "/filesystem.Filesystem/Stat";
const CREATE_WATCHER: &str = "/filesystem.Filesystem/CreateWatcher";
const GET_WATCHER_EVENTS: &str = "/filesystem.Filesystem/GetWatcherEvents";
const REMOVE_WATCHER: &str = "/filesystem.Filesystem/RemoveWatcher";
const START: &str = "/process.Process/Start";
const CONNECT: &str = "/process.Process/Connect";
const LIST: &str = "/process.Process/List";
const STREAM_INPUT: &str = "/process.Process/StreamInput";
const SEND_SIGNAL: &str = "/process.Process/SendSignal";

/// Modification time given to fixture files, and its RFC 3339 spelling.
const FIXTURE_MTIME: u64 = 1_700_000_000;
const FIXTURE_MTIME_RFC3339: &str = "2023-11-14T22:13:20";

const TOKEN: &str = "secret";
const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// A fresh temp dir (keep it alive) and its canonical absolute path.
fn temp_dir() -> (TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = utf8(dir.path().canonicalize().expect("canonical temp dir"));
    (dir, path)
}

/// A temp dir holding `name` = `contents`, mode 0644, mtime [`FIXTURE_MTIME`]; returns the
/// dir (keep it alive) and the file's canonical absolute path.
fn fixture(name: &str, contents: &[u8]) -> (TempDir, String) {
    let (dir, dir_path) = temp_dir();
    let path = Path::new(&dir_path).join(name);
    std::fs::write(&path, contents).expect("write fixture");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_modified(UNIX_EPOCH + Duration::from_secs(FIXTURE_MTIME)))
        .expect("set mtime");
    (dir, utf8(path))
}

fn utf8(path: PathBuf) -> String {
    path.into_os_string()
        .into_string()
        .expect("UTF-8 temp path")
}

/// The directory part of a path returned by [`fixture`].
fn parent(path: &str) -> &str {
    Path::new(path)
        .parent()
        .and_then(Path::to_str)
        .expect("fixture has a UTF-8 parent")
}

/// A `StartRequest` running `script` under `/bin/sh -c`, stdin disabled as the SDK sends it.
fn start_request(script: &str) -> Value {
    json!({ "process": { "cmd": "/bin/sh", "args": ["-c", script] }, "stdin": false })
}

fn files_url(path: &str, query: &[(&str, &str)]) -> String {
    let mut url = format!("/files?path={}", query_escape(path));
    for (name, value) in query {
        url.push_str(&format!("&{name}={}", query_escape(value)));
    }
    url
}

// ---------------------------------------------------------------------------------------------
// Unary RPCs
// ---------------------------------------------------------------------------------------------

/// §5.1/§5.3: `Stat` with the JSON codec: lowerCamelCase names, enum names, int64 as a JSON
/// string, RFC 3339 timestamps; a missing file is a 404 `not_found` Connect error.
async fn check_stat_json(transport: Transport) {
    let mut envd = Envd::start();
    let http = envd.http(transport);
    let (_dir, file) = fixture("stat.txt", b"hello");

    let reply = http.unary(STAT, &json!({ "path": file }), &[]).await;
    reply.expect_status(StatusCode::OK);
    let content_type = reply.header("content-type");
    assert!(
        content_type.is_some_and(|ct| ct.starts_with(JSON)),
        "{content_type:?}"
    );
    let msg = reply.json();
    let entry = &msg["entry"];
    assert_eq!(entry["name"], "stat.txt", "{msg}");
    assert_eq!(entry["type"], "FILE_TYPE_FILE", "{msg}");
    assert_eq!(entry["path"], file.as_str(), "{msg}");
    assert_eq!(entry["size"], json!("5"), "int64 is a JSON string: {msg}");
    assert_eq!(entry["mode"], 0o644, "mode is the permission bits: {msg}");
    assert_eq!(entry["permissions"], "-rw-r--r--", "{msg}");
    assert!(
        entry["owner"].is_string() && entry["group"].is_string(),
        "{msg}"
    );
    assert_timestamp(&entry["modifiedTime"], FIXTURE_MTIME_RFC3339);
    let fields = entry.as_object().expect("entry is an object");
    assert!(
        fields.keys().all(|key| !key.contains('_')),
        "names are lowerCamelCase: {msg}"
    );

    let missing = format!("{}/missing.txt", parent(&file));
    let reply = http.unary(STAT, &json!({ "path": missing }), &[]).await;
    reply.expect_connect_error(StatusCode::NOT_FOUND, "not_found");

    envd.assert_healthy().await;
}

#[tokio::test]
async fn stat_json_over_http1() {
    check_stat_json(Transport::Http1).await;
}

#[tokio::test]
async fn stat_json_over_h2c() {
    check_stat_json(Transport::H2c).await;
}

/// §5.1: the binary codec. `StatRequest{path=1}` in, `StatResponse{entry=1}` out, with
/// `EntryInfo` fields name=1, type=2, size=4, mode=5, modified_time=9.
#[tokio::test]
async fn stat_binary_proto() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, file) = fixture("stat.txt", b"hello");

    let mut request = Vec::new();
    proto::put_len(&mut request, 1, file.as_bytes());
    let headers = [("content-type", PROTO), ("connect-protocol-version", "1")];
    let reply = http.post(STAT, &headers, request).await;
    reply.expect_status(StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some(PROTO));

    let response = proto::decode(&reply.body);
    assert!(
        matches!(response.as_slice(), [(1, Field::Len(_))]),
        "{response:?}"
    );
    let entry = proto::decode(proto::message(&response, 1));
    assert_eq!(
        proto::get(&entry, 1),
        Some(Field::Len(b"stat.txt".as_slice()))
    );
    assert_eq!(
        proto::get(&entry, 2),
        Some(Field::Varint(1)),
        "FILE_TYPE_FILE"
    );
    assert_eq!(proto::get(&entry, 3), Some(Field::Len(file.as_bytes())));
    assert_eq!(proto::get(&entry, 4), Some(Field::Varint(5)), "size");
    assert_eq!(proto::get(&entry, 5), Some(Field::Varint(0o644)), "mode");
    let modified = proto::decode(proto::message(&entry, 9));
    assert_eq!(
        proto::get(&modified, 1),
        Some(Field::Varint(FIXTURE_MTIME)),
        "seconds"
    );

    envd.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Server streaming: process.Process/Start and Connect
// ---------------------------------------------------------------------------------------------

/// §5.1/§5.2/§8.8/§8.12: `Start` over `application/connect+json`: exact content type,
/// `start{pid}` first, base64 output, one `end` with Go's wording, then `{}` end-of-stream.
async fn check_start_json(transport: Transport) {
    let mut envd = Envd::start();
    let http = envd.http(transport);

    let request = start_request("printf hello; printf err >&2; exit 3");
    let stream = http.open_json_stream(START, &request, &[]).await;
    let run = ProcessRun::read_ok(stream).await;
    assert_eq!(run.stdout, b"hello");
    assert_eq!(run.stderr, b"err");
    assert_eq!(run.end(), &EndEvent::exit(3));

    envd.assert_healthy().await;
}

#[tokio::test]
async fn start_stream_json_over_http1() {
    check_start_json(Transport::Http1).await;
}

#[tokio::test]
async fn start_stream_json_over_h2c() {
    check_start_json(Transport::H2c).await;
}

/// §8.9: a chunked request body whose chunk boundary falls inside the envelope prefix, sent
/// the way the Python SDK does (its headers included: RPC responses must not be
/// HTTP-compressed even though it advertises `Accept-Encoding`).
#[tokio::test]
async fn start_accepts_chunked_request_split_inside_envelope() {
    let mut envd = Envd::start();
    let framed = json_envelope(&start_request("printf hello"));
    let (first, second) = framed.split_at(3);
    let head = format!(
        "POST {START} HTTP/1.1\r\n\
         Host: {addr}\r\n\
         Content-Type: {CONNECT_JSON}\r\n\
         Connect-Protocol-Version: 1\r\n\
         Connect-Content-Encoding: identity\r\n\
         Connect-Accept-Encoding: identity\r\n\
         Accept-Encoding: zstd,gzip,br\r\n\
         Transfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        addr = envd.addr()
    );
    let pieces = [
        [head.as_bytes(), chunk(first).as_slice()].concat(),
        [chunk(second).as_slice(), b"0\r\n\r\n".as_slice()].concat(),
    ];

    let reply = raw_exchange(envd.addr(), &pieces).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some(CONNECT_JSON));
    assert_eq!(reply.header("content-encoding"), None);
    let run = ProcessRun::from_envelopes(&Envelope::parse_all(&reply.body));
    assert_eq!(run.stdout, b"hello");
    assert_eq!(run.end(), &EndEvent::exit(0));

    envd.assert_healthy().await;
}

/// §5.1/§5.2: a streaming error travels in the end-of-stream envelope with HTTP 200, even
/// before any message.
#[tokio::test]
async fn connect_to_unknown_pid_ends_stream_with_not_found() {
    let mut envd = Envd::start();
    let http = envd.http1();

    let mut stream = http
        .open_json_stream(CONNECT, &json!({ "process": { "pid": 999_999 } }), &[])
        .await;
    let (code, message) = stream.next().await.error();
    assert_eq!(code, "not_found");
    assert!(message.contains("999999"), "{message:?}");
    stream.assert_eof().await;

    envd.assert_healthy().await;
}

/// §8.13: the binary codec. `EndEvent.exit_code` is sint32, so `exit 1` is the zig-zag
/// varint 2; the end-of-stream envelope stays JSON.
#[tokio::test]
async fn start_binary_proto_encodes_exit_code_as_sint32() {
    let mut envd = Envd::start();
    let http = envd.http1();

    let mut config = Vec::new();
    proto::put_len(&mut config, 1, b"/bin/sh");
    proto::put_len(&mut config, 2, b"-c");
    proto::put_len(&mut config, 2, b"exit 1");
    let mut request = Vec::new();
    proto::put_len(&mut request, 1, &config);
    proto::put_uint(&mut request, 4, 0); // stdin: false, present

    let stream = http
        .open_stream(START, CONNECT_PROTO, envelope(0, &request), &[])
        .await;
    let envelopes = stream.collect().await;
    let (trailer, data) = envelopes
        .split_last()
        .expect("at least the end-stream envelope");
    trailer.assert_ok_end();

    // Each data envelope is StartResponse{event=1: ProcessEvent{one of start=1 .. keepalive=4}}.
    let events: Vec<(u32, &[u8])> = data
        .iter()
        .map(|envelope| {
            assert_eq!(envelope.flags, 0, "{envelope:?}");
            let response = proto::decode(&envelope.payload);
            match proto::decode(proto::message(&response, 1)).as_slice() {
                [(kind, Field::Len(body))] => (*kind, *body),
                other => panic!("ProcessEvent must hold exactly one event: {other:?}"),
            }
        })
        .collect();
    let ((first_kind, start), (last_kind, end)) = (
        events.first().expect("events"),
        events.last().expect("events"),
    );
    assert_eq!(*first_kind, 1, "first event is start: {events:?}");
    let pid = proto::get(&proto::decode(start), 1);
    assert!(
        matches!(pid, Some(Field::Varint(pid)) if pid > 0),
        "start.pid: {pid:?}"
    );
    assert_eq!(*last_kind, 3, "last event is end: {events:?}");

    let end = proto::decode(end);
    assert_eq!(
        proto::get(&end, 1),
        Some(Field::Varint(2)),
        "exit_code 1 zig-zagged is 2"
    );
    assert_eq!(proto::get(&end, 2), Some(Field::Varint(1)), "exited");
    assert_eq!(
        proto::get(&end, 3),
        Some(Field::Len(b"exit status 1".as_slice())),
        "status"
    );
    assert_eq!(
        proto::get(&end, 4),
        Some(Field::Len(b"exit status 1".as_slice())),
        "error"
    );

    envd.assert_healthy().await;
}

/// §5.1/§8.11: `Keepalive-Ping-Interval` seconds of silence produce `{"event":{"keepalive":{}}}`.
#[tokio::test]
async fn start_sends_keepalives_during_silence() {
    let mut envd = Envd::start();
    let http = envd.http1();

    let headers = [("keepalive-ping-interval", "1")];
    let stream = http
        .open_json_stream(START, &start_request("sleep 3"), &headers)
        .await;
    let run = ProcessRun::read_ok(stream).await;
    assert!(
        run.keepalives >= 1,
        "no keepalive in 3 s of silence at a 1 s interval"
    );
    assert_eq!(run.end(), &EndEvent::exit(0));

    envd.assert_healthy().await;
}

/// An interval too long to add to a clock is taken as the default, not a panic
/// that drops the stream of a process already started.
#[tokio::test]
async fn start_with_an_overlong_keepalive_interval_runs() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let huge = u64::MAX.to_string();
    let headers = [("keepalive-ping-interval", huge.as_str())];
    let stream = http
        .open_json_stream(START, &start_request("echo hi"), &headers)
        .await;
    let run = ProcessRun::read_ok(stream).await;
    assert_eq!(run.end(), &EndEvent::exit(0));
    envd.assert_healthy().await;
}

/// §5.1/§8.10: `Connect-Timeout-Ms` on `Start` bounds the process's life, not only the stream.
#[tokio::test]
async fn start_timeout_kills_the_process() {
    let mut envd = Envd::start();
    let http = envd.http1();

    let started = Instant::now();
    let headers = [("connect-timeout-ms", "1000")];
    let mut stream = http
        .open_json_stream(START, &start_request("sleep 30"), &headers)
        .await;
    let mut run = ProcessRun::default();
    let trailer = run.drain(&mut stream).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stream outlived its 1 s deadline"
    );
    if trailer.json().get("error").is_some() {
        assert_eq!(trailer.error().0, "deadline_exceeded");
    } else {
        trailer.assert_ok_end();
        assert!(
            run.has_ended(),
            "a stream that ends without error carries an end event"
        );
    }
    assert_process_gone(&http, run.pid()).await;

    envd.assert_healthy().await;
}

/// Waits (bounded) until `pid` is neither listed by `List` nor present in `/proc`.
async fn assert_process_gone(http: &Http, pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = http.unary(LIST, &json!({}), &[]).await;
        let listed = reply.expect_status(StatusCode::OK).json();
        let in_list = listed["processes"]
            .as_array()
            .is_some_and(|processes| processes.iter().any(|process| process["pid"] == pid));
        let in_proc = Path::new(&format!("/proc/{pid}")).exists();
        if !in_list && !in_proc {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} outlived its deadline (listed: {in_list}, in /proc: {in_proc})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Client streaming: process.Process/StreamInput
// ---------------------------------------------------------------------------------------------

/// §5.1/§5.2: `StreamInput` envelopes reach the process's stdin; the response is one `{}` data
/// envelope then the `{}` end-of-stream. The process is then killed by tag (§8.13 wording).
#[tokio::test]
async fn stream_input_feeds_stdin() {
    let mut envd = Envd::start();
    let http = envd.http1();

    let tag = "wire-cat";
    let request = json!({
        "process": { "cmd": "/bin/sh", "args": ["-c", "exec cat"] },
        "stdin": true,
        "tag": tag,
    });
    let mut output = http.open_json_stream(START, &request, &[]).await;
    let mut run = ProcessRun::default();
    run.push(&output.next().await);
    let pid = run.pid();

    let input = [
        json_envelope(&json!({ "start": { "process": { "pid": pid } } })),
        json_envelope(&json!({ "data": { "input": { "stdin": encode_base64(b"ping\n") } } })),
    ]
    .concat();
    let acks = http
        .open_stream(STREAM_INPUT, CONNECT_JSON, input, &[])
        .await;
    assert_eq!(
        acks.collect().await,
        [Envelope::new(0, b"{}"), Envelope::new(END_STREAM, b"{}")],
        "StreamInputResponse is {{}} then a successful end-of-stream"
    );

    while run.stdout.len() < b"ping\n".len() {
        run.push(&output.next().await);
    }
    assert_eq!(run.stdout, b"ping\n");

    let kill = json!({ "process": { "tag": tag }, "signal": "SIGNAL_SIGKILL" });
    let reply = http.unary(SEND_SIGNAL, &kill, &[]).await;
    assert_eq!(reply.expect_status(StatusCode::OK).json(), json!({}));
    run.drain(&mut output).await.assert_ok_end();
    assert_eq!(run.end(), &EndEvent::killed());

    envd.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed and unusual input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unary_invalid_json_is_invalid_argument() {
    let mut envd = Envd::start();
    let headers = [("content-type", JSON), ("connect-protocol-version", "1")];
    let reply = envd.http1().post(STAT, &headers, r#"{"path": "#).await;
    reply.expect_connect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    envd.assert_healthy().await;
}

#[tokio::test]
async fn unary_wrong_content_type_is_415() {
    let mut envd = Envd::start();
    let headers = [
        ("content-type", "text/plain"),
        ("connect-protocol-version", "1"),
    ];
    let reply = envd.http1().post(STAT, &headers, "path=/tmp").await;
    reply.expect_status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    envd.assert_healthy().await;
}

/// An envelope that promises 100 bytes and carries 10: an error end-of-stream, not a hang.
#[tokio::test]
async fn truncated_envelope_ends_stream_with_error() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let body = [[0u8, 0, 0, 0, 100].as_slice(), br#"{"process""#.as_slice()].concat();
    let mut stream = http.open_stream(START, CONNECT_JSON, body, &[]).await;
    let (code, _) = stream.next().await.error();
    assert_eq!(code, "invalid_argument");
    stream.assert_eof().await;
    envd.assert_healthy().await;
}

/// An envelope claiming 4 GiB: rejected (size limit or short body), without allocating it
/// and without waiting for bytes that never come.
#[tokio::test]
async fn oversized_envelope_is_rejected() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let body = [[0u8, 0xff, 0xff, 0xff, 0xff].as_slice(), b"{}".as_slice()].concat();
    let mut stream = http.open_stream(START, CONNECT_JSON, body, &[]).await;
    let (code, _) = stream.next().await.error();
    assert!(
        ["resource_exhausted", "invalid_argument"].contains(&code.as_str()),
        "{code}"
    );
    stream.assert_eof().await;
    envd.assert_healthy().await;
}

/// §5.1: unknown fields are ignored, at the top level and inside nested messages.
#[tokio::test]
async fn unknown_json_fields_are_ignored() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, file) = fixture("stat.txt", b"hello");

    let stat = json!({ "path": file, "notAField": 1, "nested": { "x": [1, 2] } });
    http.unary(STAT, &stat, &[])
        .await
        .expect_status(StatusCode::OK);

    let start = json!({
        "process": { "cmd": "/bin/sh", "args": ["-c", "exit 0"], "futureField": true },
        "stdin": false,
        "another_future_field": "x",
    });
    let run = ProcessRun::read_ok(http.open_json_stream(START, &start, &[]).await).await;
    assert_eq!(run.end(), &EndEvent::exit(0));

    envd.assert_healthy().await;
}

/// §5.1: snake_case input names are accepted (`include_entry`, `watcher_id`); output is
/// lowerCamelCase (`watcherId`).
#[tokio::test]
async fn snake_case_field_names_are_accepted() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();

    let create = json!({ "path": dir, "recursive": false, "include_entry": true });
    let created = http.unary(CREATE_WATCHER, &create, &[]).await;
    let created = created.expect_status(StatusCode::OK).json();
    assert_eq!(
        created.as_object().map(|fields| fields.len()),
        Some(1),
        "{created}"
    );
    let id = created["watcherId"].as_str().expect("watcherId");
    assert!(id.starts_with('w'), "{id:?}");

    let by_snake_case = json!({ "watcher_id": id });
    let events = http.unary(GET_WATCHER_EVENTS, &by_snake_case, &[]).await;
    events.expect_status(StatusCode::OK);
    let removed = http.unary(REMOVE_WATCHER, &by_snake_case, &[]).await;
    assert_eq!(removed.expect_status(StatusCode::OK).json(), json!({}));
    // Had `watcher_id` been ignored, the calls above would have failed on an empty id; this
    // one confirms that the watcher really is gone.
    let gone = http
        .unary(GET_WATCHER_EVENTS, &json!({ "watcherId": id }), &[])
        .await;
    gone.expect_connect_error(StatusCode::NOT_FOUND, "not_found");

    envd.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP: /health and /files
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn health_answers_with_version() {
    let mut envd = Envd::start();
    envd.assert_healthy().await;
}

/// §4.2/§4.3: multipart upload (only `file` parts count), download with
/// `Content-Disposition`, and gzip when asked for.
#[tokio::test]
async fn files_upload_then_download() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();
    let path = format!("{dir}/a.txt");
    let contents = "hello from wrenn\n".repeat(200);

    let boundary = "wrenn-wire-boundary";
    let body = multipart(
        boundary,
        &[
            ("file", "a.txt", contents.as_bytes()),
            ("note", "ignored.txt", b"ignored".as_slice()),
        ],
    );
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let reply = http
        .post(
            &files_url(&path, &[]),
            &[("content-type", content_type.as_str())],
            body,
        )
        .await;
    reply.expect_status(StatusCode::OK);
    let content_type = reply.header("content-type");
    assert!(
        content_type.is_some_and(|ct| ct.starts_with(JSON)),
        "{content_type:?}"
    );
    let written = reply.json();
    let [entry] = written.as_array().expect("a JSON array").as_slice() else {
        panic!("one entry per uploaded file part: {written}");
    };
    assert_eq!(entry["path"], path.as_str(), "{written}");
    assert_eq!(entry["name"], "a.txt", "{written}");
    assert_eq!(entry["type"], "file", "{written}");
    assert_eq!(
        std::fs::read(&path).expect("uploaded file"),
        contents.as_bytes()
    );

    let plain = http.get(&files_url(&path, &[]), &[]).await;
    plain.expect_status(StatusCode::OK);
    assert_eq!(plain.body, contents.as_bytes());
    assert_eq!(
        plain.header("content-disposition"),
        Some(r#"inline; filename="a.txt""#)
    );
    assert_eq!(
        plain.header("content-encoding"),
        None,
        "not compressed unless asked"
    );
    let vary = plain.header("vary").unwrap_or_default();
    assert!(
        vary.to_ascii_lowercase().contains("accept-encoding"),
        "Vary: {vary:?}"
    );

    let gzipped = http
        .get(&files_url(&path, &[]), &[("accept-encoding", "gzip")])
        .await;
    gzipped.expect_status(StatusCode::OK);
    assert_eq!(gzipped.header("content-encoding"), Some("gzip"));
    assert_eq!(
        gzipped.header("content-disposition"),
        Some(r#"inline; filename="a.txt""#)
    );
    assert!(gzipped.body.starts_with(&[0x1f, 0x8b]), "gzip magic");
    assert_eq!(gunzip(&gzipped.body), contents.as_bytes());

    envd.assert_healthy().await;
}

/// One file part uploaded to `path`.
async fn upload_one(http: &Http, path: &str, body: &[u8]) -> Reply {
    let boundary = "wrenn-one-file-boundary";
    let ct = format!("multipart/form-data; boundary={boundary}");
    http.post(
        &files_url(path, &[]),
        &[("content-type", ct.as_str())],
        multipart(boundary, &[("file", "f", body)]),
    )
    .await
}

/// Uploading to a symlink writes its target and keeps the link, a
/// dangling link's too (created, as `open(O_CREAT)` does), through chains
/// and relative targets; a loop of links is refused and left as it was.
#[tokio::test]
async fn files_upload_through_symlinks() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();
    let link = |to: &str, at: &str| std::os::unix::fs::symlink(to, format!("{dir}/{at}")).unwrap();
    std::fs::create_dir(format!("{dir}/sub")).unwrap();
    link(&format!("{dir}/sub/abs-target"), "abs"); // dangling, absolute
    link("sub/rel-target", "rel"); // dangling, relative to the link's dir
    link("rel", "chain"); // a link to a link
    link("loop-b", "loop-a");
    link("loop-a", "loop-b");
    for (at, target, body) in [
        ("abs", "sub/abs-target", &b"one"[..]),
        ("rel", "sub/rel-target", b"two"),
        ("chain", "sub/rel-target", b"three"),
    ] {
        upload_one(&http, &format!("{dir}/{at}"), body)
            .await
            .expect_status(StatusCode::OK);
        let meta = std::fs::symlink_metadata(format!("{dir}/{at}")).unwrap();
        assert!(meta.file_type().is_symlink(), "{at} is still a link");
        assert_eq!(
            std::fs::read(format!("{dir}/{target}")).unwrap(),
            body,
            "{at}"
        );
    }
    let refused = upload_one(&http, &format!("{dir}/loop-a"), b"x").await;
    assert!(!refused.status.is_success(), "a loop: {}", refused.status);
    assert!(std::fs::symlink_metadata(format!("{dir}/loop-a"))
        .unwrap()
        .file_type()
        .is_symlink());
    envd.assert_healthy().await;
}

/// Replacing a file whose name is near the 255-byte limit works (the
/// replacement is staged under a name that fits too).
#[tokio::test]
async fn files_overwrite_a_long_name() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();
    let path = format!("{dir}/{}é", "n".repeat(251)); // 253 bytes
    std::fs::write(&path, b"old").unwrap();
    upload_one(&http, &path, b"new")
        .await
        .expect_status(StatusCode::OK);
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "no staged file left: {left:?}");
    envd.assert_healthy().await;
}

/// A file whose size says 0 but that has contents (`/proc`): downloaded
/// whole, plain or gzipped, not as the empty body its size promises.
#[tokio::test]
async fn files_download_generated_files_as_read() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let want = std::fs::read("/proc/version").expect("/proc/version");
    assert_eq!(std::fs::metadata("/proc/version").unwrap().len(), 0);
    assert!(!want.is_empty());
    let plain = http.get(&files_url("/proc/version", &[]), &[]).await;
    plain.expect_status(StatusCode::OK);
    assert_eq!(plain.body, want);
    assert_eq!(
        plain.header("content-type"),
        Some("application/octet-stream")
    );
    let gzipped = http
        .get(
            &files_url("/proc/version", &[]),
            &[("accept-encoding", "gzip")],
        )
        .await;
    gzipped.expect_status(StatusCode::OK);
    assert_eq!(gunzip(&gzipped.body), want);
    // an empty file is still an empty 200
    let (_dir, dir) = temp_dir();
    let empty = format!("{dir}/empty");
    std::fs::write(&empty, b"").unwrap();
    let got = http.get(&files_url(&empty, &[]), &[]).await;
    got.expect_status(StatusCode::OK);
    assert!(got.body.is_empty());
    // a FIFO is refused at once (opening it would wait for a writer)
    let fifo = format!("{dir}/fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        http.get(&files_url(&fifo, &[]), &[]),
    )
    .await
    .expect("answered at once");
    refused.expect_status(StatusCode::BAD_REQUEST);
    envd.assert_healthy().await;
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// §4.2–§4.4: error statuses with the `{"code": <int>, "message"}` body.
#[tokio::test]
async fn files_errors() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, file) = fixture("present.txt", b"x");
    let dir = parent(&file);

    let missing = format!("{dir}/missing.txt");
    let reply = http.get(&files_url(&missing, &[]), &[]).await;
    let message = format!("path '{missing}' does not exist");
    reply.expect_http_error(StatusCode::NOT_FOUND, Some(message.as_str()));

    let reply = http.get(&files_url(dir, &[]), &[]).await;
    reply.expect_http_error(StatusCode::BAD_REQUEST, None);

    let octet_stream = [("content-type", "application/octet-stream")];
    let reply = http.post("/files", &octet_stream, "no destination").await;
    reply.expect_http_error(StatusCode::BAD_REQUEST, None);

    // metadata no file could carry: 400 before anything is written
    let tagged = format!("{dir}/tagged.txt");
    let long_key = format!("x-metadata-{}", "k".repeat(250));
    let long_value = "v".repeat(70_000);
    for (name, value) in [
        (long_key.as_str(), "v"),
        ("x-metadata-big", long_value.as_str()),
    ] {
        let headers = [("content-type", "application/octet-stream"), (name, value)];
        let reply = http.post(&files_url(&tagged, &[]), &headers, "data").await;
        reply.expect_http_error(StatusCode::BAD_REQUEST, None);
        assert!(!Path::new(&tagged).exists(), "{name}: the file was written");
    }

    envd.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// Access token (§4.1, §4.2, §8.16)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn access_token_guards_rpcs() {
    let mut envd = Envd::start_with_token(TOKEN).await;
    let http = envd.http1();
    let (_dir, file) = fixture("guarded.txt", b"x");
    let stat = json!({ "path": file });

    let reply = http.unary(STAT, &stat, &[]).await;
    reply.expect_http_error(StatusCode::UNAUTHORIZED, Some(UNAUTHORIZED));
    let reply = http
        .unary(STAT, &stat, &[("x-access-token", "wrong")])
        .await;
    reply.expect_http_error(StatusCode::UNAUTHORIZED, Some(UNAUTHORIZED));
    let reply = http.unary(STAT, &stat, &[("x-access-token", TOKEN)]).await;
    reply.expect_status(StatusCode::OK);

    // Streams are refused before any envelope, with the same plain 401.
    let headers = [
        ("content-type", CONNECT_JSON),
        ("connect-protocol-version", "1"),
    ];
    let reply = http
        .post(START, &headers, json_envelope(&start_request("exit 0")))
        .await;
    reply.expect_http_error(StatusCode::UNAUTHORIZED, Some(UNAUTHORIZED));

    envd.assert_healthy().await; // /health needs no token
}

/// A refused request's body is still read after the 401, as Go's server
/// reads it: the connection then serves the next request, instead of being
/// closed with request bytes on their way (which the kernel answers with a
/// reset that a proxy still writing the body can take for "envd is
/// unreachable", losing the 401).
#[tokio::test]
async fn a_refused_body_is_read_after_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One response (head and `Content-Length` body) off `sock`, as text.
    async fn response(sock: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("a length"));
                if got.len() >= end + 4 + len {
                    return String::from_utf8_lossy(&got[..end + 4 + len]).into_owned();
                }
            }
            let n = sock.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return String::from_utf8_lossy(&got).into_owned();
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    let envd = Envd::start_with_token(TOKEN).await;
    let body = json_envelope(&start_request("exit 0"));
    let mut sock = tokio::net::TcpStream::connect(envd.addr()).await.unwrap();
    let head = format!(
        "POST {START} HTTP/1.1\r\nHost: envd\r\nContent-Type: {CONNECT_JSON}\r\n\
         Connect-Protocol-Version: 1\r\nX-Access-Token: wrong\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // The answer comes at once, before the body is sent...
    let refused = within("the 401", Duration::from_secs(10), response(&mut sock)).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains(UNAUTHORIZED), "{refused}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ... and the body sent after it is read: the connection goes on.
    sock.write_all(&body).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\n")
        .await
        .unwrap();
    let next = within(
        "the next answer",
        Duration::from_secs(10),
        response(&mut sock),
    )
    .await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next:?}");
}

#[tokio::test]
async fn files_accept_token_or_signature() {
    let mut envd = Envd::start_with_token(TOKEN).await;
    let http = envd.http1();
    let (_dir, file) = fixture("signed.txt", b"signed contents");

    let reply = http.get(&files_url(&file, &[]), &[]).await;
    reply.expect_http_error(
        StatusCode::UNAUTHORIZED,
        Some("missing signature query parameter"),
    );

    let reply = http
        .get(&files_url(&file, &[]), &[("x-access-token", TOKEN)])
        .await;
    assert_eq!(reply.expect_status(StatusCode::OK).body, "signed contents");

    let signed = signature(&file, "read", "", TOKEN, None);
    let reply = http
        .get(&files_url(&file, &[("signature", signed.as_str())]), &[])
        .await;
    assert_eq!(reply.expect_status(StatusCode::OK).body, "signed contents");

    let forged = signature(&file, "read", "", "not-the-token", None);
    let reply = http
        .get(&files_url(&file, &[("signature", forged.as_str())]), &[])
        .await;
    reply.expect_http_error(StatusCode::UNAUTHORIZED, Some("invalid signature"));

    let later = unix_now() + 600;
    let signed = signature(&file, "read", "", TOKEN, Some(later));
    let later = later.to_string();
    let query = [
        ("signature", signed.as_str()),
        ("signature_expiration", later.as_str()),
    ];
    let reply = http.get(&files_url(&file, &query), &[]).await;
    assert_eq!(reply.expect_status(StatusCode::OK).body, "signed contents");

    let earlier = unix_now() - 60;
    let signed = signature(&file, "read", "", TOKEN, Some(earlier));
    let earlier = earlier.to_string();
    let query = [
        ("signature", signed.as_str()),
        ("signature_expiration", earlier.as_str()),
    ];
    let reply = http.get(&files_url(&file, &query), &[]).await;
    reply.expect_status(StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("content-type"), Some(JSON_UTF8));
    // The SDK's test compares this body exactly (§4.2); a trailing newline is tolerated.
    assert_eq!(
        reply.body.trim_ascii_end(),
        br#"{"code":401,"message":"signature is already expired"}"#.as_slice()
    );

    let upload = format!("{}/uploaded.txt", parent(&file));
    let signed = signature(&upload, "write", "", TOKEN, None);
    let octet_stream = [("content-type", "application/octet-stream")];
    let url = files_url(&upload, &[("signature", signed.as_str())]);
    http.post(&url, &octet_stream, "written")
        .await
        .expect_status(StatusCode::OK);
    assert_eq!(std::fs::read(&upload).expect("uploaded file"), b"written");

    envd.assert_healthy().await;
}

/// wrenn-api §7.1: `/init` (env vars, metadata, idempotency by timestamp,
/// bad bodies), `/envs`, `/metrics`, `/snapshot/prepare`.
#[tokio::test]
async fn init_envs_metrics_and_snapshot_prepare() {
    let (_run, run_dir) = temp_dir();
    let mut envd = Envd::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_envd")).args([
            "--dev",
            "--port",
            "0",
            "--addr",
            "127.0.0.1",
            "--run-dir",
            &run_dir,
        ]),
    );
    let http = envd.http1();
    let init = |body: Value| {
        let http = &http;
        async move {
            http.post("/init", &[("content-type", JSON)], body.to_string())
                .await
        }
    };

    let reply = init(json!({
        "envVars": {"FLAVOUR": "mint"},
        "metadata": {"sandboxId": "cl-abc", "templateId": "busybox"},
        "timestamp": "2030-01-01T00:00:00Z",
        "someFieldFromTheFuture": true,
    }))
    .await;
    reply.expect_status(StatusCode::NO_CONTENT);
    assert!(reply.header("x-envd-version").is_some());
    // An older /init (a reordered retry) is accepted but changes nothing.
    init(json!({"envVars": {"STALE": "1"}, "timestamp": "1700000000"}))
        .await
        .expect_status(StatusCode::NO_CONTENT);

    let envs = http.get("/envs", &[]).await;
    envs.expect_status(StatusCode::OK);
    assert_eq!(envs.header("cache-control"), Some("no-store"));
    let envs = envs.json();
    assert_eq!(envs["FLAVOUR"], "mint");
    assert_eq!(envs["WRENN_SANDBOX_ID"], "cl-abc");
    assert_eq!(envs["E2B_SANDBOX_ID"], "cl-abc");
    assert_eq!(envs["WRENN_TEMPLATE_ID"], "busybox");
    assert_eq!(envs["WRENN_SANDBOX"], "false", "--dev is not a capsule");
    assert!(envs.get("STALE").is_none(), "{envs}");
    let file = std::fs::read_to_string(Path::new(&run_dir).join(".WRENN_SANDBOX_ID")).unwrap();
    assert_eq!(file, "cl-abc");

    // Processes get the defaults.
    let stream = http
        .open_json_stream(
            START,
            &start_request("echo $FLAVOUR $WRENN_SANDBOX_ID"),
            &[],
        )
        .await;
    assert_eq!(ProcessRun::read_ok(stream).await.stdout, b"mint cl-abc\n");

    // Bad bodies are 400 with envd's error JSON; nothing is applied.
    init(Value::String("not an object".into()))
        .await
        .expect_http_error(StatusCode::BAD_REQUEST, None);
    init(json!({"metadata": {"../escape": "x"}}))
        .await
        .expect_http_error(StatusCode::BAD_REQUEST, None);
    init(json!({"defaultUser": "no-such-user"}))
        .await
        .expect_http_error(
            StatusCode::BAD_REQUEST,
            Some("invalid username: 'no-such-user'"),
        );
    assert!(!Path::new(&run_dir).join(".WRENN_..").exists());

    let metrics = http.get("/metrics", &[]).await;
    metrics.expect_status(StatusCode::OK);
    let m = metrics.json();
    for key in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(m[key].is_number(), "metrics.{key} missing: {m}");
    }
    assert!(m["mem_total_mib"].as_u64().unwrap() > 0 && m["cpu_count"].as_u64().unwrap() > 0);

    http.post("/snapshot/prepare", &[], "")
        .await
        .expect_status(StatusCode::NO_CONTENT);
    envd.assert_healthy().await;
}

/// Found by the `connect_envelope` fuzz target: a path with a NUL byte was a
/// 500. Paths the OS cannot take are the client's mistake: 400, both surfaces.
#[tokio::test]
async fn paths_with_nul_bytes_are_invalid_arguments() {
    let mut envd = Envd::start();
    let http = envd.http1();
    http.unary(STAT, &json!({"path": "/tmp/a\u{0}b"}), &[])
        .await
        .expect_connect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    http.get("/files?path=%2Ftmp%2Fa%00b", &[])
        .await
        .expect_http_error(StatusCode::BAD_REQUEST, None);
    envd.assert_healthy().await;
}

/// The multipart parser buffers whatever precedes a boundary: that part of a
/// body is bounded (4 MiB) apart from the upload size, and answered with 400.
#[tokio::test]
async fn multipart_framing_is_bounded() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();
    let junk = vec![b'x'; 6 << 20]; // no boundary anywhere
    let reply = http
        .post(
            &format!("/files?path={}", query_escape(&format!("{dir}/f"))),
            &[("content-type", "multipart/form-data; boundary=zz")],
            junk,
        )
        .await;
    reply.expect_http_error(StatusCode::BAD_REQUEST, None);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("multipart"));
    assert!(!Path::new(&dir).join("f").exists());
    envd.assert_healthy().await;
}

/// Uploading to a symlink writes its target and keeps the link.
#[tokio::test]
async fn uploads_write_through_symlinks() {
    let mut envd = Envd::start();
    let http = envd.http1();
    let (_dir, dir) = temp_dir();
    let target = Path::new(&dir).join("real.txt");
    std::fs::write(&target, b"old").unwrap();
    let link = Path::new(&dir).join("link.txt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    http.post(
        &format!("/files?path={}", query_escape(link.to_str().unwrap())),
        &[("content-type", "application/octet-stream")],
        "new",
    )
    .await
    .expect_status(StatusCode::OK);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    envd.assert_healthy().await;
}
