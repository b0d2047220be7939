//! Black-box harness for envd's wire tests: spawns the real `envd` binary and speaks HTTP/1.1,
//! h2c, raw TCP and Connect envelopes to it, decoding just enough protobuf to check field
//! encodings.
//!
//! Every wait on the network or on the child process is bounded ([`within`], the per-stream
//! deadline in [`EnvelopeStream`]), so a broken server fails a test instead of hanging it.

// Each test file that mounts this module uses a different subset of it.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one request/response exchange (headers, or a whole unary body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading a whole streaming response, keepalives included.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on envd printing its listening address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

pub const JSON: &str = "application/json";
pub const JSON_UTF8: &str = "application/json; charset=utf-8";
pub const PROTO: &str = "application/proto";
pub const CONNECT_JSON: &str = "application/connect+json";
pub const CONNECT_PROTO: &str = "application/connect+proto";

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The envd process
// ---------------------------------------------------------------------------------------------

/// A running `envd --dev` on an ephemeral loopback port; killed and reaped on drop.
pub struct Envd {
    child: Child,
    addr: SocketAddr,
}

impl Envd {
    /// Spawns envd and waits for its `envd listening on <addr>` line.
    pub fn start() -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_envd")).args([
            "--dev",
            "--port",
            "0",
            "--addr",
            "127.0.0.1",
        ]))
    }

    /// Spawns `cmd` (which must end up running envd) and waits for its
    /// `envd listening on <addr>` line.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn envd");
        let (ready_tx, ready_rx) = mpsc::channel();
        forward_lines(
            "envd stdout",
            child.stdout.take().expect("piped stdout"),
            Some(ready_tx),
        );
        forward_lines(
            "envd stderr",
            child.stderr.take().expect("piped stderr"),
            None,
        );
        // Own the child before anything can panic, so a failed start still kills it.
        let mut envd = Envd {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };

        let line = match ready_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(err) => panic!(
                "envd did not announce its address ({err}); exit status: {:?}",
                envd.child.try_wait()
            ),
        };
        envd.addr = line
            .strip_prefix("envd listening on ")
            .and_then(|addr| addr.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line from envd: {line:?}"));
        envd
    }

    /// Spawns envd and gives it an access token through `POST /init`.
    pub async fn start_with_token(token: &str) -> Self {
        let envd = Self::start();
        let reply = envd
            .http1()
            .post(
                "/init",
                &[("content-type", JSON)],
                json!({ "accessToken": token }).to_string(),
            )
            .await;
        reply.expect_status(StatusCode::NO_CONTENT);
        assert!(
            reply.header("x-envd-version").is_some(),
            "POST /init must answer X-Envd-Version"
        );
        envd
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pid of the spawned command.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn http(&self, transport: Transport) -> Http {
        Http::new(self.addr, transport)
    }

    pub fn http1(&self) -> Http {
        self.http(Transport::Http1)
    }

    /// The process is still running and `GET /health` answers 200 with
    /// `{"version": …}` and `Cache-Control: no-store` (wrenn-api.md §7.1; E2B's
    /// SDKs accept any 2xx there).
    pub async fn assert_healthy(&mut self) {
        let status = self.child.try_wait().expect("poll envd");
        assert!(status.is_none(), "envd exited: {status:?}");
        let reply = self.http1().get("/health", &[]).await;
        reply.expect_status(StatusCode::OK);
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert!(
            reply.json()["version"].is_string(),
            "/health must name envd's version: {:?}",
            reply.text()
        );
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `stream` line by line into the test's captured output, handing the first line to
/// `first_line` instead when given. The thread ends at EOF, i.e. when envd exits; it is not
/// joined because a leaked grandchild could keep the pipe open.
fn forward_lines(
    label: &'static str,
    stream: impl Read + Send + 'static,
    mut first_line: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            if let Some(tx) = first_line.take() {
                let _ = tx.send(line);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1, as both SDKs speak it over plain http.
    Http1,
    /// HTTP/2 with prior knowledge over cleartext.
    H2c,
}

/// A pooled hyper client bound to one envd.
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    transport: Transport,
}

/// A fully read response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Http {
    pub fn new(addr: SocketAddr, transport: Transport) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(transport == Transport::H2c);
        Http {
            client: builder.build_http(),
            base: format!("http://{addr}"),
            transport,
        }
    }

    pub fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(Full::new(body.into()))
            .expect("well-formed request")
    }

    /// Sends `req` and returns once the response head has arrived.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = within(&what, REQUEST_TIMEOUT, self.client.request(req))
            .await
            .unwrap_or_else(|err| panic!("{what}: {err:?}"));
        if self.transport == Transport::H2c {
            assert_eq!(
                resp.version(),
                Version::HTTP_2,
                "{what} was not answered over h2c"
            );
        }
        resp
    }

    /// Sends `req` and reads the whole response body.
    pub async fn fetch(&self, req: Request<Full<Bytes>>) -> Reply {
        let (parts, body) = self.send(req).await.into_parts();
        let body = within("response body", REQUEST_TIMEOUT, body.collect())
            .await
            .expect("read response body")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Reply {
        self.fetch(self.request(Method::GET, path_and_query, headers, Bytes::new()))
            .await
    }

    pub async fn post(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.fetch(self.request(Method::POST, path_and_query, headers, body))
            .await
    }

    /// A Connect unary call with the JSON codec, as the SDKs send it (§5.1).
    pub async fn unary(&self, procedure: &str, msg: &Value, headers: &[(&str, &str)]) -> Reply {
        let headers = connect_headers(JSON, headers);
        self.post(procedure, &headers, msg.to_string()).await
    }

    /// Opens a Connect streaming call whose request body is `body` (already enveloped).
    ///
    /// Streaming RPCs answer 200 even for errors, with a `Content-Type` equal to the request's
    /// and no parameters (§5.1, §8.8), and are never HTTP-compressed; checked here for all.
    pub async fn open_stream(
        &self,
        procedure: &str,
        content_type: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> EnvelopeStream {
        let headers = connect_headers(content_type, headers);
        let resp = self
            .send(self.request(Method::POST, procedure, &headers, body))
            .await;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = within("error body", REQUEST_TIMEOUT, resp.into_body().collect()).await;
            let body = body.map(|b| b.to_bytes()).unwrap_or_default();
            panic!("{procedure}: streaming call answered {status}, body {body:?}");
        }
        assert_eq!(
            header(resp.headers(), "content-type"),
            Some(content_type),
            "{procedure}: response Content-Type must be exactly the request's"
        );
        assert_eq!(
            header(resp.headers(), "content-encoding"),
            None,
            "{procedure}: compressed"
        );
        EnvelopeStream::new(resp.into_body())
    }

    /// [`Http::open_stream`] with one JSON data envelope as the request.
    pub async fn open_json_stream(
        &self,
        procedure: &str,
        msg: &Value,
        headers: &[(&str, &str)],
    ) -> EnvelopeStream {
        self.open_stream(procedure, CONNECT_JSON, json_envelope(msg), headers)
            .await
    }
}

