//! The accept loop. Protocol: one task per connection in a `JoinSet`; a
//! `watch` channel tells every connection to shut down gracefully; connections
//! that have not finished `shutdown_grace` after that are aborted.
//!
//! Traffic classes on the CPU: a server given a [`BulkClass`] looks at each
//! connection's first request head (peeked, not consumed) and serves the
//! connections it calls bulk (user traffic to capsule ports) on a runtime of
//! their own ([`bulk_runtime`]: its own worker threads, niced). Their byte
//! copying then never queues in front of RPC tasks (a PTY keystroke's
//! relay) on the main runtime's workers, and the kernel favours the RPC
//! threads when the CPUs are saturated. A kept-alive connection stays in
//! the class its first request chose.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Timeouts of one server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a client may take to send a request's headers.
    pub read_header_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// How long open connections get to finish after shutdown is asked.
    pub shutdown_grace: Duration,
    /// Where bulk connections are served, if they are told apart.
    pub bulk: Option<BulkClass>,
    /// TLS: once it is installed, or required, nothing is served plain.
    pub tls: crate::tls::TlsSlot,
    /// Tried on every request before the router.
    pub front: Option<Arc<dyn Front>>,
}

/// A response on its way.
pub type Answer = Pin<Box<dyn Future<Output = axum::response::Response> + Send>>;

/// A handler in front of the router: it answers the requests it takes (a
/// proxy's hot path, spared the router's dispatch and middleware) and
/// hands the others back, untouched, to the router. (Requests it is
/// shown carry no `ConnectInfo`; the router's get it.) `pair` is the
/// connection's own upstream connection, driven by its task, for the
/// requests it relays.
pub trait Front: Send + Sync + std::fmt::Debug {
    // (The request is handed back by value, as tower's services take it.)
    #[allow(clippy::result_large_err)]
    fn take(
        &self,
        req: axum::extract::Request,
        pair: &Arc<crate::Pair>,
    ) -> Result<Answer, axum::extract::Request>;
}

/// Whether a connection whose first request has this path and these
/// headers carries bulk user traffic.
pub type Classify = fn(&str, &http::HeaderMap) -> bool;

/// Bulk connections and the runtime that serves them.
#[derive(Debug, Clone)]
pub struct BulkClass {
    pub runtime: tokio::runtime::Handle,
    pub classify: Classify,
}

impl BulkClass {
    /// `classify` on the process's [`bulk_runtime`].
    pub fn new(classify: Classify) -> BulkClass {
        BulkClass {
            runtime: bulk_runtime().clone(),
            classify,
        }
    }
}

/// How much less CPU weight bulk workers get than the rest of the process:
/// added to the process's nice value (the kernel gives a thread at +5
/// about a third of the weight of one at 0). `WRENN_BULK_NICE` overrides
/// it (benchmarks).
pub const BULK_NICE: i32 = 5;

/// The process's runtime for bulk connections: one worker per CPU, named
/// `wrenn-bulk`, each [`BULK_NICE`] nicer than the process (at most 19).
/// Started on first use; lives as long as the process.
pub fn bulk_runtime() -> &'static tokio::runtime::Handle {
    static BULK: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    BULK.get_or_init(|| {
        let step = std::env::var("WRENN_BULK_NICE")
            .ok()
            .and_then(|n| n.parse::<i32>().ok())
            .unwrap_or(BULK_NICE);
        // nice values are per thread: relative to the thread starting this
        let nice = (thread_nice(0) + step).clamp(-20, 19);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("wrenn-bulk")
            .on_thread_start(move || {
                // Linux: a thread's nice value is its own (tid as the who).
                // Raising it needs no privilege; failure only costs priority.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
                }
            })
            .enable_all()
            .build()
            .expect("start the bulk runtime");
        let handle = rt.handle().clone();
        // The runtime is never dropped (dropping it inside another runtime
        // would panic); its threads end with the process.
        std::mem::forget(rt);
        handle
    })
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            read_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(620),
            shutdown_grace: Duration::from_secs(5),
            bulk: None,
            tls: Default::default(),
            front: None,
        }
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let accepted_at = Instant::now();
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                let config = config.clone();
                let stop = stop_rx.clone();
                conns.spawn(async move {
                    serve_accepted(stream, peer, router, config, stop, accepted_at).await;
                    tracing::trace!(%peer, "connection closed");
                });
            }
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.shutdown().await;
    }
    Ok(())
}

