//! A downstream connection's own upstream connection.
//!
//! A proxied request sent through a pooled client crosses two tasks: the
//! server connection's, which hands it over, and the pooled connection's,
//! which writes it and reads the answer; on a busy machine the two
//! tasks run on different workers and every request costs wake-ups
//! across threads. A [`Pair`] is one HTTP/1.1 connection to one upstream
//! that belongs to one downstream connection and is polled by that
//! connection's task ([`Pair::driving`]): a request and its answer then
//! move through one task, as they do through one nginx worker.
//!
//! - One request at a time. While the pair is in use (HTTP/2's concurrent
//!   streams), or still reading an earlier answer's body, a request goes
//!   through the pooled client instead: no request waits for another.
//! - The pair keeps to the upstream it was dialed for. A request for
//!   another (a front proxy may send many hosts' requests over one
//!   connection) goes through the pool, so that alternating upstreams
//!   never cost a dial each. The pair's connection closes when the
//!   downstream connection ends, when the upstream closes it, or when the
//!   token it was dialed with is cancelled (the capsule was destroyed);
//!   the next request dials anew, for its own upstream (with the pool's
//!   dial retries).
//! - A request the upstream closed a kept connection under before it was
//!   sent goes again on a new connection, as the pool retries it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use http::header::{self, HeaderValue};
use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::{ProxyBody, ProxyClient};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// See the module's documentation.
#[derive(Default)]
pub struct Pair {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The connection's upstream and its sender; taken while a request
    /// has it.
    conn: Option<(SocketAddr, SendRequest<ProxyBody>)>,
    /// A request has the pair.
    busy: bool,
    /// The connection, driven by the downstream connection's task.
    driver: Option<Driver>,
    /// That task.
    waker: Option<Waker>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Pair")
            .field("upstream", &g.conn.as_ref().map(|c| c.0))
            .field("busy", &g.busy)
            .field("connected", &g.driver.is_some())
            .finish()
    }
}

/// [`Pair::driving`]'s future.
pub struct Driving<'a, F> {
    pair: &'a Pair,
    f: F,
}

impl<F: Future + Unpin> Future for Driving<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.pair.poll_drive(cx);
        Pin::new(&mut self.f).poll(cx)
    }
}

/// What a request finds the pair doing.
enum Claim {
    /// Idle and connected to the request's upstream.
    Ready(SendRequest<ProxyBody>),
    /// Not connected (any more).
    Dial,
    /// Serving another request, or connected to another upstream.
    Busy,
}

/// Releases a claim, also when the request is dropped half-way.
struct Held<'a>(&'a Pair);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.lock().busy = false;
    }
}