fn connect_headers<'a>(
    content_type: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        ("content-type", content_type),
        ("connect-protocol-version", "1"),
    ];
    headers.extend_from_slice(extra);
    headers
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .map(|value| value.to_str().expect("visible-ASCII header value"))
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", self.text()))
    }

    pub fn expect_status(&self, want: StatusCode) -> &Self {
        assert_eq!(
            self.status,
            want,
            "unexpected status; body: {:?}",
            self.text()
        );
        self
    }

    /// A Connect unary error: `status`, a JSON body `{"code": "<code>", "message": "…"}`.
    /// Returns the message.
    pub fn expect_connect_error(&self, status: StatusCode, code: &str) -> String {
        self.expect_status(status);
        let content_type = self.header("content-type");
        assert!(
            content_type.is_some_and(|ct| ct.starts_with(JSON)),
            "Connect errors are JSON, got Content-Type {content_type:?}"
        );
        let error = self.json();
        assert_eq!(error["code"], code, "{error}");
        error["message"]
            .as_str()
            .unwrap_or_else(|| panic!("Connect error without a message: {error}"))
            .to_owned()
    }

    /// An envd plain-HTTP error (§4.4): `status`, `application/json; charset=utf-8`,
    /// `{"code": <status>, "message": "…"}`, the message equal to `message` when given.
    pub fn expect_http_error(&self, status: StatusCode, message: Option<&str>) {
        self.expect_status(status);
        assert_eq!(self.header("content-type"), Some(JSON_UTF8));
        let error = self.json();
        assert_eq!(error["code"], status.as_u16(), "{error}");
        let got = error["message"]
            .as_str()
            .unwrap_or_else(|| panic!("error without a message: {error}"));
        if let Some(want) = message {
            assert_eq!(got, want);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connect envelopes (§5.1)
// ---------------------------------------------------------------------------------------------

/// Flag bit of the end-of-stream envelope.
pub const END_STREAM: u8 = 0x02;

/// One Connect envelope: flag byte, 4-byte big-endian length, payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

/// Frames `payload` as one envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload fits one envelope");
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A data envelope holding `msg` as JSON.
pub fn json_envelope(msg: &Value) -> Vec<u8> {
    envelope(0, msg.to_string().as_bytes())
}

impl Envelope {
    pub fn new(flags: u8, payload: &'static [u8]) -> Self {
        Envelope {
            flags,
            payload: Bytes::from_static(payload),
        }
    }

    /// Removes one complete envelope from the front of `buf`, if `buf` holds one.
    pub fn split_off(buf: &mut Vec<u8>) -> Option<Envelope> {
        let prefix: [u8; 5] = buf.get(..5)?.try_into().expect("5-byte prefix");
        let len = u32::from_be_bytes(prefix[1..].try_into().expect("4-byte length")) as usize;
        let payload = Bytes::copy_from_slice(buf.get(5..5 + len)?);
        buf.drain(..5 + len);
        Some(Envelope {
            flags: prefix[0],
            payload,
        })
    }

    /// Splits a whole body into envelopes; panics on trailing partial bytes.
    pub fn parse_all(body: &[u8]) -> Vec<Envelope> {
        let mut buf = body.to_vec();
        let envelopes: Vec<_> = std::iter::from_fn(|| Envelope::split_off(&mut buf)).collect();
        assert!(
            buf.is_empty(),
            "{} bytes of a truncated envelope end the body",
            buf.len()
        );
        envelopes
    }

    pub fn is_end_stream(&self) -> bool {
        self.flags == END_STREAM
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|err| panic!("envelope payload is not JSON ({err}): {self:?}"))
    }

    /// The end-of-stream envelope of a successful call: flag 0x02, payload exactly `{}`.
    pub fn assert_ok_end(&self) {
        assert_eq!(
            self,
            &Envelope::new(END_STREAM, b"{}"),
            "expected a successful end-stream"
        );
    }

    /// The `(code, message)` of an end-of-stream envelope carrying `{"error": {…}}`.
    pub fn error(&self) -> (String, String) {
        assert_eq!(
            self.flags, END_STREAM,
            "expected the end-stream envelope, got {self:?}"
        );
        let msg = self.json();
        let error = msg
            .get("error")
            .unwrap_or_else(|| panic!("end-stream without error: {msg}"));
        let field = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("error.{key} is not a string: {msg}"))
                .to_owned()
        };
        (field("code"), field("message"))
    }
}