/// Serve one accepted connection here, or on the bulk runtime when its
/// first request is bulk (under TLS: when its client offers
/// [`ALPN_BULK`](crate::tls::ALPN_BULK)). The TLS handshake is made where
/// the connection is served, within the read-header timeout.
async fn serve_accepted(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: axum::Router,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
    accepted_at: Instant,
) {
    let tls = config.tls.current();
    if tls.is_none() && config.tls.is_required() {
        return tracing::debug!(%peer, "no TLS configuration yet: closing");
    }
    let deadline = accepted_at + config.read_header_timeout;
    let bulk = match &config.bulk {
        Some(b) => {
            let is_bulk = match &tls {
                None => first_request_is(&stream, b.classify, deadline).await,
                Some(_) => hello_offers_bulk(&stream, deadline).await,
            };
            is_bulk.then(|| b.runtime.clone())
        }
        None => None,
    };
    let Some(rt) = bulk else {
        return serve_maybe_tls(stream, tls, peer, router, config, stop, accepted_at).await;
    };
    // Re-registered with the bulk runtime's reactor.
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(err) => return tracing::debug!(%err, "cannot move a connection"),
    };
    let task = rt.spawn(async move {
        if let Ok(stream) = TcpStream::from_std(std) {
            serve_maybe_tls(stream, tls, peer, router, config, stop, accepted_at).await;
        }
    });
    let _abort = AbortOnDrop(task.abort_handle());
    let _ = task.await;
}

async fn serve_maybe_tls(
    stream: TcpStream,
    tls: Option<crate::tls::TlsAcceptor>,
    peer: std::net::SocketAddr,
    router: axum::Router,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
    accepted_at: Instant,
) {
    let Some(tls) = tls else {
        return serve_connection(stream, peer, router, config, stop, accepted_at).await;
    };
    let deadline = accepted_at + config.read_header_timeout;
    match tokio::time::timeout_at(deadline.into(), tls.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, peer, router, config, stop, accepted_at).await,
        Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake too slow: closing"),
    }
}

