//! An answer given before the request's body was read: the body is read
//! on after it (up to `DRAIN_LIMIT`), so the connection serves the next
//! request, as Go's server does; a longer declared body closes the
//! connection and the answer says so (`Connection: close`), so that a
//! pooled client never writes its next request into a connection being
//! dropped. Raw HTTP/1.1 over TCP against the real `serve`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn server() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        // refuses from the head alone, as a proxy does for a paused capsule
        .route("/early", post(|| async { StatusCode::BAD_GATEWAY }))
        .route("/read", post(|body: String| async move { body }));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(wrenn_http::serve(
        listener,
        router,
        wrenn_http::ServerConfig::default(),
        async {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// Read one answer's head and its `Content-Length` body; the head in lower case.
async fn answer(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.unwrap();
    head
}

/// Whether the server closes `tcp` (EOF) within a second.
async fn closes(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const HEAD: &str = "Host: test\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n";

#[tokio::test]
async fn a_body_sent_after_the_answer_is_read_and_the_connection_goes_on() {
    let (addr, _stop) = server().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // the head alone; the body follows the answer, as a streaming client's does
    tcp.write_all(format!("POST /early HTTP/1.1\r\n{HEAD}").as_bytes())
        .await
        .unwrap();
    let head = answer(&mut tcp).await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(b"hello").await.unwrap();
    tcp.write_all(b"POST /read HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let head = answer(&mut tcp).await;
    assert!(
        head.starts_with("http/1.1 200"),
        "the next request is served: {head}"
    );
}

#[tokio::test]
async fn an_answer_before_a_body_too_long_to_drain_closes_and_says_so() {
    let (addr, _stop) = server().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let len = wrenn_http::DRAIN_LIMIT + 1;
    tcp.write_all(
        format!("POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = answer(&mut tcp).await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(
        closes(&mut tcp).await,
        "the connection is dropped as announced"
    );
}

#[tokio::test]
async fn an_answer_after_the_body_keeps_the_connection() {
    let (addr, _stop) = server().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(format!("POST /read HTTP/1.1\r\n{HEAD}").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tcp.write_all(b"hello").await.unwrap();
        let head = answer(&mut tcp).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    // and a request without a body answered at once keeps it too
    tcp.write_all(b"POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let head = answer(&mut tcp).await;
    assert!(
        head.starts_with("http/1.1 502") && !head.contains("connection: close"),
        "{head}"
    );
    assert!(!closes(&mut tcp).await);
}