/// Envelopes read incrementally from a streaming response body, all within
/// [`STREAM_TIMEOUT`] of opening the stream.
pub struct EnvelopeStream {
    body: Incoming,
    buf: Vec<u8>,
    deadline: tokio::time::Instant,
}

impl EnvelopeStream {
    fn new(body: Incoming) -> Self {
        let deadline = tokio::time::Instant::now() + STREAM_TIMEOUT;
        EnvelopeStream {
            body,
            buf: Vec::new(),
            deadline,
        }
    }

    /// The next envelope; panics if the body ends first.
    pub async fn next(&mut self) -> Envelope {
        loop {
            if let Some(envelope) = Envelope::split_off(&mut self.buf) {
                return envelope;
            }
            match self.next_data().await {
                Some(data) => self.buf.extend_from_slice(&data),
                None => panic!(
                    "response body ended ({} stray bytes) before the end-stream envelope",
                    self.buf.len()
                ),
            }
        }
    }

    /// Reads up to and including the end-stream envelope, then checks that the body ends.
    pub async fn collect(mut self) -> Vec<Envelope> {
        let mut envelopes = Vec::new();
        loop {
            let envelope = self.next().await;
            let done = envelope.is_end_stream();
            envelopes.push(envelope);
            if done {
                self.assert_eof().await;
                return envelopes;
            }
        }
    }

