//! The control plane's router, served on a socket over a real SQLite
//! database, with stand-ins for what lies around it.
//!
//! - The proxy's two ways to an agent: requests for a capsule on the agent
//!   that runs in this process (`wrenn up`) go straight to that agent's
//!   proxy, with no HTTP hop, WebSocket upgrades included; every request
//!   for a capsule on another host crosses HTTP to the agent with its
//!   token. The
//!   agents are stand-ins: an in-process proxy that records what it is
//!   handed, and TCP listeners that record the request heads they receive.
//! - Mutual TLS: who may talk to whom, and revoked certificates refused.
//! - Usage: finished days come from the daily rollup, today from the ledger.

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wrenn_cp::api::hosts::{certify, issue_registration, refresh_host, register_host, Registered};
use wrenn_cp::auth::{create_key, KeyKind};
use wrenn_cp::db::{now_ms, CapsuleRow, Host, HostRegistration, Team};
use wrenn_cp::model::Status;
use wrenn_cp::pki::{agent_name, HostCert};
use wrenn_cp::{ControlPlane, Cp, CpConfig};
use wrenn_http::relay::{self, LocalProxy, PortTarget};
use wrenn_types::ids::{CapsuleId, HostId, TeamId};

/// The in-process agent's proxy: records (what it was handed, whether the
/// agent token came along) and answers with a Location inside the
/// capsule: with its path-form prefix from `serve`, without from
/// `serve_port`, as the agent's proxy does.
#[derive(Debug, Default)]
struct InProcess {
    seen: Mutex<Vec<(String, bool)>>,
}

impl LocalProxy for InProcess {
    fn serve(self: Arc<Self>, req: Request) -> wrenn_http::Answer {
        let uri = req.uri().to_string();
        let prefix = uri.split('/').take(4).collect::<Vec<_>>().join("/");
        self.answer(uri, &req, format!("{prefix}/next"))
    }

    fn tunnel(
        self: Arc<Self>,
        req: Request,
        stop: tokio_util::sync::CancellationToken,
    ) -> wrenn_http::Answer {
        // (what the agent's proxy answers a refused upgrade with; the
        // stop token is the control plane's route's, live while cached)
        let seen = format!("tunnel {} (stopped: {})", req.uri(), stop.is_cancelled());
        self.answer(seen, &req, "/ws-next".into())
    }

    fn serve_port(
        self: Arc<Self>,
        to: PortTarget<'_>,
        req: Request,
        _pair: Arc<wrenn_http::Pair>,
    ) -> wrenn_http::Answer {
        let seen = format!("port {} of {}: {}", to.port, to.capsule, to.path_and_query);
        if to.path_and_query == "/closed" {
            // what the agent's proxy says when nothing listens
            self.seen.lock().unwrap().push((seen, false));
            let refused = relay::refused(StatusCode::BAD_GATEWAY, "unreachable", "proxy error");
            return Box::pin(std::future::ready(refused));
        }
        self.answer(seen, &req, "/next".into())
    }
}

impl InProcess {
    fn answer(&self, seen: String, req: &Request, location: String) -> wrenn_http::Answer {
        let token = req.headers().contains_key("x-wrenn-agent-token");
        self.seen.lock().unwrap().push((seen, token));
        Box::pin(async move { ([("location", location)], "in-process").into_response() })
    }
}

/// What a stand-in agent saw of one connection: the ALPN protocol
/// negotiated and the request head.
#[derive(Debug)]
struct Seen {
    alpn: String,
    head: String,
    /// The client's certificate, DER.
    client: Vec<u8>,
}

/// A stand-in agent registered with `cp` (requiring `token`), serving the
/// certificate `cert_of` picks for it (`certify(cp, host)` for a real
/// agent). Its host token comes along.
async fn remote_agent(
    cp: &Cp,
    token: &str,
    cert_of: impl FnOnce(&Host) -> HostCert,
) -> (Registered, mpsc::UnboundedReceiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registered = host(cp, l.local_addr().unwrap(), token).await;
    let rx = stand_in(l, cert_of(&registered.host));
    (registered, rx)
}

