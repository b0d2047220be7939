//! Wiring: [`ControlPlane::start`] opens the database and connects to the
//! registered hosts; `serve` starts the reconciler and runs the router on a
//! listener with the timeouts every hop uses (read-header
//! 10 s, idle 620 s). Every background task is on `Cp::tasks` and ends on
//! `Cp::stop`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CpConfig;
use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use crate::events::Broker;
use crate::hosts::Hosts;
use crate::proxy::Routes;

/// The control plane's shared state.
#[derive(Debug)]
pub struct Cp {
    pub config: CpConfig,
    pub db: Db,
    pub hosts: Hosts,
    pub events: Broker,
    /// The certificate authority agents and the control plane trust.
    pub pki: crate::pki::Pki,
    /// Taken while the revocation list is read and installed.
    revocations: tokio::sync::Mutex<()>,
    /// Signs and checks the tokens agents call the control plane with.
    pub host_tokens: crate::host_tokens::HostTokens,
    /// The proxy transport (HTTP/1.1 only), separate from every RPC pool.
    /// Over TLS it offers [`wrenn_http::tls::ALPN_BULK`], so an agent serves
    /// it as bulk.
    pub proxy: wrenn_http::ProxyClient,
    /// TLS for WebSocket tunnels to agents (bulk, as `proxy`).
    pub tunnel_tls: Arc<wrenn_http::tls::rustls::ClientConfig>,
    /// The same transport for requests to envd's port (E2B's process and
    /// PTY RPC): its own pool, so its connections are never ones an
    /// agent has classed as bulk.
    pub envd_proxy: wrenn_http::ProxyClient,
    pub proxy_routes: Routes,
    /// The agent running in this process (`wrenn up`) and its port proxy,
    /// which proxied requests to its capsules reach without an HTTP hop.
    pub local_agent: OnceLock<(
        wrenn_types::ids::HostId,
        Arc<dyn wrenn_http::relay::LocalProxy>,
    )>,
    /// This process's half of [`Cp::placing`].
    placing_here: tokio::sync::Mutex<()>,
    /// Capsules whose create is in flight in this process (the reconciler
    /// leaves them alone; after a restart, none are).
    pub creating: Mutex<std::collections::HashSet<wrenn_types::ids::CapsuleId>>,
    pub e2b: crate::e2b::E2bState,
    /// Where `serve` listens (E2B's sandbox domain defaults to its port).
    pub listen_addr: OnceLock<std::net::SocketAddr>,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
    ready: AtomicBool,
    progress: Mutex<Value>,
    /// Templates being built (`wrenn up`'s built-ins): a create naming one
    /// is told to wait, not that it does not exist.
    building: Mutex<std::collections::BTreeSet<String>>,
    /// The recipe builds running in this process, by template name, each
    /// with its build capsule's ID: a second build of a name is refused at
    /// once, and the reconciler destroys every build capsule not here (its
    /// build was cut off by a restart).
    pub builds: Mutex<std::collections::HashMap<String, wrenn_types::ids::CapsuleId>>,
    /// Who this control plane is, across its restarts (`wrenn up`: its
    /// own host's ID; else one per process): see [`Cp::identity`].
    pub identity: OnceLock<String>,
    /// Host-side names of the team snapshots being taken (not recorded
    /// yet: the reconciler leaves their layers alone).
    pub snapshotting: crate::locks::Claims<String>,
    /// Taken by each lifecycle operation on a capsule ([`crate::locks`]).
    pub lifecycle: crate::locks::CapsuleLocks,
    /// Taken by snapshots and template deletes, by team and name.
    pub template_names: crate::locks::Locks<(wrenn_types::ids::TeamId, String)>,
    /// Taken while a host-side template is copied to a host
    /// ([`crate::copies`]), by its name and that host.
    pub copying: crate::locks::Locks<(String, wrenn_types::ids::HostId)>,
    /// When a copy of a host-side template to a host last failed, by
    /// name and host ([`crate::copies::avoided`]).
    pub copy_failures:
        Mutex<std::collections::HashMap<(String, wrenn_types::ids::HostId), std::time::Instant>>,
    /// Copies of templates of every host under way in the background, by
    /// name and host ([`crate::copies::prewarm`]).
    pub prewarming: crate::locks::Claims<(String, wrenn_types::ids::HostId)>,
    /// The layers of the stacks being copied to hosts, by name and host,
    /// each with how many copies hold it: not collected meanwhile, though
    /// nothing stands on them there yet ([`crate::copies::being_copied`]).
    pub in_copy: Mutex<std::collections::HashMap<(String, wrenn_types::ids::HostId), usize>>,
    me: Weak<Cp>,
}