    /// Nothing follows: the body ends without further data.
    pub async fn assert_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "{} bytes after the end-stream envelope",
            self.buf.len()
        );
        if let Some(data) = self.next_data().await {
            panic!("data after the end-stream envelope: {data:?}");
        }
    }

    /// The next non-empty DATA frame, skipping trailers; `None` at the end of the body.
    async fn next_data(&mut self) -> Option<Bytes> {
        loop {
            let frame = match tokio::time::timeout_at(self.deadline, self.body.frame()).await {
                Ok(frame) => frame?,
                Err(_) => panic!("stream still open {STREAM_TIMEOUT:?} after it started"),
            };
            let frame = frame.unwrap_or_else(|err| panic!("reading response body: {err}"));
            if let Ok(data) = frame.into_data() {
                if !data.is_empty() {
                    return Some(data);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// process.Process streams (§5.2)
// ---------------------------------------------------------------------------------------------

/// `ProcessEvent.EndEvent` with proto3 JSON defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndEvent {
    pub exit_code: i64,
    pub exited: bool,
    pub status: String,
    pub error: Option<String>,
}

impl EndEvent {
    /// A normal exit with `code` (Go `ProcessState` wording).
    pub fn exit(code: i64) -> Self {
        EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: (code != 0).then(|| format!("exit status {code}")),
        }
    }

    /// Killed by SIGKILL.
    pub fn killed() -> Self {
        EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".to_owned(),
            error: Some("signal: killed".to_owned()),
        }
    }

    fn from_json(end: &Value) -> Self {
        let fields = end
            .as_object()
            .unwrap_or_else(|| panic!("end event is not an object: {end}"));
        for key in fields.keys() {
            assert!(
                ["exitCode", "exited", "status", "error"].contains(&key.as_str()),
                "unexpected end-event field {key:?} (names are lowerCamelCase): {end}"
            );
        }
        let string = |key: &str| {
            fields.get(key).map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{key} is not a string: {end}"))
                    .to_owned()
            })
        };
        EndEvent {
            exit_code: fields.get("exitCode").map_or(0, |code| {
                code.as_i64()
                    .unwrap_or_else(|| panic!("exitCode is not a JSON integer: {end}"))
            }),
            exited: fields.get("exited").is_some_and(|exited| {
                exited
                    .as_bool()
                    .unwrap_or_else(|| panic!("exited is not a bool: {end}"))
            }),
            status: string("status").unwrap_or_default(),
            error: string("error"),
        }
    }
}

/// What a `Start`/`Connect` JSON stream said, validated event by event: first `start{pid}`,
/// then `data`/`keepalive`, then at most one `end` and nothing after it.
#[derive(Debug, Default)]
pub struct ProcessRun {
    pid: Option<u64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub keepalives: usize,
    end: Option<EndEvent>,
}

impl ProcessRun {
    /// Reads a complete successful stream: events ending in `end`, then the `{}` end-stream.
    pub async fn read_ok(stream: EnvelopeStream) -> Self {
        let envelopes = stream.collect().await;
        Self::from_envelopes(&envelopes)
    }

    /// [`ProcessRun::read_ok`] over an already-read body.
    pub fn from_envelopes(envelopes: &[Envelope]) -> Self {
        let (trailer, events) = envelopes.split_last().expect("stream with no envelope");
        trailer.assert_ok_end();
        let mut run = Self::default();
        for event in events {
            run.push(event);
        }
        run.end();
        run
    }

    /// Consumes events until the end-stream envelope, which it returns (success or error).
    pub async fn drain(&mut self, stream: &mut EnvelopeStream) -> Envelope {
        loop {
            let envelope = stream.next().await;
            if envelope.is_end_stream() {
                stream.assert_eof().await;
                return envelope;
            }
            self.push(&envelope);
        }
    }

    /// Validates and records one data envelope holding `{"event": {...}}`.
    pub fn push(&mut self, envelope: &Envelope) {
        assert_eq!(
            envelope.flags, 0,
            "process events are plain data envelopes: {envelope:?}"
        );
        let msg = envelope.json();
        let (outer, event) = only_entry(&msg);
        assert_eq!(outer, "event", "{msg}");
        let (kind, body) = only_entry(event);
        assert!(self.end.is_none(), "event after the end event: {msg}");
        match (self.pid, kind) {
            (None, "start") => {
                let pid = body["pid"].as_u64().filter(|&pid| pid > 0);
                let pid = pid.unwrap_or_else(|| panic!("start without a pid: {msg}"));
                assert_eq!(body, &json!({ "pid": pid }), "{msg}");
                self.pid = Some(pid);
            }
            (None, _) => panic!("the first process event must be start{{pid}}, got {msg}"),
            (Some(_), "data") => {
                let (channel, data) = only_entry(body);
                let data = data
                    .as_str()
                    .unwrap_or_else(|| panic!("data is not a string: {msg}"));
                let bytes = decode_base64(data);
                match channel {
                    "stdout" => self.stdout.extend_from_slice(&bytes),
                    "stderr" => self.stderr.extend_from_slice(&bytes),
                    other => panic!("unexpected output channel {other:?}: {msg}"),
                }
            }
            (Some(_), "keepalive") => {
                assert_eq!(body, &json!({}), "{msg}");
                self.keepalives += 1;
            }
            (Some(_), "end") => self.end = Some(EndEvent::from_json(body)),
            (Some(_), other) => panic!("unexpected process event {other:?}: {msg}"),
        }
    }

