//! Relaying one HTTP request to an upstream: the pieces every proxy hop
//! (the agent's port proxy, the control plane's subdomain proxy) shares.
//!
//! - [`forward`] sends a plain request through a pooled [`ProxyClient`]
//!   (or a downstream connection's [`Pair`](crate::Pair)) with hop-by-hop
//!   headers and `X-API-Key` removed.
//! - [`tunnel`] handles `Upgrade` requests (WebSockets): a connection of
//!   its own, the upstream's 101 passed back, then a byte tunnel owned by
//!   the caller's [`TaskTracker`] and ended by any of its
//!   [`CancellationToken`]s.
//! - [`cut_on`] makes a streamed response fail (not end cleanly) when a
//!   token is cancelled: a client reading a capsule's stream learns that
//!   the capsule went away instead of waiting forever.
//! - A refusal made by a proxy hop itself (rather than passed through from
//!   the upstream) carries [`PROXY_ERROR`], so the next hop can tell "port
//!   not open" from an upstream's own 502.
//! - [`LocalProxy`] is a port proxy in the caller's own process: a control
//!   plane whose agent runs beside it (`wrenn up`) hands plain requests to
//!   it directly, with no HTTP hop between them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ProxyClient;

/// A port proxy living in the caller's process. `serve` answers a plain
/// (non-`Upgrade`) request whose URI is the path form
/// `/proxy/{capsule}/{port}/…`, exactly as the proxy's HTTP listener
/// would, refusals included.
pub trait LocalProxy: Send + Sync + std::fmt::Debug {
    fn serve(self: Arc<Self>, req: Request) -> crate::Answer;

    /// The same for an `Upgrade` request (a WebSocket): this proxy dials
    /// the capsule and, after the 101, owns the tunnel, which also ends
    /// when `stop` (the caller's route: pause, destroy) is cancelled.
    fn tunnel(self: Arc<Self>, req: Request, stop: CancellationToken) -> crate::Answer;

    /// The same for a request already known to be for `to`, its
    /// `Location` headers left in the capsule's own terms (no path-form
    /// prefix: what a subdomain client needs), sent over `pair` (the
    /// downstream connection's own upstream connection) when it is free.
    fn serve_port(
        self: Arc<Self>,
        to: PortTarget<'_>,
        req: Request,
        pair: Arc<crate::Pair>,
    ) -> crate::Answer;
}

/// Where in a capsule a request goes.
#[derive(Debug, Clone, Copy)]
pub struct PortTarget<'a> {
    pub capsule: &'a str,
    pub port: u16,
    pub path_and_query: &'a str,
}

/// A plain-text response (proxy errors are not JSON: the caller is a
/// browser or an arbitrary HTTP client).
pub fn plain(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

/// Header on a refusal made by a proxy hop: `unreachable` (nothing
/// listens on the port, or the next hop is down), `not-found` (no such
/// capsule) or `not-running`.
pub const PROXY_ERROR: &str = "x-wrenn-proxy-error";

/// A proxy hop's own refusal, plain text and marked with [`PROXY_ERROR`].
pub fn refused(status: StatusCode, kind: &'static str, msg: impl Into<String>) -> Response {
    let mut resp = plain(status, msg);
    resp.headers_mut()
        .insert(PROXY_ERROR, HeaderValue::from_static(kind));
    resp
}

/// The [`PROXY_ERROR`] kind of a response, if a proxy hop refused it.
pub fn refusal_kind(resp: &Response) -> Option<&str> {
    resp.headers()
        .get(PROXY_ERROR)
        .and_then(|v| v.to_str().ok())
}

/// Typed names: removing by `&str` parses the name again on every call.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
/// The API key header, which no proxy hop passes on.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Remove the headers that belong to one hop (RFC 9110 §7.6.1), including
/// those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Whether a request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// An error and its sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn add_forwarded(h: &mut HeaderMap) {
    if let Some(host) = h.get(header::HOST).cloned() {
        h.entry(X_FORWARDED_HOST).or_insert(host);
    }
    h.entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
}

/// A downstream connection's [`Pair`](crate::Pair), for a request to
/// `upstream` (the authority of the request's URI); a connection dialed
/// for it ends when `stop` is cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Via<'a> {
    pub pair: &'a crate::Pair,
    pub upstream: SocketAddr,
    pub stop: &'a CancellationToken,
}

/// Send `req` to `uri` (absolute) through `client`, or `via` a downstream
/// connection's own upstream connection when it is free. A failure to
/// reach the upstream is a 502 `proxy error: …` (clients such as wrenn's
/// code runner retry on 5xx and give up on 4xx). `fix` edits the
/// upstream's response headers (Location rewriting).
pub async fn forward(
    client: &ProxyClient,
    via: Option<Via<'_>>,
    req: Request,
    uri: Uri,
    fix: impl FnOnce(&mut HeaderMap),
) -> Response {
    let (mut parts, body) = req.into_parts();
    // HTTP/2 carries the host as `:authority`, not `Host`: kept as `Host`,
    // or the capsule would see its own address (from `uri`)
    if !parts.headers.contains_key(header::HOST) {
        let authority = parts.uri.authority().map(|a| a.as_str());
        if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(X_API_KEY);
    add_forwarded(&mut parts.headers);
    let body = body
        .map_err(|e| std::io::Error::other(ClientBody(e.to_string())))
        .boxed_unsync();
    let req = http::Request::from_parts(parts, body);
    let sent = match via {
        Some(via) => via.pair.send(client, req, via.upstream, via.stop).await,
        None => client.request(req).await.map_err(Into::into),
    };
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            fix(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        // the client's own body was broken (a bad chunk size): its mistake
        Err(e) if has_source::<ClientBody>(&*e) => refused(
            StatusCode::BAD_REQUEST,
            "request_body",
            format!("malformed request body: {}", error_chain(&*e)),
        ),
        Err(e) => refused(
            StatusCode::BAD_GATEWAY,
            "unreachable",
            format!("proxy error: {}", error_chain(&*e)),
        ),
    }
}

/// A failure reading the client's request body, as relayed upstream.
#[derive(Debug)]
struct ClientBody(String);

impl std::fmt::Display for ClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client's body: {}", self.0)
    }
}

