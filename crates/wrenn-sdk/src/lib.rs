//! A typed client for wrenn's `/v1` API: capsules, exec (foreground and
//! the `exec/stream` WebSocket), the PTY WebSocket, files (streamed both
//! ways), templates, API keys and hosts. The `wrenn` command is built on
//! it; so are the tests that drive `wrenn up` from Rust.
//!
//! Errors keep what the server said: [`Error::Api`] carries the status and
//! wrenn's `{"error":{"code","message"}}`; [`Error::Connect`] means nothing
//! answered at the base URL.

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::Bytes;
use futures::{SinkExt, Stream, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

mod ws;

pub use ws::{ExecEvent, ExecStream, PtyEvent, PtySession};

/// The environment variables the Python SDK reads too.
pub const BASE_URL_ENV: &str = "WRENN_BASE_URL";
pub const API_KEY_ENV: &str = "WRENN_API_KEY";
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8000";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the call.
    #[error("{message} ({status} {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// Nothing answered at the base URL.
    #[error("cannot reach {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The server ended a stream (exec, terminal) with its `error` frame.
    #[error("{0}")]
    Stream(String),
    #[error("invalid base URL {0:?}")]
    BaseUrl(String),
}

impl Error {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A capsule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capsule {
    pub id: String,
    pub status: String,
    pub template: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub timeout_sec: i64,
    #[serde(default)]
    pub disk_size_mb: i64,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /v1/capsules`; unset fields take the server's defaults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateCapsule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internet: Option<bool>,
    /// `oci` (a container) or `vm` (a microVM); the template's when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// A command to run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Command {
    pub cmd: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl Command {
    /// `sh -c line`.
    pub fn shell(line: impl Into<String>) -> Command {
        Command {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), line.into()],
            ..Default::default()
        }
    }
}

/// A foreground command's result (output decoded).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// A directory entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub mode: Option<u32>,
}

/// A template (`/v1/snapshots`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub vcpus: Option<i64>,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub size_bytes: i64,
    pub created_at: String,
    #[serde(default)]
    pub platform: bool,
}

/// An API key (the secret only in [`NewKey`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub key_prefix: String,
    pub created_at: String,
    #[serde(default)]
    pub last_used: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// Shown once.
    #[serde(rename = "key")]
    pub secret: String,
}

/// The kind of key to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Wrenn,
    /// `e2b_` + 40 hex, for E2B's SDKs.
    E2b,
}

/// A host: what its agent reported (address, size) and its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub id: String,
    pub status: String,
    #[serde(flatten)]
    pub facts: wrenn_types::hosts::HostFacts,
    #[serde(default)]
    pub last_heartbeat: Option<String>,
}

/// A template build (`POST /v1/admin/builds`).
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    pub name: String,
    pub base_template: String,
    pub recipe: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<String>,
    /// What `COPY` steps read: a tar archive of files and directories.
    #[serde(skip)]
    pub context: Option<Vec<u8>>,
}

/// A stream of file contents.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// The API client: a base URL and a key; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    pub fn new(base_url: &str, api_key: &str) -> Result<Client> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::BaseUrl(base_url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        Ok(Client {
            http,
            base,
            key: api_key.to_owned(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("x-api-key", &self.key)
    }

    /// Send, turning transport failures and refusals into [`Error`].
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                Error::Connect {
                    url: self.base.clone(),
                    source: e,
                }
            } else {
                Error::Http(e)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<Value>(&text) {
            Ok(v) => (
                v["error"]["code"].as_str().unwrap_or("").to_owned(),
                v["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| text.clone()),
            ),
            Err(_) => (String::new(), text),
        };
        Err(Error::Api {
            status,
            code,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }

    async fn empty(&self, rb: reqwest::RequestBuilder) -> Result<()> {
        self.send(rb).await.map(|_| ())
    }

    // ---- capsules ---------------------------------------------------------

    pub async fn capsules(&self) -> Result<Vec<Capsule>> {
        self.json(self.request(reqwest::Method::GET, "/v1/capsules"))
            .await
    }

    pub async fn capsule(&self, id: &str) -> Result<Capsule> {
        self.json(self.request(reqwest::Method::GET, &capsule_path(id, "")))
            .await
    }

    pub async fn create_capsule(&self, c: &CreateCapsule) -> Result<Capsule> {
        self.json(self.request(reqwest::Method::POST, "/v1/capsules").json(c))
            .await
    }

    pub async fn destroy_capsule(&self, id: &str) -> Result<()> {
        self.empty(self.request(reqwest::Method::DELETE, &capsule_path(id, "")))
            .await
    }

    pub async fn pause_capsule(&self, id: &str) -> Result<Capsule> {
        self.json(self.request(reqwest::Method::POST, &capsule_path(id, "/pause")))
            .await
    }

    pub async fn resume_capsule(&self, id: &str) -> Result<Capsule> {
        self.json(self.request(reqwest::Method::POST, &capsule_path(id, "/resume")))
            .await
    }

    // ---- exec ---------------------------------------------------------------

    /// Run a command to completion (`timeout_sec` 0: the server's 30 s).
    pub async fn exec(&self, id: &str, c: &Command, timeout_sec: u32) -> Result<ExecOutput> {
        let mut body = serde_json::to_value(c).map_err(|e| Error::Protocol(e.to_string()))?;
        if timeout_sec > 0 {
            body["timeout_sec"] = json!(timeout_sec);
        }
        let v: Value = self
            .json(
                self.request(reqwest::Method::POST, &capsule_path(id, "/exec"))
                    .json(&body),
            )
            .await?;
        let field = |k: &str| -> Result<Vec<u8>> {
            let s = v[k].as_str().unwrap_or_default();
            if v["encoding"] == "base64" {
                use base64_decode as d;
                d(s).ok_or_else(|| Error::Protocol(format!("{k} is not base64")))
            } else {
                Ok(s.as_bytes().to_vec())
            }
        };
        Ok(ExecOutput {
            stdout: field("stdout")?,
            stderr: field("stderr")?,
            exit_code: v["exit_code"].as_i64().unwrap_or(-1) as i32,
        })
    }

    /// Start a command in the background (it outlives this call); its pid.
    pub async fn exec_background(&self, id: &str, c: &Command, tag: Option<&str>) -> Result<u32> {
        let mut body = serde_json::to_value(c).map_err(|e| Error::Protocol(e.to_string()))?;
        body["background"] = json!(true);
        if let Some(t) = tag {
            body["tag"] = json!(t);
        }
        let v: Value = self
            .json(
                self.request(reqwest::Method::POST, &capsule_path(id, "/exec"))
                    .json(&body),
            )
            .await?;
        Ok(v["pid"].as_u64().unwrap_or(0) as u32)
    }

    /// Start a command and stream its output (`exec/stream`).
    pub async fn exec_stream(&self, id: &str, c: &Command) -> Result<ExecStream> {
        let mut socket = self.websocket(&capsule_path(id, "/exec/stream")).await?;
        let mut start = serde_json::to_value(c).map_err(|e| Error::Protocol(e.to_string()))?;
        start["type"] = json!("start");
        socket.send(Message::text(start.to_string())).await?;
        Ok(ExecStream::new(socket))
    }

    /// Follow a running process's output (by pid or tag), from now on.
    pub async fn attach(&self, id: &str, selector: &str) -> Result<ExecStream> {
        let path = capsule_path(id, &format!("/processes/{}/stream", encode(selector)));
        Ok(ExecStream::new(self.websocket(&path).await?))
    }

    /// A new terminal (`tag` None) or a reattach to an earlier one.
    pub async fn pty(
        &self,
        id: &str,
        cmd: Option<&str>,
        cols: u16,
        rows: u16,
        tag: Option<&str>,
    ) -> Result<PtySession> {
        let mut socket = self.websocket(&capsule_path(id, "/pty")).await?;
        let first = match tag {
            Some(t) => json!({"type": "connect", "tag": t}),
            None => {
                let mut m = json!({"type": "start", "cols": cols, "rows": rows});
                if let Some(c) = cmd {
                    m["cmd"] = json!(c);
                }
                m
            }
        };
        socket.send(Message::text(first.to_string())).await?;
        PtySession::open(socket, tag.map(str::to_owned)).await
    }

    async fn websocket(&self, path: &str) -> Result<ws::Socket> {
        let url = self
            .url(path)
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())?;
        req.headers_mut().insert(
            "x-api-key",
            self.key
                .parse()
                .map_err(|_| Error::Protocol("the API key is not a valid header".into()))?,
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((s, _)) => Ok(s),
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                    .unwrap_or(Value::Null);
                Err(Error::Api {
                    status,
                    code: body["error"]["code"].as_str().unwrap_or("").to_owned(),
                    message: body["error"]["message"]
                        .as_str()
                        .unwrap_or("the WebSocket upgrade was refused")
                        .to_owned(),
                })
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(Error::Protocol(format!("cannot reach {}: {e}", self.base)))
            }
            Err(e) => Err(e.into()),
        }
    }

    // ---- files --------------------------------------------------------------

    /// A file's contents, streamed.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<ByteStream> {
        let resp = self
            .send(
                self.request(
                    reqwest::Method::POST,
                    &capsule_path(id, "/files/stream/read"),
                )
                .json(&json!({ "path": path })),
            )
            .await?;
        Ok(Box::pin(resp.bytes_stream().map_err(Error::Http)))
    }

    /// Write a file from a stream (parents are created).
    pub async fn write_file<S>(&self, id: &str, path: &str, body: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body))
            .file_name("upload.bin")
            .mime_str("application/octet-stream")?;
        let form = reqwest::multipart::Form::new()
            .text("path", path.to_owned())
            .part("file", part);
        self.empty(
            self.request(
                reqwest::Method::POST,
                &capsule_path(id, "/files/stream/write"),
            )
            .multipart(form),
        )
        .await
    }

    /// A directory's contents as a tar stream, made in the capsule as it
    /// is read (`GET …/files/tar`, a Wrenn addition).
    pub async fn read_tar(&self, id: &str, dir: &str) -> Result<ByteStream> {
        let resp = self
            .send(
                self.request(reqwest::Method::GET, &capsule_path(id, "/files/tar"))
                    .query(&[("path", dir)]),
            )
            .await?;
        Ok(Box::pin(resp.bytes_stream().map_err(Error::Http)))
    }

    /// Unpack a tar stream into a directory of the capsule (created if
    /// missing, modes kept) as it is sent (`PUT …/files/tar`).
    pub async fn write_tar<S>(&self, id: &str, dir: &str, tar: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        self.empty(
            self.request(reqwest::Method::PUT, &capsule_path(id, "/files/tar"))
                .query(&[("path", dir)])
                .header("content-type", "application/x-tar")
                .body(reqwest::Body::wrap_stream(tar)),
        )
        .await
    }

    pub async fn list_dir(&self, id: &str, path: &str, depth: u32) -> Result<Vec<FileEntry>> {
        let v: Value = self
            .json(
                self.request(reqwest::Method::POST, &capsule_path(id, "/files/list"))
                    .json(&json!({"path": path, "depth": depth})),
            )
            .await?;
        serde_json::from_value(v["entries"].clone()).map_err(|e| Error::Protocol(e.to_string()))
    }

    pub async fn remove(&self, id: &str, path: &str) -> Result<()> {
        self.empty(
            self.request(reqwest::Method::POST, &capsule_path(id, "/files/remove"))
                .json(&json!({ "path": path })),
        )
        .await
    }

    // ---- templates, keys, hosts -----------------------------------------

    pub async fn templates(&self) -> Result<Vec<Template>> {
        self.json(self.request(reqwest::Method::GET, "/v1/snapshots"))
            .await
    }

    /// Snapshot a capsule into a template of the caller's team.
    pub async fn snapshot(&self, id: &str, name: &str, overwrite: bool) -> Result<Template> {
        let path = if overwrite {
            "/v1/snapshots?overwrite=true"
        } else {
            "/v1/snapshots"
        };
        self.json(
            self.request(reqwest::Method::POST, path)
                .json(&json!({"sandbox_id": id, "name": name})),
        )
        .await
    }

    pub async fn delete_template(&self, name: &str) -> Result<()> {
        self.empty(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/snapshots/{}", encode(name)),
        ))
        .await
    }

    /// Delete a platform template built from a recipe (admin key).
    pub async fn delete_platform_template(&self, name: &str) -> Result<()> {
        self.empty(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/admin/templates/{}", encode(name)),
        ))
        .await
    }

    /// Build a platform template from a recipe (admin key); waits for it
    /// and returns it with the build's log lines.
    pub async fn build_template(&self, b: &Build) -> Result<(Template, Vec<String>)> {
        let rb = self.request(reqwest::Method::POST, "/v1/admin/builds");
        let rb = match &b.context {
            None => rb.json(b),
            Some(archive) => {
                let build = serde_json::to_vec(b).map_err(|e| Error::Protocol(e.to_string()))?;
                let part = |bytes: Vec<u8>, mime: &str| {
                    reqwest::multipart::Part::bytes(bytes)
                        .mime_str(mime)
                        .expect("a valid MIME type")
                };
                rb.multipart(
                    reqwest::multipart::Form::new()
                        .part("config", part(build, "application/json"))
                        .part(
                            "archive",
                            part(archive.clone(), "application/x-tar").file_name("context.tar"),
                        ),
                )
            }
        }
        .timeout(std::time::Duration::from_secs(3600));
        let v: Value = self.json(rb).await?;
        let template = serde_json::from_value(v["template"].clone())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let logs = v["logs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect();
        Ok((template, logs))
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKey>> {
        self.json(self.request(reqwest::Method::GET, "/v1/api-keys"))
            .await
    }

    pub async fn create_api_key(&self, name: &str, kind: KeyKind) -> Result<NewKey> {
        let path = match kind {
            KeyKind::Wrenn => "/v1/api-keys",
            KeyKind::E2b => "/v1/api-keys?kind=e2b",
        };
        self.json(
            self.request(reqwest::Method::POST, path)
                .json(&json!({ "name": name })),
        )
        .await
    }

    pub async fn delete_api_key(&self, id: &str) -> Result<()> {
        self.empty(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/api-keys/{}", encode(id)),
        ))
        .await
    }

    pub async fn hosts(&self) -> Result<Vec<Host>> {
        self.json(self.request(reqwest::Method::GET, "/v1/hosts"))
            .await
    }
}

fn capsule_path(id: &str, rest: &str) -> String {
    format!("/v1/capsules/{}{rest}", encode(id))
}

/// What a path segment keeps unencoded (RFC 3986 unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encode a path segment (IDs and names are plain, but a user may
/// type anything).
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            capsule_path("cl-abc", "/pause"),
            "/v1/capsules/cl-abc/pause"
        );
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn base_urls_need_a_scheme() {
        assert!(Client::new("127.0.0.1:8000", "k").is_err());
        let c = Client::new("http://127.0.0.1:8000/", "k").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:8000");
    }
}