/// Serve mutual TLS with `cert` on `l`: every HTTP/1.1 request head
/// received goes to the channel; each is answered 200 `remote`. HTTP/2
/// connections (the control plane's RPC) are closed unanswered.
fn stand_in(l: TcpListener, cert: HostCert) -> mpsc::UnboundedReceiver<Seen> {
    let tls = wrenn_http::tls::server_config(&cert.identity, &cert.ca_cert_pem).unwrap();
    let acceptor = wrenn_http::tls::TlsAcceptor::from(tls);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let alpn = s.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
                if alpn == b"h2" {
                    // (e.g. the reconciliation that the heartbeat of a
                    // host that moved starts)
                    return;
                }
                let client = s.get_ref().1.peer_certificates().unwrap_or_default();
                let client = client.first().map(|c| c.to_vec()).unwrap_or_default();
                let head = read_head(&mut s).await;
                if head.is_empty() {
                    return;
                }
                let _ = tx.send(Seen {
                    alpn: String::from_utf8_lossy(&alpn).into_owned(),
                    head,
                    client,
                });
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nremote",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    rx
}

async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One HTTP/1.1 request on a new connection; the whole answer as text.
async fn get(cp: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(cp).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(n, _)| *n == "host") {
        req.push_str("host: localhost\r\n");
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A host registered the way an agent registers, at `address`, requiring
/// `token`.
async fn host(cp: &Cp, address: std::net::SocketAddr, token: &str) -> Registered {
    let (_, registration) = issue_registration(cp).await.unwrap();
    let facts = HostRegistration {
        address: address.to_string(),
        arch: "x86_64".into(),
        cpu_cores: 2,
        memory_mb: 4096,
        disk_gb: 10,
        agent_token: token.into(),
    };
    register_host(cp, &registration, &facts).await.unwrap()
}

fn capsule(team: &TeamId, host: &HostId) -> CapsuleRow {
    let now = now_ms();
    CapsuleRow {
        started_at: Some(now),
        access_token: "envd-token".into(),
        ..common::capsule_row(team, Some(host), Status::Running, now)
    }
}

/// A control plane on a fresh SQLite file, one team and its key.
struct Plane {
    plane: ControlPlane,
    team: Team,
    key: String,
    _dir: tempfile::TempDir,
}

impl Plane {
    async fn new() -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("cp.db").display());
        let plane = ControlPlane::start(CpConfig::new(url)).await.unwrap();
        let team = Team {
            id: TeamId::random(),
            name: "t".into(),
            slug: "router".into(),
            is_admin: false,
            created_at: now_ms(),
        };
        plane.cp.db.insert_team(&team).await.unwrap();
        let (_, key) = create_key(&plane.cp.db, &team.id, "k", KeyKind::Wrenn)
            .await
            .unwrap();
        Plane {
            plane,
            team,
            key,
            _dir: dir,
        }
    }

    /// Serve the router (without the background tasks `serve` starts) until
    /// the sender is used or dropped.
    async fn serve(&self) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(wrenn_http::serve(
            listener,
            self.plane.router(),
            self.plane.server_config(),
            async {
                let _ = stop.await;
            },
        ));
        (addr, stop_tx)
    }
}