impl Pair {
    /// Run `f` (the downstream connection), driving the pair's connection
    /// in the same task: before `f` on every poll, so that an answer the
    /// pair has read is ready for the request waiting on it.
    pub fn driving<F: Future + Unpin>(&self, f: F) -> Driving<'_, F> {
        Driving { pair: self, f }
    }

    fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut g = self.lock();
        if !g.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            g.waker = Some(cx.waker().clone());
        }
        if let Some(driver) = g.driver.as_mut() {
            if driver.as_mut().poll(cx).is_ready() {
                g.driver = None;
                g.conn = None;
            }
        }
    }

    /// Send `req` (absolute URI, `http://{addr}/…`) over the pair, or
    /// through `client` while the pair is busy. `stop` ends a connection
    /// dialed for it.
    pub async fn send(
        &self,
        client: &ProxyClient,
        req: http::Request<ProxyBody>,
        addr: SocketAddr,
        stop: &CancellationToken,
    ) -> Result<http::Response<Incoming>, BoxError> {
        let claim = self.claim(addr);
        let mut kept = match claim {
            Claim::Busy => return Ok(client.request(req).await?),
            Claim::Ready(tx) => Some(tx),
            Claim::Dial => None,
        };
        let _held = Held(self);
        let mut req = origin_form(req);
        loop {
            // (a kept connection the upstream closed just as the request
            // went out is retried once on a new one, as the pool does; a
            // new connection is not)
            let reused = kept.is_some();
            let mut sender = match kept.take() {
                Some(s) => s,
                None => self.dial(addr, stop).await?,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.lock().conn = Some((addr, sender));
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// The pair's state. (A panic while it is held, in hyper's code
    /// driving the connection, leaves it as consistent as any other
    /// moment: it is used on.)
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn claim(&self, addr: SocketAddr) -> Claim {
        let mut g = self.lock();
        if g.busy || !enabled() {
            return Claim::Busy;
        }
        let claim = match g.conn.take() {
            None => Claim::Dial,
            Some((_, tx)) if tx.is_closed() => Claim::Dial,
            Some((a, tx)) if a == addr && tx.is_ready() => Claim::Ready(tx),
            // still reading an earlier answer's body, or another upstream's
            Some(kept) => {
                g.conn = Some(kept);
                Claim::Busy
            }
        };
        g.busy = !matches!(claim, Claim::Busy);
        claim
    }

    /// A new connection to `addr`, which replaces the pair's (closed) one.
    async fn dial(
        &self,
        addr: SocketAddr,
        stop: &CancellationToken,
    ) -> Result<SendRequest<ProxyBody>, BoxError> {
        let tcp = crate::dial_with_retry(addr).await?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let stop = stop.clone();
        let driver = async move {
            tokio::select! {
                res = conn => if let Err(err) = res {
                    tracing::debug!(%err, %addr, "paired upstream connection failed");
                },
                () = stop.cancelled() => {}
            }
        };
        let mut g = self.lock();
        g.driver = Some(Box::pin(driver));
        // The downstream connection's task polls it from its next run on.
        if let Some(w) = &g.waker {
            w.wake_by_ref();
        }
        Ok(tx)
    }
}

/// Whether pairs are used: `WRENN_PROXY_PAIR=off` sends every request
/// through the pool (benchmarks' A/B runs).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WRENN_PROXY_PAIR").map_or(true, |v| v != "off"))
}

/// `req` as an HTTP/1.1 client sends it: the target in origin form, and
/// a `Host` header (the authority's, unless the request has one), as the
/// pooled client makes it.
fn origin_form(mut req: http::Request<ProxyBody>) -> http::Request<ProxyBody> {
    let uri = std::mem::take(req.uri_mut());
    if !req.headers().contains_key(header::HOST) {
        // (without http's default port, as the pooled client writes it)
        let host = uri.authority().map(|a| match a.port_u16() {
            Some(80) | None => a.host(),
            Some(_) => a.as_str(),
        });
        if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let path = uri.into_parts().path_and_query;
    *req.uri_mut() = path.map_or_else(|| Uri::from_static("/"), Uri::from);
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn request(uri: &str, host: Option<&str>) -> http::Request<ProxyBody> {
        let mut req = http::Request::get(uri);
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        let body = http_body_util::Empty::new().map_err(|e| match e {});
        req.body(body.boxed_unsync()).unwrap()
    }

    fn host(req: &http::Request<ProxyBody>) -> &str {
        req.headers()[header::HOST].to_str().unwrap()
    }

    #[test]
    fn requests_go_out_in_origin_form_with_a_host() {
        let req = origin_form(request("http://10.0.0.2:8080/a/b/?x=1", None));
        assert_eq!(req.uri(), "/a/b/?x=1");
        assert_eq!(host(&req), "10.0.0.2:8080");
        // http's default port is left out, as the pooled client does
        let req = origin_form(request("http://10.0.0.2:80/", None));
        assert_eq!(host(&req), "10.0.0.2");
        // the client's own Host is kept
        let req = origin_form(request(
            "http://10.0.0.2:49983/health",
            Some("49983-x.localhost"),
        ));
        assert_eq!(
            (req.uri().to_string().as_str(), host(&req)),
            ("/health", "49983-x.localhost")
        );
        let req = origin_form(request("http://10.0.0.2:3000", None));
        assert_eq!(req.uri(), "/");
    }
}
