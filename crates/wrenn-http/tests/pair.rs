//! A downstream connection's own upstream connection ([`wrenn_http::Pair`]),
//! through the real server: `serve` with a `Front` that relays every
//! request with `relay::forward` to a real hyper upstream that counts its
//! connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wrenn_http::{relay, Answer, Front, Pair, ProxyClient, ServerConfig};

/// An upstream that counts connections. `/peer` answers the client's
/// address; `/slow` streams three chunks 150 ms apart; `/close` answers
/// and closes the connection.
#[derive(Default)]
struct Upstream {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Upstream {
    async fn start() -> (Arc<Upstream>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(Upstream::default());
        let counts = up.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                counts.open.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: hyper::Request<_>| async move {
                            Ok::<_, Infallible>(Upstream::answer(req.uri().path(), peer))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (up, addr)
    }

    fn answer(path: &str, peer: SocketAddr) -> hyper::Response<UpBody> {
        let full = |s: String| Full::new(Bytes::from(s)).boxed();
        match path {
            "/slow" => {
                let chunks = futures::stream::unfold(0, |i| async move {
                    if i == 3 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from("x"))), i + 1))
                });
                hyper::Response::new(StreamBody::new(chunks).boxed())
            }
            "/close" => hyper::Response::builder()
                .header("connection", "close")
                .body(full(peer.to_string()))
                .unwrap(),
            _ => hyper::Response::new(full(peer.to_string())),
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Relays every request to the upstream (the second one when it
/// carries `x-to: 1`), over the connection's pair when it is free,
/// dialing with the current token.
#[derive(Debug)]
struct Relay {
    upstreams: Vec<SocketAddr>,
    client: ProxyClient,
    stop: Mutex<CancellationToken>,
}

impl Front for Relay {
    fn take(&self, req: Request, pair: &Arc<Pair>) -> Result<Answer, Request> {
        let upstream = self.upstreams[usize::from(req.headers().contains_key("x-to"))];
        let uri: http::Uri = format!("http://{upstream}{}", req.uri().path())
            .parse()
            .unwrap();
        let client = self.client.clone();
        let pair = pair.clone();
        let stop = self.stop.lock().unwrap().clone();
        Ok(Box::pin(async move {
            let via = relay::Via {
                pair: &pair,
                upstream,
                stop: &stop,
            };
            relay::forward(&client, Some(via), req, uri, |_| {}).await
        }))
    }
}

struct Proxy {
    addr: SocketAddr,
    front: Arc<Relay>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn proxy_to(upstream: SocketAddr) -> Proxy {
    proxy_to_all(vec![upstream]).await
}

async fn proxy_to_all(upstreams: Vec<SocketAddr>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front = Arc::new(Relay {
        upstreams,
        client: wrenn_http::proxy_client(None),
        stop: Mutex::new(CancellationToken::new()),
    });
    let config = ServerConfig {
        front: Some(front.clone()),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(wrenn_http::serve(
        listener,
        axum::Router::new(),
        config,
        async {
            let _ = rx.await;
        },
    ));
    Proxy {
        addr,
        front,
        _stop: tx,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

/// One HTTP/1.1 client connection to the proxy.
async fn connect(proxy: &Proxy) -> Sender {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// `GET path` on `tx`: status and body.
async fn get(tx: &mut Sender, path: &str) -> (u16, String) {
    get_from(tx, path, false).await
}

/// `GET path` on `tx`, for the second upstream if `second`.
async fn get_from(tx: &mut Sender, path: &str, second: bool) -> (u16, String) {
    tx.ready().await.unwrap();
    let mut req = hyper::Request::get(path)
        .header("host", "test")
        .body(http_body_util::Empty::new())
        .unwrap();
    if second {
        req.headers_mut()
            .insert("x-to", http::HeaderValue::from_static("1"));
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("no hang")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits up to 5 s for `cond`.
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_connection_has_one_upstream_connection() {
    let (up, addr) = Upstream::start().await;
    let proxy = proxy_to(addr).await;
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    let first = get(&mut a, "/peer").await;
    assert_eq!(first.0, 200);
    for _ in 0..5 {
        assert_eq!(get(&mut a, "/peer").await, first, "a kept its connection");
    }
    let other = get(&mut b, "/peer").await;
    assert_ne!(other.1, first.1, "b has a connection of its own");
    assert_eq!(get(&mut b, "/peer").await, other);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);

    // a client that goes away takes its upstream connection with it
    drop(a);
    assert!(eventually(|| up.open() == 1).await, "open: {}", up.open());
    assert_eq!(get(&mut b, "/peer").await, other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_keeps_to_its_upstream() {
    let (first, first_addr) = Upstream::start().await;
    let (second, second_addr) = Upstream::start().await;
    let proxy = proxy_to_all(vec![first_addr, second_addr]).await;
    // one client connection for both (a front proxy's, say)
    let mut a = connect(&proxy).await;
    let paired = get(&mut a, "/peer").await;
    for _ in 0..3 {
        let (status, _) = get_from(&mut a, "/peer", true).await;
        assert_eq!(status, 200);
        assert_eq!(get(&mut a, "/peer").await, paired, "still paired");
    }
    assert_eq!(
        first.accepted.load(Ordering::SeqCst),
        1,
        "never dialed again"
    );
    // once the pair's connection is gone, it is dialed for the next request
    get(&mut a, "/close").await;
    assert!(eventually(|| first.open() == 0).await);
    let pooled = second.accepted.load(Ordering::SeqCst);
    let (status, _) = get_from(&mut a, "/close", true).await;
    assert_eq!(status, 200);
    assert_eq!(
        second.accepted.load(Ordering::SeqCst),
        pooled + 1,
        "dialed as the pair"
    );
    assert_eq!(first.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_dialed_again() {
    let (up, addr) = Upstream::start().await;
    let proxy = proxy_to(addr).await;
    let mut a = connect(&proxy).await;
    let (status, closed) = get(&mut a, "/close").await;
    assert_eq!(status, 200);
    assert!(eventually(|| up.open() == 0).await);
    let (status, next) = get(&mut a, "/peer").await;
    assert_eq!(status, 200);
    assert_ne!(next, closed);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_closes_the_upstream_connection() {
    let (up, addr) = Upstream::start().await;
    let proxy = proxy_to(addr).await;
    let mut a = connect(&proxy).await;
    let (_, before) = get(&mut a, "/peer").await;
    assert_eq!(up.open(), 1);
    // (the capsule was destroyed: its route's token is cancelled)
    let old = std::mem::take(&mut *proxy.front.stop.lock().unwrap());
    old.cancel();
    assert!(eventually(|| up.open() == 0).await, "open: {}", up.open());
    // the client's connection stays, and a new route dials anew
    let (status, after) = get(&mut a, "/peer").await;
    assert_eq!(status, 200);
    assert_ne!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_do_not_wait_for_the_pair() {
    let (up, addr) = Upstream::start().await;
    let proxy = proxy_to(addr).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get2 = |path: &'static str| {
        let mut tx = tx.clone();
        async move {
            let req = hyper::Request::get(format!("http://test{path}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            let t = tokio::time::Instant::now();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8_lossy(&body).into_owned(), t.elapsed())
        }
    };
    let slow = tokio::spawn(get2("/slow"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // while /slow's answer still streams over the pair, a second stream
    // goes through the pool: it is answered before /slow ends
    let (peer, _) = get2("/peer").await;
    assert!(!peer.is_empty());
    assert!(!slow.is_finished(), "/peer waited for /slow");
    let (body, _) = slow.await.unwrap();
    assert_eq!(body, "xxx");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}