    pub fn pid(&self) -> u64 {
        self.pid.expect("no start event yet")
    }

    pub fn end(&self) -> &EndEvent {
        self.end.as_ref().expect("the stream carried no end event")
    }

    pub fn has_ended(&self) -> bool {
        self.end.is_some()
    }
}

/// The single `(key, value)` of a one-member JSON object (a oneof, or a wrapper message).
pub fn only_entry(value: &Value) -> (&str, &Value) {
    match value.as_object() {
        Some(object) if object.len() == 1 => {
            let (key, value) = object.iter().next().expect("one member");
            (key.as_str(), value)
        }
        _ => panic!("expected an object with exactly one member, got {value}"),
    }
}

/// Decodes proto3-JSON `bytes`, requiring the canonical standard, padded alphabet.
pub fn decode_base64(text: &str) -> Vec<u8> {
    let bytes = STANDARD
        .decode(text)
        .unwrap_or_else(|err| panic!("bad base64 {text:?}: {err}"));
    assert_eq!(
        STANDARD.encode(&bytes),
        text,
        "bytes must be standard padded base64"
    );
    bytes
}

pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// A `google.protobuf.Timestamp` in JSON: RFC 3339 in UTC, `want` being its whole-seconds
/// part (`2023-11-14T22:13:20`); a fraction of zeros is allowed, as protojson emits 0/3/6/9
/// fractional digits.
pub fn assert_timestamp(value: &Value, want: &str) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let zone = text
        .strip_prefix(want)
        .unwrap_or_else(|| panic!("{text:?} is not {want}"));
    let zero_fraction =
        |fraction: &str| !fraction.is_empty() && fraction.bytes().all(|b| b == b'0');
    let ok = zone == "Z"
        || zone
            .strip_prefix('.')
            .and_then(|z| z.strip_suffix('Z'))
            .is_some_and(zero_fraction);
    assert!(ok, "{text:?} is not an RFC 3339 UTC timestamp for {want}");
}

// ---------------------------------------------------------------------------------------------
// Minimal protobuf wire format, for the binary-codec tests
// ---------------------------------------------------------------------------------------------

pub mod proto {
    /// One decoded field value.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Field<'a> {
        Varint(u64),
        I64(u64),
        Len(&'a [u8]),
        I32(u32),
    }

    pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    /// A varint-typed field (uint32, bool, enum, and zig-zagged sint32).
    pub fn put_uint(out: &mut Vec<u8>, number: u32, value: u64) {
        put_varint(out, u64::from(number) << 3);
        put_varint(out, value);
    }

    /// A length-delimited field (string, bytes, message).
    pub fn put_len(out: &mut Vec<u8>, number: u32, data: &[u8]) {
        put_varint(out, (u64::from(number) << 3) | 2);
        put_varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }

