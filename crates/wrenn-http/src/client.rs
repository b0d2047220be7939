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
