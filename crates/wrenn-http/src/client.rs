//! Client construction. Each call to [`client`] makes a new pool: callers own
//! their transport, so traffic classes never share one by accident.

use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The request body type our clients send.
pub type ClientBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A pooled plain-HTTP client.
pub type HttpClient = Client<HttpConnector, ClientBody>;

/// Which HTTP version a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1 only; HTTP/2 disabled (proxy traffic, file transfers).
    Http1,
    /// HTTP/2 with prior knowledge (h2c) only (RPC streams).
    Http2,
}

/// A new client with its own connection pool and `TCP_NODELAY` on.
pub fn client(version: HttpVersion) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(10)));
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if version == HttpVersion::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// A connector that retries refused or failed dials: `attempts` tries in
/// all, waiting `step`, `2 × step`, … between them (linear backoff). It
/// bridges the moment between a server starting and its port opening.
#[derive(Debug, Clone)]
pub struct RetryConnector {
    inner: HttpConnector,
    attempts: u32,
    step: Duration,
}

impl tower::Service<http::Uri> for RetryConnector {
    type Response = <HttpConnector as tower::Service<http::Uri>>::Response;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        use tower::ServiceExt;
        let (inner, attempts, step) = (self.inner.clone(), self.attempts.max(1), self.step);
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                match inner.clone().oneshot(uri.clone()).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) if attempt >= attempts => return Err(e),
                    Err(_) => {
                        tokio::time::sleep(step * attempt).await;
                        attempt += 1;
                    }
                }
            }
        })
    }
}

/// Bodies relayed by the proxy (request bodies from a server are not `Sync`).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// A pooled HTTP/1.1 client whose dials are retried.
pub type ProxyClient = Client<RetryConnector, ProxyBody>;

/// Dial attempts of the proxy transport, and the backoff step between them
/// (waits of 1×, 2× the step): a port that opens within 1.5 s of the
/// first dial is reached. (wrenn waits 100 and 200 ms; a server that takes
/// a second to bind, or envd's forwarder scanning once a second, needs more.)
pub const PROXY_DIAL_ATTEMPTS: u32 = 3;
pub const PROXY_DIAL_STEP: Duration = Duration::from_millis(500);

/// A plain-HTTP connector (`TCP_NODELAY`, 5 s connect timeout) whose dials
/// are retried `attempts` times with linear backoff of `step`.
fn retrying(attempts: u32, step: Duration) -> RetryConnector {
    let mut inner = HttpConnector::new();
    inner.set_nodelay(true);
    inner.set_connect_timeout(Some(Duration::from_secs(5)));
    inner.enforce_http(true);
    RetryConnector {
        inner,
        attempts,
        step,
    }
}

/// The proxy transport: HTTP/1.1 only (HTTP/2 disabled), its own pool of
/// at most 20 idle connections per host kept 120 s, `TCP_NODELAY`, and
/// dials retried with linear backoff for ports that are just coming up.
pub fn proxy_client() -> ProxyClient {
    let connector = retrying(PROXY_DIAL_ATTEMPTS, PROXY_DIAL_STEP);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(20)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// An RPC transport: HTTP/2 with prior knowledge (h2c) only, one
/// multiplexed connection per host, `TCP_NODELAY`, with the proxy client's
/// body type so that the control plane's benchmark can, on purpose, send
/// proxied requests over the same connection as RPC streams (the seed's bug).
pub fn rpc_h2_client() -> ProxyClient {
    let connector = retrying(2, Duration::from_millis(100));
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .pool_idle_timeout(Duration::from_secs(600))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Dial `addr` with the proxy's retry policy (for upgrade tunnels, which
/// need a connection of their own).
pub async fn dial_with_retry(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let mut attempt = 1;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if attempt >= PROXY_DIAL_ATTEMPTS => return Err(e),
            Err(_) => {
                tokio::time::sleep(PROXY_DIAL_STEP * attempt).await;
                attempt += 1;
            }
        }
    }
}