    fn read_varint(buf: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().expect("truncated varint");
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
        }
        panic!("varint longer than 10 bytes")
    }

    fn take<'a>(buf: &mut &'a [u8], len: usize, number: u32) -> &'a [u8] {
        assert!(len <= buf.len(), "field {number} is truncated");
        let (data, rest) = buf.split_at(len);
        *buf = rest;
        data
    }

    /// All fields of a message, in wire order.
    pub fn decode(mut buf: &[u8]) -> Vec<(u32, Field<'_>)> {
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let key = read_varint(&mut buf);
            let number = u32::try_from(key >> 3).expect("field number fits u32");
            let field = match key & 7 {
                0 => Field::Varint(read_varint(&mut buf)),
                1 => Field::I64(u64::from_le_bytes(
                    take(&mut buf, 8, number).try_into().expect("8 bytes"),
                )),
                2 => {
                    let len = usize::try_from(read_varint(&mut buf)).expect("length fits usize");
                    Field::Len(take(&mut buf, len, number))
                }
                5 => Field::I32(u32::from_le_bytes(
                    take(&mut buf, 4, number).try_into().expect("4 bytes"),
                )),
                wire => panic!("field {number} has unsupported wire type {wire}"),
            };
            fields.push((number, field));
        }
        fields
    }

    /// The value of field `number` (the last one, as protobuf merges).
    pub fn get<'a>(fields: &[(u32, Field<'a>)], number: u32) -> Option<Field<'a>> {
        fields
            .iter()
            .rev()
            .find(|(n, _)| *n == number)
            .map(|(_, field)| *field)
    }

    /// The bytes of the length-delimited field `number`; panics if absent.
    pub fn message<'a>(fields: &[(u32, Field<'a>)], number: u32) -> &'a [u8] {
        match get(fields, number) {
            Some(Field::Len(data)) => data,
            other => panic!("field {number} is not a present message: {other:?} in {fields:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TCP
// ---------------------------------------------------------------------------------------------

/// Pause between request pieces, so that each arrives in its own read on the server.
const PIECE_PAUSE: Duration = Duration::from_millis(100);

/// A response read to EOF and parsed by hand.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    /// De-chunked when the response was chunked.
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    fn parse(raw: &[u8]) -> Self {
        let head_len = find(raw, b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "no end of response head in {:?}",
                String::from_utf8_lossy(raw)
            )
        });
        let head = std::str::from_utf8(&raw[..head_len]).expect("response head is UTF-8");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let mut words = status_line.splitn(3, ' ');
        assert_eq!(
            words.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status: u16 = words
            .next()
            .and_then(|s| s.parse().ok())
            .expect("numeric status");
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line with a colon");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();

        let rest = &raw[head_len + 4..];
        let chunked = header_value(&headers, "transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            if let Some(len) = header_value(&headers, "content-length") {
                let len: usize = len.parse().expect("numeric Content-Length");
                assert_eq!(rest.len(), len, "body length differs from Content-Length");
            }
            rest.to_vec()
        };
        RawReply {
            status,
            headers,
            body,
        }
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Writes `pieces` to a fresh connection with a pause between them, then reads to EOF (the
/// request should say `Connection: close`).
pub async fn raw_exchange(addr: SocketAddr, pieces: &[Vec<u8>]) -> RawReply {
    let raw = within("raw HTTP/1.1 exchange", REQUEST_TIMEOUT, async {
        let mut socket = TcpStream::connect(addr).await.expect("connect to envd");
        socket.set_nodelay(true).expect("TCP_NODELAY");
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(PIECE_PAUSE).await;
            }
            socket.write_all(piece).await.expect("write request");
        }
        let mut raw = Vec::new();
        socket.read_to_end(&mut raw).await.expect("read response");
        raw
    })
    .await;
    RawReply::parse(&raw)
}

/// One chunk of a chunked HTTP/1.1 body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let size_line = format!("{:x}\r\n", data.len());
    [size_line.as_bytes(), data, b"\r\n".as_slice()].concat()
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let eol = find(rest, b"\r\n").expect("chunk-size line");
        let line = std::str::from_utf8(&rest[..eol]).expect("chunk-size line is ASCII");
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).expect("hex chunk size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return body; // trailers, if any, are ignored
        }
        assert!(rest.len() >= size + 2, "truncated chunk");
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "chunk not followed by CRLF");
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------------
// /files helpers (§4.2, §4.3)
// ---------------------------------------------------------------------------------------------

/// Percent-encodes a query value, leaving unreserved characters and `/` alone.
pub fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A `multipart/form-data` body; each part is `(form name, filename, contents)`.
pub fn multipart(boundary: &str, parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, contents) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(contents);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// A signed-URL signature (§4.2, §8.16): `v1_` + unpadded standard base64 of
/// SHA-256(`path:op:username:token[:expiration]`).
pub fn signature(
    path: &str,
    op: &str,
    username: &str,
    token: &str,
    expiration: Option<u64>,
) -> String {
    let signed = match expiration {
        Some(expiration) => format!("{path}:{op}:{username}:{token}:{expiration}"),
        None => format!("{path}:{op}:{username}:{token}"),
    };
    format!("v1_{}", STANDARD_NO_PAD.encode(sha256(signed.as_bytes())))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// SHA-256 of `data` (computed with the `sha2` crate, independently of envd).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}
