//! Host credentials over real HTTP against a control plane on a real
//! SQLite file: host tokens (JWTs) that expire, refresh tokens that are good
//! once, certificates that come anew with each refresh; and a real agent's
//! heartbeat loop renewing its credentials when its token expires.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::TcpListener;
use wrenn_agent::register::Ended;
use wrenn_cp::api::hosts::issue_registration;
use wrenn_cp::db::{now_ms, Team};
use wrenn_cp::model::Status;
use wrenn_cp::pki::agent_name;
use wrenn_cp::{ControlPlane, CpConfig};
use wrenn_http::tls::rustls::pki_types::pem::PemObject;
use wrenn_http::tls::rustls::pki_types::{CertificateDer, ServerName};
use wrenn_types::ids::{CapsuleId, HostId, TeamId};

mod common;

/// A control plane whose host tokens live `token_ttl` and whose used
/// refresh tokens are taken again for `grace`, served on a socket.
struct Served {
    plane: ControlPlane,
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn new(token_ttl: Duration, grace: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CpConfig::new(sqlite_url(&dir));
        config.host_token_ttl = token_ttl;
        config.host_refresh_grace = grace;
        Served::start(config, dir).await
    }

    async fn start(config: CpConfig, dir: tempfile::TempDir) -> Served {
        let plane = ControlPlane::start(config).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(wrenn_http::serve(
            listener,
            plane.router(),
            Default::default(),
            async {
                let _ = stop.await;
            },
        ));
        Served {
            plane,
            base,
            http: reqwest::Client::new(),
            _stop: stop_tx,
            _dir: dir,
        }
    }

    /// POST `body`, with `X-Host-Token` if given: (status, JSON body).
    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.header("x-host-token", t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Register a new host as an agent does: 201's body.
    async fn register(&self) -> Value {
        let (_, token) = issue_registration(&self.plane.cp).await.unwrap();
        let (status, body) = self
            .post("/v1/hosts/register", None, &registration(&token))
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    async fn heartbeat(&self, id: &str, token: Option<&str>) -> (u16, Value) {
        self.post(&format!("/v1/hosts/{id}/heartbeat"), token, &json!({}))
            .await
    }

    async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        self.post(
            "/v1/hosts/auth/refresh",
            None,
            &json!({ "refresh_token": refresh_token }),
        )
        .await
    }
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("cp.db").display())
}