impl std::error::Error for ClientBody {}

/// Whether `e` or one of its sources is a `T`.
fn has_source<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // (an io::Error's `source` skips its own payload)
        let payload = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if err.is::<T>() || payload.is_some_and(|p| p.is::<T>()) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `resp` with a body that fails once `stop` is cancelled (an empty one
/// has nothing to cut).
pub fn cut_on(resp: Response, stop: CancellationToken) -> Response {
    let (parts, body) = resp.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return Response::from_parts(parts, body);
    }
    let cut = CutBody {
        inner: body,
        stop,
        waiting: None,
    };
    Response::from_parts(parts, Body::new(cut))
}

/// The token is watched from the first time the body has to wait (a body
/// whose upstream vanished waits forever), and from then on before each
/// frame; a small answer that is there at once never touches it (its
/// waiter list is shared by every request to the capsule).
struct CutBody {
    inner: Body,
    stop: CancellationToken,
    waiting: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl CutBody {
    fn cut() -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(
            "the capsule went away",
        )))))
    }
}

impl http_body::Body for CutBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Some(waiting) = this.waiting.as_mut() {
            if waiting.as_mut().poll(cx).is_ready() {
                return CutBody::cut();
            }
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.waiting.is_none() {
            let mut waiting = Box::pin(this.stop.clone().cancelled_owned());
            if waiting.as_mut().poll(cx).is_ready() {
                return CutBody::cut();
            }
            this.waiting = Some(waiting);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Relay an `Upgrade` request to `upstream` at `path_and_query`. The
/// connection to the upstream and, after its 101, the byte tunnel are
/// tasks on `tasks`, ended when any of `stops` is cancelled (a route's,
/// and the caller's when the request came from another proxy in this
/// process).
/// With `tls` the tunnel's connection is TLS, the upstream's certificate
/// checked against the name given with it.
pub async fn tunnel(
    mut req: Request,
    upstream: SocketAddr,
    tls: Option<(&std::sync::Arc<crate::tls::rustls::ClientConfig>, &str)>,
    path_and_query: &str,
    tasks: &TaskTracker,
    stops: &[CancellationToken],
    fix: impl FnOnce(&mut HeaderMap),
) -> Response {
    let dialed = match crate::dial_with_retry(upstream).await {
        Ok(tcp) => match tls {
            None => Ok(crate::Conn::plain(tcp)),
            Some((tls, name)) => {
                let tls = crate::tls::TlsConnector::from(tls.clone());
                let handshake = crate::Conn::tls(tcp, &tls, name);
                match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(conn) => conn,
                    Err(_) => Err(std::io::Error::other("TLS handshake timed out")),
                }
            }
        },
        Err(e) => Err(e),
    };
    let stream = match dialed {
        Ok(s) => s,
        Err(e) => {
            return refused(
                StatusCode::BAD_GATEWAY,
                "unreachable",
                format!("proxy error: {e}"),
            )
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("proxy error: {e}")),
    };
    let conn_stops = stops.to_vec();
    tasks.spawn(async move {
        tokio::select! {
            _ = conn.with_upgrades() => {}
            _ = any_cancelled(&conn_stops) => {}
        }
    });
    let mut up = http::Request::builder()
        .method(req.method().clone())
        .uri(path_and_query);
    for (k, v) in req.headers() {
        if k != X_API_KEY {
            up = up.header(k, v);
        }
    }
    let up = match up.body(http_body_util::Empty::<bytes::Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let resp = match sender.send_request(up).await {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("proxy error: {e}")),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        fix(&mut parts.headers);
        return Response::from_parts(parts, Body::new(body));
    }
    let (parts, _) = resp.into_parts();
    let mut upstream_resp = http::Response::from_parts(parts.clone(), ());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
    let stops = stops.to_vec();
    tasks.spawn(async move {
        let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else {
            return;
        };
        let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
            _ = any_cancelled(&stops) => {}
        }
    });
    Response::from_parts(parts, Body::empty())
}

/// Done once any of `stops` is cancelled (never, for none).
async fn any_cancelled(stops: &[CancellationToken]) {
    let mut waits: Vec<_> = stops.iter().map(|s| Box::pin(s.cancelled())).collect();
    std::future::poll_fn(|cx| {
        // (every wait is polled, not only up to the first ready one, so
        // each holds this task's waker)
        let mut done = false;
        for w in &mut waits {
            done |= w.as_mut().poll(cx).is_ready();
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}