/// The nice value of thread `tid` (0: the calling thread), or 0 when it
/// cannot be read.
pub fn thread_nice(tid: u32) -> i32 {
    // SAFETY: plain syscalls. getpriority can return -1 as a value, so
    // errno tells an error apart.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// Aborts a task served elsewhere when the connection's own task is
/// dropped (the accept loop's shutdown deadline).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `judge` makes of the first bytes on `stream` (peeked, left
/// unread): it answers `None` while they are not enough to tell. No
/// verdict in 8 KiB, or by `deadline`, is `false`: the connection is then
/// served, and timed, as usual.
async fn peek_until(
    stream: &TcpStream,
    deadline: Instant,
    mut judge: impl FnMut(&[u8]) -> Option<bool>,
) -> bool {
    let mut buf = vec![0u8; 8192];
    // Between looks at a partial head: 2 ms, doubling to 100 ms, so a
    // client that stalls mid-head costs a few peeks a second, not hundreds.
    let mut pause = Duration::from_millis(2);
    loop {
        let peeked = tokio::time::timeout_at(deadline.into(), stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        if let Some(verdict) = judge(&buf[..n]) {
            return verdict;
        }
        // The rest is on its way: a peek returns at once while unread
        // bytes wait, so look again a little later. (A ready peek wins
        // over an expired `timeout_at`: hence the deadline check here.)
        if n == buf.len() || Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether the first request head on `stream` is one `classify` calls
/// bulk; anything but a whole HTTP/1 head (HTTP/2's preface, garbage) is not.
async fn first_request_is(stream: &TcpStream, classify: Classify, deadline: Instant) -> bool {
    peek_until(stream, deadline, |bytes| {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(bytes) {
            Ok(httparse::Status::Complete(_)) => {
                let mut map = http::HeaderMap::new();
                for h in req.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(h.name.as_bytes()),
                        http::HeaderValue::from_bytes(h.value),
                    ) {
                        map.append(name, value);
                    }
                }
                Some(classify(req.path.unwrap_or("/"), &map))
            }
            Ok(httparse::Status::Partial) => None,
            Err(_) => Some(false),
        }
    })
    .await
}

/// Whether the TLS ClientHello on `stream` offers [`crate::tls::ALPN_BULK`].
async fn hello_offers_bulk(stream: &TcpStream, deadline: Instant) -> bool {
    peek_until(stream, deadline, |bytes| {
        match crate::tls::hello_offers(bytes) {
            Ok(Some(alpn)) => Some(alpn.iter().any(|p| p == crate::tls::ALPN_BULK)),
            Ok(None) => None,
            Err(()) => Some(false),
        }
    })
    .await
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    peer: std::net::SocketAddr,
    router: axum::Router,
    config: ServerConfig,
    mut stop: watch::Receiver<bool>,
    accepted_at: Instant,
) {
    let state = Arc::new(ConnState::new(accepted_at));
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        state: state.clone(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header-read timer also runs while a kept-alive connection
    // waits for its next request, which would make 10 s the idle timeout:
    // both are enforced below instead.
    builder.http1().header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let front = config.front.clone();
    let pair = Arc::new(crate::Pair::default());
    let service = hyper::service::service_fn({
        let state = state.clone();
        let pair = pair.clone();
        move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = InFlight::start(&state);
            let version = req.version();
            let (req, read) = ReadToEnd::watch(req);
            let declared = http_body::Body::size_hint(req.body()).lower();
            let routed = |mut req: axum::extract::Request| {
                // Handlers may ask for the peer (`ConnectInfo<SocketAddr>`).
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), req)
            };
            let answer = match &front {
                Some(front) => front.take(req, &pair).map_err(routed),
                None => Err(routed(req)),
            };
            async move {
                let res = match answer {
                    Ok(taken) => taken.await,
                    Err(routed) => routed.await?,
                };
                let mut res = res;
                if version <= http::Version::HTTP_11 && !read.done() {
                    close_if_undrainable(&mut res, declared);
                }
                Ok::<_, std::convert::Infallible>(res.map(|body| {
                    axum::body::Body::new(Tracked {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let check =
        (config.read_header_timeout.min(config.idle_timeout) / 4).max(Duration::from_millis(10));
    let mut shutting_down = false;
    loop {
        tokio::select! {
            res = pair.driving(conn.as_mut()) => {
                if let Err(err) = res {
                    tracing::debug!(%err, "connection ended with error");
                }
                return;
            }
            _ = stop.changed(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(check) => {
                if state.head_overdue(config.read_header_timeout) {
                    tracing::debug!(%peer, "request headers too slow: closing");
                    return;
                }
                if !shutting_down && state.idle_for() >= config.idle_timeout {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What the timeouts of one connection need to know, in milliseconds since
/// it was accepted. Go's semantics: `read_header_timeout` runs from the
/// accept, or from the first byte of a later request, until the request's
/// headers are parsed; a kept-alive connection waiting for that first byte
/// is only bound by `idle_timeout`. Neither bounds the time spent answering.
///
/// One gap: a second request pipelined behind the first (sent before the
/// first's answer is done) is not timed, since its bytes cannot be told
/// from the first's body here; such a connection is bound by the idle
/// timeout only, as one uploading a body slowly is.
struct ConnState {
    epoch: Instant,
    /// When a byte last moved either way.
    last_io: AtomicU64,
    /// When the head of the request now being read began ([`NO_HEAD`]: none).
    head_since: AtomicU64,
    /// Requests being answered (their response bodies not yet dropped).
    in_flight: AtomicU64,
    /// HTTP/2: no request heads to time. (An upgraded connection leaves
    /// [`serve_connection`] altogether.)
    framed: AtomicBool,
    /// Whether the first bytes read decided between HTTP/2's preface and not.
    sniffed: AtomicBool,
    /// The first bytes read, while they could still be the preface.
    first: std::sync::Mutex<Vec<u8>>,
}

const NO_HEAD: u64 = u64::MAX;
/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl ConnState {
    /// A connection accepted at `epoch`: its first head is timed from then.
    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            framed: AtomicBool::new(false),
            sniffed: AtomicBool::new(false),
            first: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now()
                .saturating_sub(self.last_io.load(Ordering::Relaxed)),
        )
    }

    fn head_overdue(&self, limit: Duration) -> bool {
        let since = self.head_since.load(Ordering::Relaxed);
        since != NO_HEAD
            && !self.framed.load(Ordering::Relaxed)
            && Duration::from_millis(self.now().saturating_sub(since)) >= limit
    }

    /// Bytes arrived: the first bytes of a connection may be HTTP/2's
    /// preface (all of it: a head that merely starts like it is HTTP/1's
    /// and timed); on an idle HTTP/1 connection they begin a request head.
    fn read(&self, bytes: &[u8]) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if !self.sniffed.load(Ordering::Relaxed) {
            let mut first = self.first.lock().unwrap();
            let take = (H2_PREFACE.len() - first.len()).min(bytes.len());
            first.extend_from_slice(&bytes[..take]);
            if !H2_PREFACE.starts_with(&first) {
                self.sniffed.store(true, Ordering::Relaxed);
            } else if first.len() == H2_PREFACE.len() {
                self.framed.store(true, Ordering::Relaxed);
                self.sniffed.store(true, Ordering::Relaxed);
            }
        }
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let _ = self.head_since.compare_exchange(
                NO_HEAD,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// One request being answered; dropped with its response body.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.head_since.store(NO_HEAD, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is read of a request body its handler dropped unread, at most.
pub const DRAIN_LIMIT: u64 = 1 << 20;
/// How long such a body is read.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Whether a request's body was read to its end (or had none).
#[derive(Clone)]
struct ReadToEnd(Arc<AtomicBool>);

impl ReadToEnd {
    /// The request with a body that reports when it has been read to its
    /// end, and is drained if dropped before ([`Watched`]).
    fn watch(req: http::Request<hyper::body::Incoming>) -> (axum::extract::Request, ReadToEnd) {
        let read = ReadToEnd(Arc::new(AtomicBool::new(http_body::Body::is_end_stream(
            req.body(),
        ))));
        let watched = read.clone();
        let req = req.map(|inner| {
            axum::body::Body::new(Watched {
                inner: Some(inner),
                read: watched,
            })
        });
        (req, read)
    }

    fn done(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An HTTP/1 answer given while its request's body is unread and longer
/// than [`DRAIN_LIMIT`]: hyper drops the connection once the answer is
/// out (the drain gives up), so the client is told not to send its next
/// request there: a pooled client that did would see "connection closed
/// before message completed". Upgrades are left alone.
fn close_if_undrainable(res: &mut http::Response<axum::body::Body>, remaining: u64) {
    if remaining > DRAIN_LIMIT && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// A request body that flags its end on a [`ReadToEnd`]. Dropped unread
/// (a handler that answered from the head: a refusal, a 502 for a paused
/// capsule), it goes on being read after the answer, up to [`DRAIN_LIMIT`]
/// for [`DRAIN_TIME`], as Go's server does. hyper would otherwise close
/// the connection after the answer, which a pooled client may already be
/// sending its next request on (E2B's SDK did, after such a 502), and
/// which, with body bytes still arriving, the kernel turns into a reset
/// that can cost the client the answer itself.
struct Watched {
    inner: Option<hyper::body::Incoming>,
    read: ReadToEnd,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(&mut *inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || inner.is_end_stream() {
            self.read.0.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.read.done() {
            return;
        }
        let (Some(body), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if http_body::Body::size_hint(&body).lower() > DRAIN_LIMIT {
            return; // closed at once ([`close_if_undrainable`])
        }
        rt.spawn(async move {
            let mut body = body;
            let mut read = 0u64;
            let drained = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > DRAIN_LIMIT {
                        break;
                    }
                }
            });
            if drained.await.is_err() {
                tracing::debug!("unread request body not drained in time");
            }
        });
    }
}

/// A response body that holds its request's [`InFlight`] until dropped.
struct Tracked {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that reports what it reads and when it moves a byte.
struct TrackedIo<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.read(&buf.filled()[before..]);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.state
                .last_io
                .store(self.state.now(), Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.state
                .last_io
                .store(self.state.now(), Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        config: ServerConfig,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route("/echo", axum::routing::get(upgrade_to_echo))
            .route(
                "/slow",
                axum::routing::post(|| async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "slow"
                }),
            );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, config, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// A server with these timeouts in ms (`None`: the default).
    async fn start_timed(
        header_ms: Option<u64>,
        idle_ms: Option<u64>,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let d = ServerConfig::default();
        start(ServerConfig {
            read_header_timeout: header_ms.map_or(d.read_header_timeout, Duration::from_millis),
            idle_timeout: idle_ms.map_or(d.idle_timeout, Duration::from_millis),
            ..d
        })
        .await
    }

    /// `GET /` on `s`, answered 200.
    async fn get_ok(s: &mut tokio::net::TcpStream) {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    }

    /// Answers `Upgrade: echo` with 101, then echoes the raw bytes.
    async fn upgrade_to_echo(mut req: axum::extract::Request) -> axum::response::Response {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.unwrap());
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        axum::response::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(axum::body::Body::empty())
            .unwrap()
    }

    /// Reads until the peer closes, or `wait` passes: whether it closed.
    async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off() {
        let (addr, _stop) = start_timed(Some(200), None).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (possibly after a 408) instead of
        // waiting for the rest of the headers forever.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("server closed the slow connection")
            .unwrap_or(0);
        assert!(n == 0 || String::from_utf8_lossy(&buf).contains("408"));
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (addr, _stop) = start_timed(None, Some(300)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_ok(&mut s).await;
        let mut buf = vec![0u8; 1024];
        let rest = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("idle connection closed");
        assert_eq!(rest.unwrap(), 0);
    }

    /// A request whose handler outlasts both the header-read and the idle
    /// timeouts still gets its answer: those bound the wait for a request,
    /// not the time spent answering one.
    #[tokio::test]
    async fn slow_handlers_are_not_cut_off() {
        let (addr, _stop) = start_timed(Some(200), Some(300)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    }

    /// A keep-alive connection waiting for its next request is bound by the
    /// idle timeout, not by the header-read one (Go's `IdleTimeout` and
    /// `ReadHeaderTimeout`): a client that pools connections must not find
    /// them closed under it after a few seconds.
    #[tokio::test]
    async fn keep_alive_outlives_the_header_timeout() {
        let (addr, _stop) = start_timed(Some(200), None).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            get_ok(&mut s).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }

    /// The header-read timeout also runs from the first byte of a later
    /// request on a kept-alive connection.
    #[tokio::test]
    async fn slow_later_headers_are_cut_off() {
        let (addr, _stop) = start_timed(Some(200), None).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_ok(&mut s).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    }

    /// Neither an HTTP/2 connection nor an upgraded one has request heads
    /// to time: quiet spells longer than the header-read timeout are fine.
    #[tokio::test]
    async fn framed_connections_are_not_bound_by_the_header_timeout() {
        let (addr, _stop) = start_timed(Some(200), None).await;
        // HTTP/2 with prior knowledge: the preface and an empty SETTINGS.
        let mut h2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        assert!(!closed_within(&mut h2, Duration::from_millis(800)).await);

        let mut up = tokio::net::TcpStream::connect(addr).await.unwrap();
        up.write_all(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = up.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 101"), "{text:?}");
        up.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        up.write_all(b"y").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf))
                .await
                .expect("echo")
                .unwrap();
            assert!(n > 0, "upgraded connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"xy");
    }

    /// A head that only starts like HTTP/2's preface, or a preface cut
    /// short, is timed like any HTTP/1 head.
    #[tokio::test]
    async fn only_a_whole_preface_is_http2() {
        let (addr, _stop) = start_timed(Some(200), None).await;
        for start in [
            &b"PRI /x HTTP/1.1\r\nHost: a\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
        ] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(start).await.unwrap();
            assert!(
                closed_within(&mut s, Duration::from_secs(5)).await,
                "{:?} held the connection open",
                String::from_utf8_lossy(start)
            );
        }
        // the whole preface, split across writes, is HTTP/2
        let mut h2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        h2.write_all(b"\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        assert!(!closed_within(&mut h2, Duration::from_millis(800)).await);
    }

    /// A server whose connections that begin with `/bulk…` are bulk; every
    /// route answers the serving thread's name and nice value.
    async fn start_classified(
        header_ms: u64,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        start_classified_tls(header_ms, Default::default()).await
    }

    async fn start_classified_tls(
        header_ms: u64,
        tls: crate::tls::TlsSlot,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        async fn whoami() -> String {
            let t = std::thread::current();
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            format!("{} {nice}", t.name().unwrap_or("?"))
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/api", axum::routing::get(whoami))
            .route("/bulk", axum::routing::get(whoami));
        let config = ServerConfig {
            read_header_timeout: Duration::from_millis(header_ms),
            bulk: Some(BulkClass::new(|path, headers| {
                path.starts_with("/bulk") && headers.contains_key(http::header::HOST)
            })),
            tls,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, config, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Send `head` in pieces, read one answer, return its body.
    async fn ask(s: &mut (impl AsyncRead + AsyncWrite + Unpin), pieces: &[&str]) -> String {
        for p in pieces {
            s.write_all(p.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_connections_are_served_on_the_niced_bulk_runtime() {
        let (addr, _stop) = start_classified(10_000).await;
        let bulk = format!("wrenn-bulk {}", (thread_nice(0) + BULK_NICE).min(19));
        let own = format!(" {}", thread_nice(0));
        // a bulk first request: served there, and so is the next one on
        // the same connection
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            ask(&mut s, &["GET /bulk HTTP/1.1\r\nHost: x\r\n\r\n"]).await,
            bulk
        );
        assert_eq!(
            ask(&mut s, &["GET /api HTTP/1.1\r\nHost: x\r\n\r\n"]).await,
            bulk
        );
        // an API first request stays on the main runtime
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let main = ask(&mut s, &["GET /api HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(
            !main.starts_with("wrenn-bulk") && main.ends_with(&own),
            "{main}"
        );
        assert_eq!(
            ask(&mut s, &["GET /bulk HTTP/1.1\r\nHost: x\r\n\r\n"]).await,
            main
        );
        // a head that arrives in pieces is classified once it is whole
        // (the classifier needs the Host header, which comes last)
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let got = ask(&mut s, &["GET /bu", "lk HTTP/1.1\r\n", "Host: x\r\n\r\n"]).await;
        assert_eq!(got, bulk);
    }

    /// Classifying waits no longer than the header timeout allows.
    #[tokio::test]
    async fn a_slow_head_is_still_cut_off_when_classifying() {
        let (addr, _stop) = start_classified(300).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /bulk HTTP/1.1\r\n").await.unwrap();
        let t0 = Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate.
    fn pki() -> (String, crate::tls::Identity, crate::tls::Identity) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = |sans: Vec<String>, usage| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.extended_key_usages = vec![usage];
            crate::tls::Identity {
                cert_pem: p.signed_by(&key, &issuer).unwrap().pem(),
                key_pem: key.serialize_pem(),
            }
        };
        let server = leaf(vec!["127.0.0.1".into()], Eku::ServerAuth);
        let client = leaf(vec![], Eku::ClientAuth);
        (ca_pem, server, client)
    }

    /// Under TLS the ClientHello's ALPN picks the class, whatever the
    /// path: `wrenn-bulk` is served on the bulk runtime, `http/1.1` on the
    /// main one. Plain HTTP is no longer served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_tls_the_client_hello_picks_the_class() {
        use crate::tls::{client_config, with_alpn, ALPN_BULK, ALPN_HTTP1};
        let (ca, server, client) = pki();
        let slot = crate::tls::TlsSlot::default();
        slot.install(crate::tls::server_config(&server, &ca).unwrap());
        let (addr, _stop) = start_classified_tls(10_000, slot).await;
        let bulk = format!("wrenn-bulk {}", (thread_nice(0) + BULK_NICE).min(19));
        let agents = crate::tls::AgentVerifier::new(&ca).unwrap();
        let me = crate::tls::ClientCert::new(&client).unwrap();
        let config = client_config(&agents, &me).unwrap();
        let dial = |alpn: &'static [u8]| {
            let tls = crate::tls::TlsConnector::from(with_alpn(&config, alpn));
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                crate::Conn::tls(tcp, &tls, "127.0.0.1").await.unwrap()
            }
        };
        let mut s = dial(ALPN_BULK).await;
        assert_eq!(
            ask(&mut s, &["GET /api HTTP/1.1\r\nHost: x\r\n\r\n"]).await,
            bulk
        );
        let mut s = dial(ALPN_HTTP1).await;
        let main = ask(&mut s, &["GET /bulk HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(!main.starts_with("wrenn-bulk"), "{main}");
        // a ClientHello that arrives in pieces is classified once whole
        let trickle = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trickle_addr = trickle.local_addr().unwrap();
        tokio::spawn(async move {
            let (client, _) = trickle.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let mut buf = [0u8; 64];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let tcp = tokio::net::TcpStream::connect(trickle_addr).await.unwrap();
        let tls = crate::tls::TlsConnector::from(with_alpn(&config, ALPN_BULK));
        let mut s = crate::Conn::tls(tcp, &tls, "127.0.0.1").await.unwrap();
        assert_eq!(
            ask(&mut s, &["GET /api HTTP/1.1\r\nHost: x\r\n\r\n"]).await,
            bulk
        );
        // plain HTTP gets nothing
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "{buf:?}");
    }

    /// A server that requires TLS serves nobody until it has it.
    #[tokio::test]
    async fn required_tls_serves_nothing_before_it_is_installed() {
        let slot = crate::tls::TlsSlot::default();
        slot.require();
        let (addr, _stop) = start_classified_tls(10_000, slot.clone()).await;
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut plain, Duration::from_secs(5)).await);
        let (ca, server, client) = pki();
        slot.install(crate::tls::server_config(&server, &ca).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let agents = crate::tls::AgentVerifier::new(&ca).unwrap();
        let me = crate::tls::ClientCert::new(&client).unwrap();
        let tls = crate::tls::TlsConnector::from(crate::tls::client_config(&agents, &me).unwrap());
        let mut s = crate::Conn::tls(tcp, &tls, "127.0.0.1").await.unwrap();
        let who = ask(&mut s, &["GET /api HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert!(!who.is_empty());
    }
}