/// [`Cp::placing`]'s guard. (Fields drop in order: the database's lock
/// goes first, then this process's.)
#[derive(Debug)]
pub struct Placing<'a> {
    _shared: crate::db::PlacingLock,
    _here: tokio::sync::MutexGuard<'a, ()>,
}

impl Cp {
    /// The control plane, owned (for work spawned to outlive a request).
    pub fn arc(&self) -> Arc<Cp> {
        self.me
            .upgrade()
            .expect("the control plane outlives its requests")
    }

    /// Who this control plane is: what marks the build capsules it runs
    /// (control planes sharing a database leave each other's alone). Set
    /// once by `wrenn up`, before any build; a random name otherwise.
    pub fn identity(&self) -> &str {
        self.identity
            .get_or_init(|| format!("cp-{}", crate::auth::random_hex(8)))
    }

    /// Placement's lock, held while a create picks a host and records its
    /// capsule (or moves it to another) and while a resume checks its
    /// host's room and resumes it: two of them cannot both take a host's
    /// last room. This process's lock first (waiters hold no database
    /// connection), then the database's, for control planes sharing it
    /// ([`crate::db::Db::placing`]).
    pub async fn placing(&self) -> ApiResult<Placing<'_>> {
        let here = self.placing_here.lock().await;
        let shared = self.db.placing().await?;
        Ok(Placing {
            _shared: shared,
            _here: here,
        })
    }

    /// Run `work` to its end on [`Cp::tasks`] even if the caller is
    /// dropped, and hand the caller its result if it is still there. For
    /// the lifecycle operations: a handler future is dropped when its
    /// client hangs up, and the code after each await (recording the
    /// outcome) would never run, leaving a capsule `starting` or
    /// `stopping` for good.
    pub async fn to_completion<T, E, F>(&self, work: impl FnOnce(Arc<Cp>) -> F) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: From<ApiError> + Send + 'static,
    {
        match self.tasks.spawn(work(self.arc())).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(ApiError::internal().into()),
        }
    }

    /// `/health` answers 200 once this is set (`wrenn up`: the default
    /// template is usable); until then 503 with [`Cp::set_progress`].
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_progress(&self, v: Value) {
        *self.progress.lock().unwrap() = v;
    }

    /// Template `name` is being built (`true`) or no longer (built, or its
    /// build failed).
    pub fn set_building(&self, name: &str, building: bool) {
        let mut set = self.building.lock().unwrap();
        if building {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Whether template `name` is being built.
    pub fn is_building(&self, name: &str) -> bool {
        self.building.lock().unwrap().contains(name)
    }

    /// Check agents against the certificates the database says are revoked,
    /// from the next handshake on (after this control plane revoked one, and
    /// every reconcile interval for those other control planes revoked).
    pub async fn reload_revocations(&self) -> Result<(), crate::pki::PkiError> {
        // (one at a time: a list read before another's change committed
        // must not be installed after the list read since)
        let _turn = self.revocations.lock().await;
        let revoked = self.db.revoked_certs(crate::db::now_ms()).await?;
        self.pki.revoke(&revoked)
    }
}

#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub cp: Arc<Cp>,
}