fn registration(token: &str) -> Value {
    json!({
        "token": token, "address": "127.0.0.1:9", "arch": "x86_64",
        "cpu_cores": 2, "memory_mb": 1024, "disk_gb": 10,
    })
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn host_tokens_expire_and_refresh_tokens_are_good_once() {
    // (made first: tokens live 2 s from here)
    let other = Served::new(Duration::from_secs(60), Duration::ZERO).await;
    let cp = Served::new(Duration::from_secs(2), Duration::ZERO).await;
    let a = cp.register().await;
    let (id, token, refresh) = (s(&a["host"], "id"), s(&a, "token"), s(&a, "refresh_token"));
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    assert!(refresh.len() == 64 && refresh.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(cp.heartbeat(&id, Some(&token)).await.0, 204);

    let b = cp.register().await;
    let (b_id, b_token) = (s(&b["host"], "id"), s(&b, "token"));
    // another host's token: 403 (on `other`, whose tokens outlive any
    // stall of this machine)
    let (x, y) = (other.register().await, other.register().await);
    let (x_id, y_token) = (s(&x["host"], "id"), s(&y, "token"));
    assert_eq!(other.heartbeat(&x_id, Some(&y_token)).await.0, 403);

    // missing, foreign and tampered tokens: 401 with wrenn's error JSON
    let (status, body) = cp.heartbeat(&id, None).await;
    assert_eq!(
        (status, s(&body["error"], "code")),
        (401, "unauthorized".into())
    );
    assert_eq!(cp.heartbeat(&id, Some("not-a-jwt")).await.0, 401);
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(cp.heartbeat(&id, Some(&tampered)).await.0, 401);
    // a token signed with another database's key
    let foreign = other
        .plane
        .cp
        .host_tokens
        .sign(&id.parse().unwrap())
        .unwrap();
    assert_eq!(cp.heartbeat(&id, Some(&foreign)).await.0, 401);

    // the token expires; the refresh token buys a new pair and certificate
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = cp.heartbeat(&id, Some(&token)).await;
    assert_eq!(status, 401);
    assert_eq!(s(&body["error"], "message"), "the host token has expired");
    let (status, r) = cp.refresh(&refresh).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(s(&r["host"], "id"), id);
    assert_ne!(s(&r, "refresh_token"), refresh);
    assert_ne!(s(&r, "cert_pem"), s(&a, "cert_pem"), "a new certificate");
    assert_ne!(s(&r, "key_pem"), s(&a, "key_pem"), "with a new key");
    assert_eq!(s(&r, "ca_cert_pem"), s(&a, "ca_cert_pem"));
    assert_eq!(cp.heartbeat(&id, Some(&s(&r, "token"))).await.0, 204);
    let (status, body) = cp.refresh(&refresh).await;
    assert_eq!(
        (status, s(&body["error"], "code")),
        (401, "unauthorized".into()),
        "used up"
    );

    // bad refresh bodies
    assert_eq!(cp.refresh("short").await.0, 401);
    assert_eq!(cp.refresh(&"0".repeat(64)).await.0, 401);
    for bad in [json!({}), json!({"refresh_token": 7}), json!([])] {
        let (status, _) = cp.post("/v1/hosts/auth/refresh", None, &bad).await;
        assert_eq!(status, 400, "{bad}");
    }

    // a deleted host: its heartbeat is 404 "host not found" (the agent's
    // cue), even with an expired token (an agent back after a week); its
    // refresh token is dead
    let (status, b2) = cp.refresh(&s(&b, "refresh_token")).await;
    assert_eq!(status, 200);
    let b_host: HostId = b_id.parse().unwrap();
    cp.plane.cp.db.delete_host(&b_host).await.unwrap();
    for t in [s(&b2, "token"), b_token] {
        let (status, body) = cp.heartbeat(&b_id, Some(&t)).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(s(&body["error"], "message"), "host not found");
    }
    assert_eq!(cp.refresh(&s(&b2, "refresh_token")).await.0, 401);

    // a registration token is good once
    let (_, reg) = issue_registration(&cp.plane.cp).await.unwrap();
    assert_eq!(
        cp.post("/v1/hosts/register", None, &registration(&reg))
            .await
            .0,
        201
    );
    assert_eq!(
        cp.post("/v1/hosts/register", None, &registration(&reg))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn a_host_registered_before_expiring_tokens_refreshes_with_its_old_token() {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    use std::borrow::Cow;
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let (id, old_token) = (HostId::random(), "ab".repeat(32));
    // the schema as it was (migrations 1 to 5), and a host registered then
    {
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
            .await
            .unwrap();
        let sql = [
            include_str!("../migrations/0001_init.sql"),
            include_str!("../migrations/0002_e2b.sql"),
            include_str!("../migrations/0003_agent_token.sql"),
            include_str!("../migrations/0004_usage_daily.sql"),
            include_str!("../migrations/0005_ca.sql"),
        ];
        let then = Migrator {
            migrations: Cow::Owned(
                (1..)
                    .zip(sql)
                    .map(|(v, sql)| {
                        let name = Cow::Owned(format!("v{v}"));
                        Migration::new(v, name, MigrationType::Simple, Cow::Borrowed(sql), false)
                    })
                    .collect(),
            ),
            ..Migrator::DEFAULT
        };
        then.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO hosts (id, status, address, token_hash, created_at) \
             VALUES ($1, 'online', '127.0.0.1:9', $2, 0)",
        )
        .bind(id.as_str())
        .bind(wrenn_cp::auth::sha256_hex(&old_token))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    // a control plane of now migrates it; its agent, whose host.json has
    // no refresh token, is refused its old host token and sends it as the
    // refresh token, once
    let mut config = CpConfig::new(url);
    config.host_refresh_grace = Duration::ZERO;
    let cp = Served::start(config, dir).await;
    let data = tempfile::tempdir().unwrap();
    let old = json!({"id": id.as_str(), "token": old_token});
    std::fs::write(data.path().join("host.json"), old.to_string()).unwrap();
    let agent = Agent::start(&cp, None, data.path(), Duration::from_millis(100));
    let now = host_json_when(data.path(), "the agent renewed its credentials", |v| {
        v["refresh_token"].is_string()
    })
    .await;
    assert_eq!(s(&now, "id"), id.as_str());
    assert!(
        agent.slot.is_set(),
        "and serves the certificate that came with them"
    );
    heartbeats_go_on(&cp, &id, Duration::from_millis(400)).await;
    assert_eq!(agent.end().await, Ended::Stopped);
    // the old token is used up, as a refresh token and as a host token
    assert_eq!(cp.refresh(&old_token).await.0, 401);
    assert_eq!(cp.heartbeat(id.as_str(), Some(&old_token)).await.0, 401);
}

/// The certificate a TLS server with `acceptor` presents to the control
/// plane's client, which must accept it for host `id`.
async fn served_cert(
    acceptor: wrenn_http::tls::TlsAcceptor,
    cp: &wrenn_cp::Cp,
    id: &HostId,
) -> Vec<u8> {
    try_served_cert(acceptor, cp, id)
        .await
        .expect("the control plane refused it")
}

/// The certificate a TLS server with `acceptor` presents to the control
/// plane's client, or why the client refused it for host `id`.
async fn try_served_cert(
    acceptor: wrenn_http::tls::TlsAcceptor,
    cp: &wrenn_cp::Cp,
    id: &HostId,
) -> Result<Vec<u8>, String> {
    let (client, server) = tokio::io::duplex(64 << 10);
    let accepting = tokio::spawn(async move { acceptor.accept(server).await.map(|_| ()) });
    let connector = wrenn_http::tls::TlsConnector::from(cp.pki.client.clone());
    let name = ServerName::try_from(agent_name(id)).unwrap();
    let tls = connector
        .connect(name, client)
        .await
        .map_err(|e| e.to_string())?;
    accepting.await.unwrap().map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// A heartbeat from host `id` lands within `within` from now.
async fn heartbeats_go_on(cp: &Served, id: &HostId, within: Duration) {
    let since = wrenn_cp::db::now_ms();
    tokio::time::sleep(within).await;
    let host = cp.plane.cp.db.host(id).await.unwrap().unwrap();
    assert!(
        host.last_heartbeat.unwrap() >= since,
        "heartbeats go on after the renewal"
    );
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A real agent's registration and heartbeat loop against `cp`, beating
/// every `every`, keeping `host.json` in `data`, serving TLS from `slot`.
struct Agent {
    slot: wrenn_http::tls::TlsSlot,
    task: tokio::task::JoinHandle<Ended>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Agent {
    fn start(cp: &Served, registration: Option<String>, data: &Path, every: Duration) -> Agent {
        Agent::start_with(cp, registration, data, every, None)
    }

    /// One that reports the auto-pauses `paused` receives.
    fn start_with(
        cp: &Served,
        registration: Option<String>,
        data: &Path,
        every: Duration,
        paused: Option<tokio::sync::broadcast::Receiver<CapsuleId>>,
    ) -> Agent {
        let facts = wrenn_agent::register::host_facts(data, "127.0.0.1:9".parse().unwrap(), "");
        let slot = wrenn_http::tls::TlsSlot::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let membership = wrenn_agent::register::Membership {
            control_plane: cp.base.clone(),
            registration_token: registration,
            data_dir: data.to_owned(),
            facts,
            tls: slot.clone(),
            every,
            auto_pauses: paused,
        };
        let task = tokio::spawn(wrenn_agent::register::run(membership, async {
            let _ = stopped.await;
        }));
        Agent { slot, task, stop }
    }

    /// One given a new registration token.
    async fn register(cp: &Served, data: &Path, every: Duration) -> Agent {
        let (_, registration) = issue_registration(&cp.plane.cp).await.unwrap();
        Agent::start(cp, Some(registration), data, every)
    }

    /// Stop it; how its loop ended.
    async fn end(self) -> Ended {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// `host.json` in `data` once `ready` holds for it (within 10 s).
async fn host_json_when(data: &Path, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let wait = async {
        loop {
            let v = host_json(data);
            if ready(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: host.json is {}", host_json(data)))
}

fn host_json(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("host.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_used_refresh_token_is_taken_once_more_within_its_grace() {
    let cp = Served::new(Duration::from_secs(60), Duration::from_secs(60)).await;
    let a = cp.register().await;
    let r1 = s(&a, "refresh_token");
    // the answer to this refresh is "lost": the agent tries r1 again
    let (status, lost) = cp.refresh(&r1).await;
    assert_eq!(status, 200);
    let (status, got) = cp.refresh(&r1).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(cp.refresh(&r1).await.0, 401, "only once more");
    assert_eq!(
        cp.refresh(&s(&lost, "refresh_token")).await.0,
        401,
        "replaced"
    );
    let (status, next) = cp.refresh(&s(&got, "refresh_token")).await;
    assert_eq!(status, 200);
    let id = s(&a["host"], "id");
    assert_eq!(cp.heartbeat(&id, Some(&s(&next, "token"))).await.0, 204);
}

#[tokio::test]
async fn an_agent_renews_its_token_and_certificate_when_the_token_expires() {
    let cp = Served::new(Duration::from_secs(2), Duration::ZERO).await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::register(&cp, data.path(), Duration::from_millis(200)).await;
    let slot = agent.slot.clone();
    let first = host_json_when(data.path(), "the agent registered", |v| {
        v["refresh_token"].is_string() && slot.is_set()
    })
    .await;
    let id: HostId = s(&first, "id").parse().unwrap();
    let served = served_cert(slot.current().unwrap(), &cp.plane.cp, &id).await;
    assert_eq!(served, der(&s(&first["tls"], "cert_pem")));

    // past the token's life the agent refreshes: host.json and the served
    // certificate change, and the heartbeats go on with the new token
    let renewed = host_json_when(data.path(), "the agent renewed its credentials", |v| {
        v["refresh_token"].is_string() && v["refresh_token"] != first["refresh_token"]
    })
    .await;
    assert_ne!(renewed["token"], first["token"]);
    let new_cert = der(&s(&renewed["tls"], "cert_pem"));
    assert_ne!(new_cert, der(&s(&first["tls"], "cert_pem")));
    // (host.json is written just before the certificate is installed; the
    // one it replaces is refused from the refresh on)
    tokio::time::timeout(Duration::from_secs(5), async {
        while try_served_cert(slot.current().unwrap(), &cp.plane.cp, &id)
            .await
            .as_ref()
            != Ok(&new_cert)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent serves its new certificate");
    // the certificate it replaced is revoked
    let tls = &first["tls"];
    let replaced = wrenn_http::tls::Identity {
        cert_pem: s(tls, "cert_pem"),
        key_pem: s(tls, "key_pem"),
    };
    let replaced = wrenn_http::tls::server_config(&replaced, &s(tls, "ca_cert_pem")).unwrap();
    let refused = try_served_cert(replaced.into(), &cp.plane.cp, &id).await;
    let refused = refused.expect_err("the replaced certificate was taken");
    assert!(refused.contains("Revoked"), "{refused}");
    heartbeats_go_on(&cp, &id, Duration::from_millis(600)).await;
    // (the token in host.json now: it may have been renewed again since)
    let current = s(&host_json(data.path()), "token");
    assert_eq!(cp.heartbeat(id.as_str(), Some(&current)).await.0, 204);

    assert_eq!(agent.end().await, Ended::Stopped);
}

#[tokio::test]
async fn an_agent_hears_that_its_host_was_deleted() {
    let cp = Served::new(Duration::from_secs(60), Duration::ZERO).await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::register(&cp, data.path(), Duration::from_millis(100)).await;
    let registered =
        host_json_when(data.path(), "the agent registered", |v| v["id"].is_string()).await;
    let id: HostId = s(&registered, "id").parse().unwrap();
    // it keeps beating while the host exists
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!agent.task.is_finished());
    cp.plane.cp.db.delete_host(&id).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("the heartbeat loop ends")
        .unwrap();
    assert_eq!(ended, Ended::Deleted);
}

/// Between heartbeats (here a minute apart), a capsule the agent's reaper
/// pauses is reported at once: the control plane shows it `paused` with a
/// `capsule.pause` event (reason `ttl_expired`); a report about another
/// host's capsule, or one already paused, changes nothing.
#[tokio::test]
async fn an_agent_reports_an_auto_pause_at_once() {
    let cp = Served::new(Duration::from_secs(60), Duration::ZERO).await;
    let data = tempfile::tempdir().unwrap();
    let (reaper, paused) = tokio::sync::broadcast::channel(8);
    let (_, registration) = issue_registration(&cp.plane.cp).await.unwrap();
    let agent = Agent::start_with(
        &cp,
        Some(registration),
        data.path(),
        Duration::from_secs(60),
        Some(paused),
    );
    let registered = host_json_when(data.path(), "the agent registered", |v| {
        v["token"].is_string()
    })
    .await;
    let host: HostId = s(&registered, "id").parse().unwrap();
    let db = &cp.plane.cp.db;
    let team = Team {
        id: TeamId::random(),
        name: "t".into(),
        slug: "reaped".into(),
        is_admin: false,
        created_at: now_ms(),
    };
    db.insert_team(&team).await.unwrap();
    let other_host = HostId::random();
    let mine = common::capsule_row(&team.id, Some(&host), Status::Running, now_ms());
    let elsewhere = common::capsule_row(&team.id, Some(&other_host), Status::Running, now_ms());
    for c in [&mine, &elsewhere] {
        db.insert_capsule(c).await.unwrap();
    }
    let mut events = cp.plane.cp.events.subscribe();

    reaper.send(elsewhere.id.clone()).unwrap();
    reaper.send(mine.id.clone()).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.event == "capsule.pause" {
                return e;
            }
        }
    })
    .await
    .expect("no capsule.pause within 10 s of the report");
    assert_eq!(event.resource.id, mine.id.to_string());
    assert_eq!(
        event.metadata.get("reason").map(String::as_str),
        Some("ttl_expired")
    );
    let status = |id: CapsuleId| async move { db.capsule_any(&id).await.unwrap().unwrap().status };
    assert_eq!(status(mine.id.clone()).await, Status::Paused);
    assert_eq!(status(elsewhere.id.clone()).await, Status::Running);

    // the endpoint: another host's token is refused, a repeat is a no-op
    let report = |capsule: &CapsuleId, host: &HostId| {
        json!({"event": "sandbox.auto_paused", "sandbox_id": capsule.to_string(),
               "host_id": host.to_string(), "timestamp": "2026-01-01T00:00:00Z"})
    };
    let token = s(&host_json(data.path()), "token");
    let (code, _) = cp
        .post(
            "/v1/hosts/sandbox-events",
            Some(&token),
            &report(&elsewhere.id, &other_host),
        )
        .await;
    assert_eq!(code, 403);
    let (code, _) = cp
        .post("/v1/hosts/sandbox-events", None, &report(&mine.id, &host))
        .await;
    assert_eq!(code, 401);
    let (code, body) = cp
        .post(
            "/v1/hosts/sandbox-events",
            Some(&token),
            &report(&mine.id, &host),
        )
        .await;
    assert_eq!(code, 204, "{body}");
    let (code, _) = cp
        .post(
            "/v1/hosts/sandbox-events",
            Some(&token),
            &json!({"event": "sandbox.auto_paused"}),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(status(mine.id.clone()).await, Status::Paused);
    assert_eq!(status(elsewhere.id.clone()).await, Status::Running);

    assert_eq!(agent.end().await, Ended::Stopped);
}