#[tokio::test]
async fn local_capsules_skip_the_http_hop_and_remote_ones_take_it() {
    let p = Plane::new().await;
    let (cp, team, key) = (p.plane.cp.clone(), &p.team, &p.key);
    let real = |h: &Host| certify(&cp, h).unwrap();
    let (local, mut local_heads) = remote_agent(&cp, "local-secret", real).await;
    let (remote, mut remote_heads) = remote_agent(&cp, "remote-secret", real).await;
    let (local_host, remote_host) = (local.host, remote.host);
    let in_process = Arc::new(InProcess::default());
    cp.local_agent
        .set((local_host.id.clone(), in_process.clone()))
        .unwrap();
    let here = capsule(&team.id, &local_host.id);
    let there = capsule(&team.id, &remote_host.id);
    for c in [&here, &there] {
        cp.db.insert_capsule(c).await.unwrap();
    }

    let (addr, _stop) = p.serve().await;

    // 1. The path form, local capsule: handed over in-process, the query
    //    kept, no agent token needed; Location keeps the path prefix.
    let id = here.id.as_str();
    let out = get(
        addr,
        &format!("/proxy/{id}/8080/a/b/?x=1"),
        &[("x-api-key", key)],
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("in-process"), "{out}");
    assert!(
        out.contains(&format!("location: /proxy/{id}/8080/next")),
        "{out}"
    );
    assert_eq!(
        in_process.seen.lock().unwrap().as_slice(),
        [(format!("/proxy/{id}/8080/a/b/?x=1"), false)]
    );

    // 2. The subdomain form, the route now cached: handed over by port
    //    without the router (the hot path), the query kept, Location
    //    without the prefix.
    let host_header = format!("8080-{id}.localhost");
    let out = get(addr, "/c?y=2", &[("host", &host_header)]).await;
    assert!(out.ends_with("in-process"), "{out}");
    assert!(out.contains("location: /next\r\n"), "{out}");
    assert_eq!(
        in_process.seen.lock().unwrap()[1],
        (format!("port 8080 of {id}: /c?y=2"), false)
    );
    //    With a key to check, or a made-up agent token, it takes the
    //    router's way: the same answer, and the token does not come along.
    for extra in [("x-api-key", key.as_str()), ("x-wrenn-agent-token", "mine")] {
        let out = get(addr, "/c", &[("host", &host_header), extra]).await;
        assert!(out.ends_with("in-process"), "{out}");
        assert!(out.contains("location: /next\r\n"), "{out}");
        assert_eq!(
            in_process.seen.lock().unwrap().last().unwrap(),
            &(format!("/proxy/{id}/8080/c"), false)
        );
    }
    assert_eq!(in_process.seen.lock().unwrap().len(), 4);

    //    envd's port: a refusal on the hot path is E2B's JSON 502, and the
    //    route is looked up again (through the router) before the hot path
    //    serves it again.
    let envd_host = format!("49983-{id}.localhost");
    let last = || in_process.seen.lock().unwrap().last().unwrap().0.clone();
    let out = get(addr, "/closed", &[("host", &envd_host)]).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(out.contains("port is not open"), "{out}");
    assert_eq!(last(), format!("port 49983 of {id}: /closed"));
    get(addr, "/after", &[("host", &envd_host)]).await;
    assert_eq!(last(), format!("/proxy/{id}/49983/after"));
    get(addr, "/again", &[("host", &envd_host)]).await;
    assert_eq!(last(), format!("port 49983 of {id}: /again"));
    assert_eq!(in_process.seen.lock().unwrap().len(), 7);

    // 3. An upgrade for the local capsule is handed over in-process too
    //    (the agent owns tunnels), in the path form, without the agent
    //    token, with the route's live stop token; nothing crosses HTTP.
    let out = get(
        addr,
        "/ws",
        &[
            ("host", &host_header),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("in-process"), "{out}");
    assert!(out.contains("location: /ws-next\r\n"), "{out}");
    assert_eq!(
        in_process.seen.lock().unwrap().last().unwrap(),
        &(
            format!("tunnel /proxy/{id}/8080/ws (stopped: false)"),
            false
        )
    );
    assert_eq!(in_process.seen.lock().unwrap().len(), 8);

    // 4. A capsule on another host: over HTTP with that host's token, and
    //    the caller's key removed.
    let other = there.id.as_str();
    let out = get(
        addr,
        &format!("/proxy/{other}/3000/r?q"),
        &[("x-api-key", key)],
    )
    .await;
    assert!(out.ends_with("remote"), "{out}");
    let seen = remote_heads.recv().await.unwrap();
    let head = seen.head;
    assert!(
        head.starts_with(&format!("GET /proxy/{other}/3000/r?q HTTP/1.1")),
        "{head}"
    );
    assert_eq!(seen.alpn, "wrenn-bulk", "user traffic rides the bulk class");
    assert!(
        head.contains("x-wrenn-agent-token: remote-secret"),
        "{head}"
    );
    assert!(!head.to_ascii_lowercase().contains("x-api-key"), "{head}");
    //    An upgrade for it crosses HTTP too (a tunnel connection of its
    //    own, in the bulk class), with that host's token.
    let out = get(
        addr,
        &format!("/proxy/{other}/3000/ws"),
        &[
            ("x-api-key", key),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    )
    .await;
    assert!(out.ends_with("remote"), "{out}");
    let seen = remote_heads.recv().await.unwrap();
    let head = seen.head;
    assert!(
        head.starts_with(&format!("GET /proxy/{other}/3000/ws HTTP/1.1")),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert!(
        head.contains("x-wrenn-agent-token: remote-secret"),
        "{head}"
    );
    assert_eq!(seen.alpn, "wrenn-bulk", "a tunnel is bulk traffic");
    assert_eq!(in_process.seen.lock().unwrap().len(), 8);
    assert!(
        local_heads.try_recv().is_err(),
        "nothing reached the local agent over HTTP"
    );

    // 5. envd's port on another host: the RPC class's HTTP/1.1 pool.
    let out = get(
        addr,
        &format!("/proxy/{other}/49983/health"),
        &[("x-api-key", key)],
    )
    .await;
    assert!(out.ends_with("remote"), "{out}");
    let seen = remote_heads.recv().await.unwrap();
    assert!(seen
        .head
        .starts_with(&format!("GET /proxy/{other}/49983/health")));
    assert_eq!(seen.alpn, "http/1.1");
}

/// A TLS client towards `addr`, known as `name`, trusting `ca_pem`,
/// presenting `me` if any.
async fn tls_client(
    addr: std::net::SocketAddr,
    name: &str,
    ca_pem: &str,
    me: Option<&wrenn_http::tls::Identity>,
) -> std::io::Result<wrenn_http::Conn> {
    use wrenn_http::tls::rustls;
    use wrenn_http::tls::rustls::pki_types::pem::PemObject;
    let tcp = TcpStream::connect(addr).await?;
    let config = match me {
        Some(me) => {
            let agents = wrenn_http::tls::AgentVerifier::new(ca_pem).unwrap();
            let me = wrenn_http::tls::ClientCert::new(me).unwrap();
            wrenn_http::tls::client_config(&agents, &me).unwrap()
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
            )
        }
    };
    let tls = wrenn_http::tls::TlsConnector::from(config);
    wrenn_http::Conn::tls(tcp, &tls, name).await
}

/// A request on `conn`; the answer, or what went wrong.
async fn ask(mut conn: wrenn_http::Conn) -> Result<String, String> {
    conn.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match conn.read_to_end(&mut out).await {
        Ok(_) if !out.is_empty() => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Mutual TLS: the control plane talks only to an agent whose certificate
/// comes from its authority and names that very host (not another host's,
/// even on the same address); an agent answers only the control plane's
/// certificate (not a client without one, nor another agent's).
#[tokio::test]
async fn agents_and_the_control_plane_prove_who_they_are() {
    let p = Plane::new().await;
    let other = Plane::new().await;
    let cp = p.plane.cp.clone();
    let team = &p.team;
    let real = |h: &Host| certify(&cp, h).unwrap();
    let (good, mut good_heads) = remote_agent(&cp, "t", real).await;
    let good = good.host;
    // another control plane's certificate for this host
    let (forged, mut forged_heads) =
        remote_agent(&cp, "t", |h| certify(&other.plane.cp, h).unwrap()).await;
    // this control plane's certificate, but for `good`, on the same IP
    let (twin, mut twin_heads) = remote_agent(&cp, "t", |_| certify(&cp, &good).unwrap()).await;
    let (addr, _stop) = p.serve().await;
    let cases = [
        (&good, &mut good_heads, true),
        (&forged.host, &mut forged_heads, false),
        (&twin.host, &mut twin_heads, false),
    ];
    for (h, heads, answered) in cases {
        let c = capsule(&team.id, &h.id);
        cp.db.insert_capsule(&c).await.unwrap();
        let out = get(
            addr,
            &format!("/proxy/{}/80/", c.id),
            &[("x-api-key", &p.key)],
        )
        .await;
        assert_eq!(out.ends_with("remote"), answered, "{out}");
        if !answered {
            assert!(out.starts_with("HTTP/1.1 502"), "{out}");
            assert!(
                heads.try_recv().is_err(),
                "nothing was sent to the impostor"
            );
        }
    }
    let served = good_heads.recv().await.unwrap();
    assert!(served.head.starts_with("GET /proxy/"), "{served:?}");

    // the agent's side (its certificate checked as the control plane does)
    let agent_addr: std::net::SocketAddr = good.address.parse().unwrap();
    let name = agent_name(&good.id);
    let ca = cp.pki.ca_cert_pem().to_owned();
    let us = tls_client(agent_addr, &name, &ca, Some(&cp.pki.client_identity())).await;
    assert!(ask(us.unwrap()).await.unwrap().ends_with("remote"));
    assert!(good_heads.recv().await.is_some());
    let anonymous = tls_client(agent_addr, &name, &ca, None).await;
    let refused = match anonymous {
        Ok(conn) => ask(conn).await,
        Err(e) => Err(e.to_string()),
    };
    assert!(
        refused.is_err(),
        "a client without a certificate: {refused:?}"
    );
    // a host's certificate is for serving only
    let peer = certify(&cp, &good).unwrap();
    let as_client = tls_client(agent_addr, &name, &ca, Some(&peer.identity)).await;
    let refused = match as_client {
        Ok(conn) => ask(conn).await,
        Err(e) => Err(e.to_string()),
    };
    assert!(refused.is_err(), "another agent's certificate: {refused:?}");
    assert!(good_heads.try_recv().is_err(), "neither got a request in");
}

/// One JSON POST on a new connection; the whole answer as text.
async fn post(
    cp: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    send(cp, "POST", path, headers, body).await
}

/// One request with a JSON body on a new connection; the whole answer as
/// text.
async fn send(
    cp: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let mut s = TcpStream::connect(cp).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Host `id`'s agent comes back serving `cert` on another address, and
/// says so in a heartbeat (with host token `token`) to the control plane
/// at `cp`: that address, and what the new stand-in receives.
async fn moves(
    cp: std::net::SocketAddr,
    id: &HostId,
    token: &str,
    cert: HostCert,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let heads = stand_in(l, cert);
    let beat = serde_json::json!({ "address": at.to_string() }).to_string();
    let path = format!("/v1/hosts/{id}/heartbeat");
    let out = post(cp, &path, &[("x-host-token", token)], &beat).await;
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    (at, heads)
}

/// The certificate names the host, not its address: an agent that comes
/// back on another IP (its heartbeat says where) is reached there with
/// the certificate it has.
#[tokio::test]
async fn a_host_that_moves_keeps_its_certificate() {
    let p = Plane::new().await;
    let cp = p.plane.cp.clone();
    let cert = std::cell::RefCell::new(None);
    let (reg, mut first) = remote_agent(&cp, "t", |h| {
        let c = certify(&cp, h).unwrap();
        *cert.borrow_mut() = Some(c.clone());
        c
    })
    .await;
    let c = capsule(&p.team.id, &reg.host.id);
    cp.db.insert_capsule(&c).await.unwrap();
    let (addr, _stop) = p.serve().await;
    let path = format!("/proxy/{}/80/", c.id);
    let out = get(addr, &path, &[("x-api-key", &p.key)]).await;
    assert!(out.ends_with("remote"), "{out}");
    assert!(first.recv().await.is_some());

    let moved = cert.into_inner().unwrap();
    let (_, mut second) = moves(addr, &reg.host.id, &reg.token, moved).await;
    // (the cached route still names the old address until it is refreshed)
    cp.proxy_routes.evict(&c.id);
    let out = get(addr, &path, &[("x-api-key", &p.key)]).await;
    assert!(out.ends_with("remote"), "{out}");
    assert!(
        second.recv().await.is_some(),
        "the request went to the new address"
    );
    assert!(first.try_recv().is_err());
}

#[tokio::test]
async fn usage_reads_rolled_up_days_and_counts_today_live() {
    let p = Plane::new().await;
    let db = &p.plane.cp.db;
    let (day, hour) = (86_400_000, 3_600_000);
    let now = now_ms();
    let midnight = now - now % day;
    let spare = CapsuleId::random();
    let run = |vcpus, from: i64, to: i64| wrenn_cp::db::Run {
        vcpus,
        memory_mb: 1000,
        started_at: from,
        ended_at: Some(to),
    };
    // two hours three days ago, one hour yesterday
    for r in [
        run(1, midnight - 3 * day, midnight - 3 * day + 2 * hour),
        run(2, midnight - day + hour, midnight - day + 2 * hour),
    ] {
        db.insert_run(&spare, &p.team.id, &r).await.unwrap();
    }
    wrenn_cp::api::stats::roll_up(&p.plane.cp).await.unwrap();
    // after the rollup: yesterday is final, today is live
    let late = run(4, midnight - day, midnight - day + hour);
    db.insert_run(&spare, &p.team.id, &late).await.unwrap();
    // a minute today (less in the day's first minute)
    let today = run(1, midnight, (midnight + 60_000).min(now));
    db.insert_run(&spare, &p.team.id, &today).await.unwrap();
    let today_minutes = ((today.ended_at.unwrap() - midnight) as f64 / 60.0).round() / 1000.0;

    let (addr, _stop) = p.serve().await;
    let out = get(addr, "/v1/capsules/usage", &[("x-api-key", &p.key)]).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body: serde_json::Value =
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 30, "{body}");
    let cpu: Vec<f64> = points
        .iter()
        .map(|p| p["cpu_minutes"].as_f64().unwrap())
        .collect();
    let ram = points[29]["ram_mb_minutes"].as_f64().unwrap();
    // [.., 3 days ago, 2 days ago, yesterday, today]
    assert_eq!(cpu[26..], [120.0, 0.0, 120.0, today_minutes], "{body}");
    assert!((ram - 1000.0 * today_minutes).abs() < 1.0, "{body}");
    assert!(cpu[..26].iter().all(|c| *c == 0.0), "{body}");
}

/// A create naming a template `wrenn up` is still building is told to wait
/// (503 `host_unavailable`), not that it does not exist; once the build is
/// over (or failed) it is the plain 404.
#[tokio::test]
async fn a_template_being_built_is_503_not_404() {
    let p = Plane::new().await;
    let (addr, _stop) = p.serve().await;
    let key = [("x-api-key", p.key.as_str())];
    let create = || {
        post(
            addr,
            "/v1/capsules",
            &key,
            r#"{"template": "code-runner-beta"}"#,
        )
    };
    p.plane.cp.set_building("code-runner-beta", true);
    let out = create().await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.contains(r#""code":"host_unavailable""#) && out.contains("still being built"),
        "{out}"
    );
    p.plane.cp.set_building("code-runner-beta", false);
    let out = create().await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains(r#""code":"not_found""#), "{out}");
}

/// Control planes on one database share the authority the first one made:
/// an agent's certificate is good for all of them.
#[tokio::test]
async fn control_planes_on_one_database_share_the_authority() {
    let p = Plane::new().await;
    let url = format!("sqlite:{}", p._dir.path().join("cp.db").display());
    let second = ControlPlane::start(CpConfig::new(url)).await.unwrap();
    let first = &p.plane.cp.pki;
    assert_eq!(first.ca_cert_pem(), second.cp.pki.ca_cert_pem());
    assert_ne!(
        first.client_identity().cert_pem,
        second.cp.pki.client_identity().cert_pem,
        "each has its own client certificate"
    );
    // the second one's client certificate is one a host of the first trusts
    let (good, mut heads) =
        remote_agent(&p.plane.cp, "t", |h| certify(&p.plane.cp, h).unwrap()).await;
    let addr: std::net::SocketAddr = good.host.address.parse().unwrap();
    let name = agent_name(&good.host.id);
    let seconds = second.cp.pki.client_identity();
    let conn = tls_client(addr, &name, first.ca_cert_pem(), Some(&seconds));
    assert!(ask(conn.await.unwrap()).await.unwrap().ends_with("remote"));
    assert!(heads.recv().await.is_some());
}

/// A request to the agent at `addr` (known as `name`) over the TLS the
/// control plane `cp` dials agents with; the answer, or what went wrong.
async fn dial_as(cp: &Cp, addr: std::net::SocketAddr, name: &str) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = wrenn_http::tls::TlsConnector::from(cp.pki.client.clone());
    let conn = wrenn_http::Conn::tls(tcp, &tls, name)
        .await
        .map_err(|e| e.to_string())?;
    ask(conn).await
}

/// The control plane refused the agent's certificate as revoked.
fn assert_revoked(dialed: Result<String, String>) {
    let refused = dialed.expect_err("the agent was answered");
    assert!(refused.contains("Revoked"), "{refused}");
}

/// A host's certificate is revoked when the next one is issued (a
/// refresh) and when the host is deleted: the control plane that did it
/// refuses it from the next handshake, the others on the database once
/// they reload the list (every reconcile interval).
#[tokio::test]
async fn replaced_and_deleted_hosts_certificates_are_revoked() {
    let p = Plane::new().await;
    let cp = p.plane.cp.clone();
    let url = format!("sqlite:{}", p._dir.path().join("cp.db").display());
    let second = ControlPlane::start(CpConfig::new(url)).await.unwrap();
    let admin = Team {
        id: TeamId::random(),
        name: "admin".into(),
        slug: "admin".into(),
        is_admin: true,
        created_at: now_ms(),
    };
    cp.db.insert_team(&admin).await.unwrap();
    let (_, admin_key) = create_key(&cp.db, &admin.id, "k", KeyKind::Wrenn)
        .await
        .unwrap();

    // the agent serves what its registration brought
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg = host(&cp, l.local_addr().unwrap(), "t").await;
    let mut first = stand_in(l, reg.cert.clone());
    let first_addr: std::net::SocketAddr = reg.host.address.parse().unwrap();
    let name = agent_name(&reg.host.id);
    let c = capsule(&p.team.id, &reg.host.id);
    cp.db.insert_capsule(&c).await.unwrap();
    let (addr, _stop) = p.serve().await;
    let path = format!("/proxy/{}/80/", c.id);
    let out = get(addr, &path, &[("x-api-key", &p.key)]).await;
    assert!(out.ends_with("remote"), "{out}");
    assert!(first.recv().await.is_some());
    let by_second = dial_as(&second.cp, first_addr, &name).await;
    assert!(by_second.unwrap().ends_with("remote"));
    assert!(first.recv().await.is_some());

    // a refresh brings a new certificate: the old one, still served here,
    // is refused
    let refreshed = refresh_host(&cp, &reg.refresh_token).await.unwrap();
    assert_ne!(refreshed.cert.serial, reg.cert.serial);
    let out = get(addr, &path, &[("x-api-key", &p.key)]).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let by_first = dial_as(&cp, first_addr, &name).await;
    assert_revoked(by_first);
    second.cp.reload_revocations().await.unwrap();
    let by_second = dial_as(&second.cp, first_addr, &name).await;
    assert_revoked(by_second);
    assert!(
        first.try_recv().is_err(),
        "nothing reached the old certificate"
    );

    // the new one is taken (the agent is back, on another address)
    let (renewed_addr, mut renewed) =
        moves(addr, &reg.host.id, &refreshed.token, refreshed.cert.clone()).await;
    cp.proxy_routes.evict(&c.id);
    let out = get(addr, &path, &[("x-api-key", &p.key)]).await;
    assert!(out.ends_with("remote"), "{out}");
    assert!(renewed.recv().await.is_some());
    let by_second = dial_as(&second.cp, renewed_addr, &name).await;
    assert!(by_second.unwrap().ends_with("remote"));
    assert!(renewed.recv().await.is_some());

    // deleting the host revokes it as well
    let path = format!("/v1/hosts/{}?force=true", reg.host.id);
    let out = send(addr, "DELETE", &path, &[("x-api-key", &admin_key)], "").await;
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    let by_first = dial_as(&cp, renewed_addr, &name).await;
    assert_revoked(by_first);
    second.cp.reload_revocations().await.unwrap();
    let by_second = dial_as(&second.cp, renewed_addr, &name).await;
    assert_revoked(by_second);
    assert!(renewed.try_recv().is_err());
}

/// The control plane renews its client certificate while it runs: agents
/// are shown the new one from the next connection on. Each is good for
/// `CLIENT_VALIDITY_DAYS` (checked as an agent checks it).
#[tokio::test]
async fn the_control_plane_renews_its_client_certificate() {
    use wrenn_http::tls::rustls;
    use wrenn_http::tls::rustls::pki_types::pem::PemObject;
    use wrenn_http::tls::rustls::pki_types::{CertificateDer, UnixTime};
    let p = Plane::new().await;
    let cp = p.plane.cp.clone();
    let (agent, mut heads) = remote_agent(&cp, "t", |h| certify(&cp, h).unwrap()).await;
    let addr: std::net::SocketAddr = agent.host.address.parse().unwrap();
    let name = agent_name(&agent.host.id);
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();

    let first = cp.pki.client_identity();
    assert!(dial_as(&cp, addr, &name).await.unwrap().ends_with("remote"));
    assert_eq!(
        heads.recv().await.unwrap().client,
        der(&first.cert_pem).to_vec()
    );
    cp.pki.renew_client().unwrap();
    let second = cp.pki.client_identity();
    assert_ne!(second.cert_pem, first.cert_pem);
    assert!(dial_as(&cp, addr, &name).await.unwrap().ends_with("remote"));
    assert_eq!(
        heads.recv().await.unwrap().client,
        der(&second.cert_pem).to_vec()
    );

    // how long it is good for, to the agent's client verifier
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(cp.pki.ca_cert_pem())).unwrap();
    let agents_check = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let day = 24 * 3600;
    let at = |days: i64| {
        let secs = now_ms() / 1000 + days * day;
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs as u64))
    };
    let days = wrenn_cp::pki::CLIENT_VALIDITY_DAYS;
    let cert = der(&second.cert_pem);
    assert!(agents_check.verify_client_cert(&cert, &[], at(0)).is_ok());
    assert!(agents_check
        .verify_client_cert(&cert, &[], at(days - 1))
        .is_ok());
    let expired = agents_check.verify_client_cert(&cert, &[], at(days + 1));
    assert!(
        matches!(
            expired,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            ))
        ),
        "{expired:?}"
    );
}
