//! A client for envd, the daemon inside every capsule.
//!
//! Each [`EnvdClient`] owns its transports: one Connect RPC client and one
//! plain HTTP/1.1 client for `/files` and friends, each with its own
//! connection pool and `TCP_NODELAY` on. Nothing is shared between clients,
//! so one capsule's traffic cannot stall another's.
//!
//! Streams ([`EnvdClient::exec_stream`], [`EnvdClient::pty_start`]) are read
//! by a task that owns the RPC stream and forwards events into a channel of
//! [`STREAM_BUFFER`] events; the channel closes after the end event, and
//! dropping the receiving handle aborts the task (cancellation). A slow
//! consumer blocks that task, which stops reading the RPC stream, so memory
//! stays bounded and HTTP/2 flow control pushes back to envd.

mod error;
mod files;
mod process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use connectrpc::client::{ClientConfig, HttpClient};
use http::Uri;
use wrenn_proto::filesystem::FilesystemClient;
use wrenn_proto::process::ProcessClient;
use wrenn_types::envd::{InitRequest, Metrics, ACCESS_TOKEN_HEADER};

pub use error::ClientError;
pub use files::{Entry, FileKind, FileStream};
pub use process::{
    ExecEvent, ExecOutput, ExecRequest, ExecStream, ProcessSummary, PtySize, Selector,
};

/// `Ok(true)` on success, `Ok(false)` when envd answered `absent` (already
/// there, not there): the SDK-style boolean answers of make_dir and kill.
pub(crate) fn false_on<T>(
    res: Result<T, connectrpc::ConnectError>,
    absent: connectrpc::ErrorCode,
) -> Result<bool, ClientError> {
    match res {
        Ok(_) => Ok(true),
        Err(e) if e.code == absent => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Capacity of the event channel behind every stream handle.
pub const STREAM_BUFFER: usize = 256;

/// A client for one envd.
pub struct EnvdClient {
    base: String,
    token: Option<String>,
    process: ProcessClient<HttpClient>,
    fs: FilesystemClient<HttpClient>,
    http: wrenn_http::HttpClient,
}

impl std::fmt::Debug for EnvdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvdClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl EnvdClient {
    /// A client for the envd at `base_url` (`http://host:port`).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::build(base_url, None)
    }

    /// A client that sends `token` as `X-Access-Token` on every request.
    pub fn with_access_token(base_url: &str, token: &str) -> Result<Self, ClientError> {
        Self::build(base_url, Some(token.to_string()))
    }

    fn build(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|_| ClientError::InvalidUrl(base_url.to_string()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(ClientError::InvalidUrl(base_url.to_string()));
        }
        // Binary protobuf: SDKs speak JSON to envd, but for our own hops the
        // binary codec is what keeps output streaming cheap (no base64).
        let mut config = ClientConfig::new(uri);
        if let Some(t) = &token {
            config = config.with_default_header(ACCESS_TOKEN_HEADER, t.as_str());
        }
        // One Connect transport (its own pool, TCP_NODELAY) shared by the two
        // service stubs of this client only.
        let rpc = HttpClient::plaintext();
        Ok(Self {
            process: ProcessClient::new(rpc.clone(), config.clone()),
            fs: FilesystemClient::new(rpc, config),
            http: wrenn_http::client(wrenn_http::HttpVersion::Http1),
            base,
            token,
        })
    }

    /// The envd base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: http::Method, path_and_query: &str) -> http::request::Builder {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if let Some(t) = &self.token {
            b = b.header(ACCESS_TOKEN_HEADER, t.as_str());
        }
        b
    }

    /// A request without a body.
    fn bodyless(
        &self,
        method: http::Method,
        path_and_query: &str,
    ) -> Result<http::Request<wrenn_http::ClientBody>, ClientError> {
        self.request(method, path_and_query)
            .body(files::empty())
            .map_err(ClientError::request)
    }

    async fn send(
        &self,
        req: http::Request<wrenn_http::ClientBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let resp = self
            .http
            .request(req)
            .await
            .map_err(ClientError::transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error::from_http_response(resp).await)
    }

    /// Poll `GET /health` until it answers 2xx or `timeout` passes.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), ClientError> {
        let until = Instant::now() + timeout;
        loop {
            let req = self.bodyless(http::Method::GET, "/health")?;
            let last = match tokio::time::timeout(Duration::from_secs(2), self.send(req)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "health check timed out".to_string(),
            };
            if Instant::now() >= until {
                return Err(ClientError::NotHealthy(last));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `POST /init` with the default user and env vars.
    pub async fn post_init(
        &self,
        default_user: Option<&str>,
        env_vars: BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        self.init(InitRequest {
            default_user: default_user.map(str::to_string),
            env_vars: (!env_vars.is_empty()).then_some(env_vars),
            ..Default::default()
        })
        .await
    }

    /// `POST /init` with a full body.
    pub async fn init(&self, body: InitRequest) -> Result<(), ClientError> {
        let json = serde_json::to_vec(&body).map_err(ClientError::request)?;
        let req = self
            .request(http::Method::POST, "/init")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(files::full(Bytes::from(json)))
            .map_err(ClientError::request)?;
        self.send(req).await.map(drop)
    }

    /// `POST /snapshot/prepare`: quiesce envd's background work.
    pub async fn prepare_snapshot(&self) -> Result<(), ClientError> {
        let req = self.bodyless(http::Method::POST, "/snapshot/prepare")?;
        self.send(req).await.map(drop)
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Result<Metrics, ClientError> {
        let req = self.bodyless(http::Method::GET, "/metrics")?;
        let resp = self.send(req).await?;
        let body = files::collect(resp).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}
