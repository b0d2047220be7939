//! Client construction. Each call to [`client`] makes a new pool: callers own
//! their transport, so traffic classes never share one by accident.

use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::tls::AgentTls;

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
/// `https` URIs are dialed with its TLS client (an agent, [`crate::tls`]);
/// without one they are refused.
#[derive(Clone)]
pub struct RetryConnector {
    inner: HttpConnector,
    attempts: u32,
    step: Duration,
    tls: Option<TlsConnector>,
    names: crate::tls::NameMap,
}

impl std::fmt::Debug for RetryConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryConnector")
            .field("attempts", &self.attempts)
            .field("step", &self.step)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for RetryConnector {
    type Response = TokioIo<Conn>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        use tower::ServiceExt;
        let (inner, attempts, step) = (self.inner.clone(), self.attempts.max(1), self.step);
        let tls = self.tls.clone();
        let names = self.names.clone();
        Box::pin(async move {
            let secure = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let tls = match (secure, tls) {
                (false, _) => None,
                (true, Some(tls)) => Some(tls),
                (true, None) => return Err("https without a TLS client".into()),
            };
            let mut attempt = 1;
            let tcp = loop {
                match inner.clone().oneshot(uri.clone()).await {
                    Ok(conn) => break conn.into_inner(),
                    Err(e) if attempt >= attempts => return Err(e.into()),
                    Err(_) => {
                        tokio::time::sleep(step * attempt).await;
                        attempt += 1;
                    }
                }
            };
            let conn = match tls {
                None => Conn::plain(tcp),
                Some(tls) => {
                    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                    let name = names
                        .name_at(authority)
                        .ok_or_else(|| format!("no agent is known at {authority}"))?;
                    let handshake = Conn::tls(tcp, &tls, &name);
                    tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, handshake)
                        .await
                        .map_err(|_| format!("TLS handshake with {name} timed out"))??
                }
            };
            Ok(TokioIo::new(conn))
        })
    }
}

/// A connection a [`RetryConnector`] made: plain TCP, or TLS over it.
pub struct Conn(Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Either::Left(_) => "Conn::Plain",
            Either::Right(_) => "Conn::Tls",
        })
    }
}

impl Conn {
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn(Either::Left(tcp))
    }

    /// TLS over `tcp`, checking the server's certificate names `host`.
    pub async fn tls(tcp: TcpStream, tls: &TlsConnector, host: &str) -> std::io::Result<Conn> {
        let name = crate::tls::server_name(host).map_err(std::io::Error::other)?;
        Ok(Conn(Either::Right(tls.connect(name, tcp).await?)))
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match &self.0 {
            Either::Left(tcp) => tcp.connected(),
            Either::Right(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(crate::tls::ALPN_H2) {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
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

/// A connector (`TCP_NODELAY`, 5 s connect timeout; TLS to agents with
/// `tls`) whose dials are retried `attempts` times with linear backoff of
/// `step`.
fn retrying(attempts: u32, step: Duration, tls: Option<AgentTls>) -> RetryConnector {
    let (tls, names) = match tls {
        Some(t) => (Some(t.config), t.names),
        None => (None, Default::default()),
    };
    let mut inner = HttpConnector::new();
    inner.set_nodelay(true);
    inner.set_connect_timeout(Some(DIAL_TIMEOUT));
    // https reaches it too: TLS is layered on in `call`
    inner.enforce_http(false);
    RetryConnector {
        inner,
        attempts,
        step,
        tls: tls.map(TlsConnector::from),
        names,
    }
}

/// Idle connections the proxy pool keeps per upstream. wrenn's proxy keeps
/// 20; with more clients than that on one port, connections came back to a
/// full pool, were closed and were dialed again (3% of the requests of 32
/// keep-alive clients, each a new connection envd had to accept).
pub const PROXY_IDLE_PER_HOST: usize = 128;

/// The proxy transport: HTTP/1.1 only (HTTP/2 disabled), its own pool of
/// at most [`PROXY_IDLE_PER_HOST`] idle connections per host kept 120 s,
/// `TCP_NODELAY`, and dials retried with linear backoff for ports that are
/// just coming up. `tls` (with the class's ALPN, [`crate::tls::with_alpn`])
/// dials `https` to agents, checked against the names it maps their
/// addresses to.
pub fn proxy_client(tls: Option<AgentTls>) -> ProxyClient {
    let connector = retrying(PROXY_DIAL_ATTEMPTS, PROXY_DIAL_STEP, tls);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(PROXY_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// An RPC transport: HTTP/2 only (h2c, or h2 over TLS to agents), one
/// multiplexed connection per host, `TCP_NODELAY`, with the proxy client's
/// body type so that the control plane's benchmark can, on purpose, send
/// proxied requests over the same connection as RPC streams (the seed's bug).
/// `tls` dials `https` to agents (offering `h2`), as [`proxy_client`].
pub fn rpc_h2_client(tls: Option<AgentTls>) -> ProxyClient {
    let tls = tls.map(|t| AgentTls {
        config: crate::tls::with_alpn(&t.config, crate::tls::ALPN_H2),
        names: t.names,
    });
    let connector = retrying(2, Duration::from_millis(100), tls);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .pool_idle_timeout(Duration::from_secs(600))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// How long one dial of [`dial_with_retry`] may take (the proxy pool's
/// connect timeout).
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Dial `addr` with the proxy's retry policy (for upgrade tunnels and
/// [`Pair`](crate::Pair)s, which need a connection of their own).
pub async fn dial_with_retry(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let mut attempt = 1;
    loop {
        let dialed = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match dialed {
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
