//! The port proxy against real servers in a `minimal` (Debian) capsule:
//! python's http.server (redirects keep the prefix, listings link right),
//! a WebSocket echo server, a server that binds a second after the first
//! request, one bound to 127.0.0.1 only (reached through envd's
//! forwarder); paused capsules answer 503, destroyed ones 404 with their
//! routes evicted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::TestAgent;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use wrenn_agent::proxy::PortProxy;
use wrenn_agent::server::AgentServer;
use wrenn_types::ids::CapsuleId;

const WS_ECHO: &str = include_str!("../../../tests/support/ws_echo.py");

/// Answers every GET with its peer's port and the agent token it saw.
const WHO: &str = r#"
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class Who(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        seen = self.headers.get('X-Wrenn-Agent-Token', '-')
        body = ('%d %s' % (self.client_address[1], seen)).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(('0.0.0.0', 8010), Who).serve_forever()
"#;

struct Served {
    t: TestAgent,
    addr: SocketAddr,
    proxy: Arc<PortProxy>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Served {
    async fn start() -> Served {
        let t = TestAgent::start_with_minimal().await;
        let server = AgentServer::new(t.agent.clone());
        let proxy = server.proxy().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = rx.await;
        }));
        Served {
            t,
            addr,
            proxy,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn minimal(&self) -> CapsuleId {
        let mut req = self.t.busybox();
        req.template = "minimal".parse().unwrap();
        req.memory_mb = 256;
        let id = req.id.clone();
        self.t
            .agent
            .create(req)
            .await
            .expect("create a minimal capsule");
        id
    }

    /// A WebSocket handshake to `url` that carries the agent's token.
    fn ws_request(&self, url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            wrenn_agent::auth::AGENT_TOKEN_HEADER,
            self.t.agent.token().parse().unwrap(),
        );
        req
    }

    async fn get(&self, path: &str) -> (u16, http::HeaderMap, String) {
        let client = wrenn_http::client(wrenn_http::HttpVersion::Http1);
        self.get_on(&client, path, true).await
    }

    /// `path` through `client` (its pool keeps its connection), with the
    /// agent's token if `token`.
    async fn get_on(
        &self,
        client: &wrenn_http::HttpClient,
        path: &str,
        token: bool,
    ) -> (u16, http::HeaderMap, String) {
        let mut req = http::Request::get(format!("http://{}{path}", self.addr));
        if token {
            req = req.header(
                wrenn_agent::auth::AGENT_TOKEN_HEADER,
                &*self.t.agent.token().to_string(),
            );
        }
        let req = req
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
            .await
            .expect("no hang")
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// `path` on `port` of `id` through [`LocalProxy::serve_port`]:
    /// status, Location, body.
    async fn by_port(&self, id: &CapsuleId, port: u16, path: &str) -> (u16, String, String) {
        use wrenn_http::relay::LocalProxy;
        let req = axum::extract::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let to = wrenn_http::relay::PortTarget {
            capsule: id.as_str(),
            port,
            path_and_query: path,
        };
        // (the pair's connection is driven as a server drives it: by the
        // task that waits for the answer)
        let pair = Arc::new(wrenn_http::Pair::default());
        let answer = self.proxy.clone().serve_port(to, req, pair.clone());
        let answered = pair.driving(Box::pin(async {
            let resp = answer.await;
            let status = resp.status().as_u16();
            let location = resp
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                location,
                String::from_utf8_lossy(&body).into_owned(),
            )
        }));
        tokio::time::timeout(Duration::from_secs(20), answered)
            .await
            .expect("no hang")
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_proxy_end_to_end() {
    let s = Served::start().await;
    let id = s.minimal().await;
    let envd = s.t.agent.running(&id).unwrap();
    envd.envd().make_dir("/srv/docs").await.unwrap();
    envd.envd()
        .write_file("/srv/docs/a.txt", Bytes::from_static(b"file a\n"))
        .await
        .unwrap();
    envd.envd()
        .write_file("/srv/ws.py", Bytes::from_static(WS_ECHO.as_bytes()))
        .await
        .unwrap();

    // python's http.server, asked at once: the retries cover its start-up
    s.t.spawn(&id, "web", "cd /srv && exec python3 -m http.server 8000")
        .await;
    let base = format!("/proxy/{id}/8000");
    let (status, headers, _) = s.get(&format!("{base}/docs")).await;
    assert_eq!(status, 301);
    assert_eq!(
        headers["location"],
        format!("{base}/docs/").as_str(),
        "redirect keeps the prefix"
    );
    let (status, _, body) = s.get(&format!("{base}/docs/")).await;
    assert_eq!(status, 200);
    assert!(body.contains("href=\"a.txt\""), "{body}");
    // in-process by port (the control plane of `wrenn up`): the capsule's
    // own Location, for a subdomain client
    let (status, location, body) = s.by_port(&id, 8000, "/docs?x=1").await;
    assert_eq!((status, location.as_str()), (301, "/docs/?x=1"), "{body}");
    let (status, _, body) = s.by_port(&id, 8000, "/docs/a.txt").await;
    assert_eq!((status, body.as_str()), (200, "file a\n"));
    let (status, _, body) = s.get(&format!("{base}/docs/a.txt?download=1")).await;
    assert_eq!((status, body.as_str()), (200, "file a\n"));
    let (status, _, _) = s.get(&format!("{base}/docs/missing.txt")).await;
    assert_eq!(status, 404);

    // a server that starts listening a second after the request
    s.t.spawn(
        &id,
        "late",
        "sleep 1; cd /srv && exec python3 -m http.server 8001",
    )
    .await;
    let (status, _, body) = s.get(&format!("/proxy/{id}/8001/docs/a.txt")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "file a\n"),
        "reached thanks to the dial retries"
    );

    // bound to 127.0.0.1 only: reached through envd's port forwarder
    s.t.spawn(
        &id,
        "local",
        "cd /srv && exec python3 -m http.server 8002 --bind 127.0.0.1",
    )
    .await;
    let mut last = (0, String::new());
    for _ in 0..20 {
        let (status, _, body) = s.get(&format!("/proxy/{id}/8002/docs/a.txt")).await;
        last = (status, body);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last, (200, "file a\n".to_string()));

    // nothing listens: 502 after the retries, never 404
    let (status, _, body) = s.get(&format!("/proxy/{id}/9999/")).await;
    assert_eq!(status, 502, "{body}");

    // each client connection has its own upstream connection (its pair):
    // through a shared pool, b's request would take a's idle one; and the
    // agent's token goes no further than the agent
    envd.envd()
        .write_file("/srv/who.py", Bytes::from_static(WHO.as_bytes()))
        .await
        .unwrap();
    s.t.spawn(&id, "who", "exec python3 /srv/who.py").await;
    let who = format!("/proxy/{id}/8010/");
    let (a, b) = (
        wrenn_http::client(wrenn_http::HttpVersion::Http1),
        wrenn_http::client(wrenn_http::HttpVersion::Http1),
    );
    let (status, _, a1) = s.get_on(&a, &who, true).await;
    assert_eq!(status, 200, "{a1}");
    let (_, _, b1) = s.get_on(&b, &who, true).await;
    let (_, _, a2) = s.get_on(&a, &who, true).await;
    assert!(a1.ends_with(" -"), "the token was forwarded: {a1}");
    assert_eq!(a1, a2, "a client connection keeps its upstream connection");
    assert_ne!(a1, b1, "another client connection has its own");
    // without the token: refused, not proxied
    let (status, _, body) = s.get_on(&a, &who, false).await;
    assert_eq!(status, 401, "{body}");

    // WebSocket echo through the tunnel
    s.t.spawn(&id, "ws", "exec python3 /srv/ws.py").await;
    let url = format!("ws://{}/proxy/{id}/8765/echo", s.addr);
    let mut ws = None;
    for _ in 0..40 {
        if let Ok((conn, _)) = tokio_tungstenite::connect_async(s.ws_request(&url)).await {
            ws = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut ws = ws.expect("websocket through the proxy");
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text("hello capsule".into()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::Text("hello capsule".into()));
    ws.send(Message::Binary(vec![0u8, 255, 7].into()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::Binary(vec![0u8, 255, 7].into()));
    ws.close(None).await.unwrap();
    // a second tunnel stays open until the capsule is destroyed (below)
    let (mut held, _) = tokio_tungstenite::connect_async(s.ws_request(&url))
        .await
        .unwrap();
    held.send(Message::Text("still here".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), held.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::Text("still here".into()));

    // bad requests
    assert_eq!(s.get("/proxy/not-an-id/80/").await.0, 400);
    assert_eq!(s.get(&format!("/proxy/{id}/0/")).await.0, 400);
    assert_eq!(s.get(&format!("/proxy/{id}/99999/")).await.0, 400);
    assert_eq!(
        s.get(&format!("/proxy/{}/80/", CapsuleId::random()))
            .await
            .0,
        404
    );

    // paused: 503; resumed: served again
    assert!(s.proxy.cached_routes() >= 4);
    s.t.agent.pause(&id).await.unwrap();
    assert_eq!(s.get(&format!("{base}/docs/a.txt")).await.0, 503);
    assert_eq!(s.by_port(&id, 8000, "/docs/a.txt").await.0, 503);
    s.t.agent.resume(&id).await.unwrap();
    assert_eq!(s.get(&format!("{base}/docs/a.txt")).await.0, 200);

    // destroyed: routes evicted, tunnels closed, 404
    s.t.agent.destroy(&id).await.unwrap();
    assert_eq!(s.proxy.cached_routes(), 0);
    let end = tokio::time::timeout(Duration::from_secs(5), held.next())
        .await
        .expect("the tunnel ends with its capsule");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert_eq!(s.get(&format!("{base}/docs/a.txt")).await.0, 404);
    assert_eq!(s.by_port(&id, 8000, "/docs/a.txt").await.0, 404);
    s.shutdown().await;
}