impl ControlPlane {
    pub async fn start(config: CpConfig) -> Result<ControlPlane, crate::pki::PkiError> {
        use wrenn_http::tls::{with_alpn, ALPN_BULK, ALPN_HTTP1};
        let db = Db::open(&config.database_url).await?;
        let pki = crate::pki::Pki::load(&db).await?;
        let host_tokens = crate::host_tokens::HostTokens::load(
            &db,
            config.host_token_ttl,
            config.host_refresh_ttl,
        )
        .await?;
        let bulk = with_alpn(&pki.client, ALPN_BULK);
        let hosts = Hosts::new(pki.client.clone());
        let agents = |config| {
            Some(wrenn_http::tls::AgentTls {
                config,
                names: hosts.names().clone(),
            })
        };
        let proxy = wrenn_http::proxy_client(agents(bulk.clone()));
        let envd_proxy = wrenn_http::proxy_client(agents(with_alpn(&pki.client, ALPN_HTTP1)));
        let cp = Arc::new_cyclic(|me| Cp {
            config,
            db,
            hosts,
            events: Broker::default(),
            proxy,
            tunnel_tls: bulk,
            envd_proxy,
            pki,
            revocations: Default::default(),
            host_tokens,
            proxy_routes: Routes::default(),
            local_agent: OnceLock::new(),
            placing_here: tokio::sync::Mutex::new(()),
            creating: Mutex::new(Default::default()),
            e2b: Default::default(),
            listen_addr: OnceLock::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            ready: AtomicBool::new(true),
            progress: Mutex::new(json!({})),
            building: Mutex::new(Default::default()),
            builds: Mutex::new(Default::default()),
            snapshotting: Default::default(),
            identity: OnceLock::new(),
            lifecycle: Default::default(),
            template_names: Default::default(),
            copying: Default::default(),
            copy_failures: Default::default(),
            prewarming: Default::default(),
            in_copy: Default::default(),
            me: me.clone(),
        });
        cp.hosts.load(&cp.db).await?;
        Ok(ControlPlane { cp })
    }

    pub fn router(&self) -> Router {
        let api = crate::api::routes();
        Router::new()
            .merge(api.clone())
            .merge(crate::e2b::routes())
            .nest("/api", api)
            .route("/health", get(health))
            .route("/api/health", get(health))
            .route("/openapi.yaml", get(openapi))
            .route("/docs", get(docs))
            .route("/proxy/{*rest}", any(crate::proxy::path))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                self.cp.clone(),
                crate::proxy::subdomain,
            ))
            .with_state(self.cp.clone())
    }

    /// How the API's listener serves: proxied user traffic on the bulk
    /// runtime, the subdomain proxy's hot path in front of the router.
    pub fn server_config(&self) -> wrenn_http::ServerConfig {
        wrenn_http::ServerConfig {
            bulk: Some(wrenn_http::BulkClass::new(crate::proxy::is_bulk)),
            front: Some(Arc::new(crate::proxy::FastLane(self.cp.clone()))),
            ..Default::default()
        }
    }

    /// Serve on `listener` until `shutdown`, then stop background work.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        // The reconciler starts with serving: by then `wrenn up` has told
        // the database where its agent listens now.
        self.cp.tasks.spawn(crate::reconcile::run(self.cp.clone()));
        self.cp
            .tasks
            .spawn(crate::reconcile::monitor(self.cp.clone()));
        self.cp
            .tasks
            .spawn(crate::e2b::deadline::run(self.cp.clone()));
        self.cp
            .tasks
            .spawn(crate::api::stats::run_rollups(self.cp.clone()));
        self.cp
            .tasks
            .spawn(crate::pki::renew_client_cert(self.cp.clone()));
        if let Ok(a) = listener.local_addr() {
            let _ = self.cp.listen_addr.set(a);
        }
        let r = wrenn_http::serve(listener, self.router(), self.server_config(), shutdown).await;
        self.shutdown().await;
        r
    }

    pub async fn shutdown(&self) {
        self.cp.stop.cancel();
        self.cp.tasks.close();
        self.cp.tasks.wait().await;
        self.cp.db.close().await;
    }
}

async fn health(State(cp): State<Arc<Cp>>) -> Response {
    let version = env!("CARGO_PKG_VERSION");
    if cp.ready.load(Ordering::SeqCst) {
        (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({"status": "ok", "version": version})),
        )
            .into_response()
    } else {
        let progress = cp.progress.lock().unwrap().clone();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({"status": "starting", "version": version, "progress": progress})),
        )
            .into_response()
    }
}

async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    if crate::e2b::is_e2b_path(uri.path()) {
        return crate::e2b::method_not_allowed();
    }
    crate::error::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "method not allowed on this route",
    )
    .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if crate::e2b::is_e2b_path(uri.path()) {
        return crate::e2b::not_found(uri.path());
    }
    crate::error::ApiError::not_found("no such route").into_response()
}

const OPENAPI: &str = include_str!("../openapi.yaml");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
