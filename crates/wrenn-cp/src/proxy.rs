//! User traffic to capsule ports: the subdomain form
//! `{port}-{capsule}.{domain}` (any domain; `*.localhost` works in browsers
//! and curl) and the path form `/proxy/{capsule}/{port}/…`, both forwarded
//! to the capsule's agent's path proxy over the HTTP/1.1-only proxy pool
//! or, when that agent runs in this process (`wrenn up`), handed to its
//! proxy directly, with no loopback HTTP hop: plain requests, and
//! WebSocket upgrades, whose tunnels the agent owns either way (handed
//! over with this route's stop token, so that pause and destroy end them
//! here as they do over HTTP).
//!
//! - Capsule → agent address is cached for [`ROUTE_TTL`] and evicted on
//!   destroy (which also closes that capsule's WebSocket tunnels) and on a
//!   502 from the agent.
//! - Unknown capsule: 404. Not running: 503. Port not listening yet: the
//!   agent's 502 (never 404), which is what clients that wait for a server
//!   to come up (wrenn's code runner) retry on. Port 49983 (envd) by Host,
//!   and everything routed by E2B's headers, answer as E2B's proxy does
//!   instead ([`crate::e2b::dataplane`]).
//! - Destroying or pausing a capsule evicts its route, which closes its
//!   tunnels and fails its streamed responses.
//! - The subdomain form needs no key (capsule URLs are unguessable, and
//!   browsers send none); a request that carries `X-API-Key` must carry
//!   one of the owning team's. The path form always needs the owner's key.
//!   `X-API-Key` is removed before forwarding.
//! - Location headers: the agent prefixes them with `/proxy/{id}/{port}`;
//!   for subdomain clients that prefix is removed again (the hot path,
//!   [`FastLane`], asks the agent for them without it).
//! - Proxy traffic does not count as capsule activity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::header::{self, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use tokio_util::sync::CancellationToken;
use wrenn_http::relay::{self, plain, LocalProxy};
use wrenn_types::envd::ENVD_PORT;
use wrenn_types::hosts::AGENT_TOKEN_HEADER;
use wrenn_types::ids::{CapsuleId, TeamId};
use wrenn_types::proxy::{parse_host, parse_target, HostTarget};

use crate::auth::authenticate;
use crate::model::Status;
use crate::server::Cp;

pub const ROUTE_TTL: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Route {
    pub team: TeamId,
    /// The capsule's host.
    pub host: wrenn_types::ids::HostId,
    pub agent: std::net::SocketAddr,
    /// The name the agent is dialed by (its certificate's).
    pub agent_name: String,
    /// The proxy pool, or (benchmark's shared mode) the agent's RPC client.
    pub client: wrenn_http::ProxyClient,
    /// The agent's proxy, when the agent runs in this process.
    pub local: Option<Arc<dyn LocalProxy>>,
    /// The capsule's envd access token.
    pub token: String,
    /// What the agent requires of the control plane.
    pub agent_token: HeaderValue,
    at: Instant,
    /// Looked up again on next use (the agent refused a dial).
    stale: AtomicBool,
    /// Cancelled on eviction: ends the capsule's tunnels and streams.
    pub stop: CancellationToken,
}

impl Route {
    /// Usable without a lookup: not refused since, and younger than
    /// [`ROUTE_TTL`].
    fn fresh(&self) -> bool {
        !self.stale.load(Ordering::Relaxed) && self.at.elapsed() < ROUTE_TTL
    }
}

/// Cached capsule → agent routes (shared, not copied, by each request).
#[derive(Debug, Default)]
pub struct Routes {
    map: Mutex<HashMap<CapsuleId, Arc<Route>>>,
    /// Evictions so far: a lookup that saw one happen while it read the
    /// capsule checks the capsule again (the eviction may have been its
    /// pause or destroy, which the read missed).
    evictions: AtomicU64,
}

impl Routes {
    /// Forget a capsule's route and close its tunnels and streams.
    pub fn evict(&self, id: &CapsuleId) {
        self.evictions.fetch_add(1, Ordering::SeqCst);
        if let Some(r) = self.map.lock().unwrap().remove(id) {
            r.stop.cancel();
        }
    }

    /// Forget every route to `host`'s agent (it moved: a new address, a
    /// new certificate or token), closing their tunnels and streams.
    pub fn evict_host(&self, host: &wrenn_types::ids::HostId) {
        let ids: Vec<CapsuleId> = self
            .map
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.host == *host)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.evict(&id);
        }
    }

    /// Cache `id`'s route, made by `make` with the stop token to use: the
    /// one of the route already cached (a concurrent lookup's, or the one
    /// this refreshes: eviction must reach the streams opened through
    /// either), else a new one.
    fn insert(
        &self,
        id: &CapsuleId,
        fresh_token: impl FnOnce() -> CancellationToken,
        make: impl FnOnce(CancellationToken) -> Route,
    ) -> Arc<Route> {
        let mut map = self.map.lock().unwrap();
        let stop = map
            .get(id)
            .map(|r| r.stop.clone())
            .filter(|t| !t.is_cancelled())
            .unwrap_or_else(fresh_token);
        let route = Arc::new(make(stop));
        map.insert(id.clone(), route.clone());
        route
    }

    /// The cached route of `id`, while it may be used without a lookup.
    fn fresh(&self, id: &str) -> Option<Arc<Route>> {
        self.map
            .lock()
            .unwrap()
            .get(id)
            .filter(|r| r.fresh())
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a capsule cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such capsule, or it is stopped.
    Unknown,
    NotRunning(Status),
    HostDown,
    Internal,
}

impl Refusal {
    /// wrenn's answer: 404 unknown, 503 not running or host down.
    fn response(&self) -> Response {
        match self {
            Refusal::Unknown => plain(StatusCode::NOT_FOUND, "capsule not found"),
            Refusal::NotRunning(s) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("capsule is not running (status: {s})"),
            ),
            Refusal::HostDown => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the capsule's host is not reachable",
            ),
            Refusal::Internal => plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }
}

/// The route to a running capsule.
pub async fn lookup(cp: &Cp, id: &CapsuleId) -> Result<Arc<Route>, Refusal> {
    // (a second turn only when the capsule's agent moved under the first)
    for _ in 0..2 {
        if let Some(r) = cp.proxy_routes.fresh(id.as_str()) {
            return Ok(r);
        }
        let evictions = cp.proxy_routes.evictions.load(Ordering::SeqCst);
        let (route, host) = fresh_route(cp, id).await?;
        // A pause or destroy that evicted between the read and the insert
        // would leave this route (and the tunnels opened through it)
        // behind, as would an agent that moved (`Routes::evict_host`):
        // check both again, and drop the route if either happened.
        if cp.proxy_routes.evictions.load(Ordering::SeqCst) == evictions {
            return Ok(route);
        }
        if let Err(refusal) = running(cp, id).await {
            cp.proxy_routes.evict(id);
            return Err(refusal);
        }
        if cp
            .hosts
            .get(&host.id)
            .is_some_and(|now| Arc::ptr_eq(&now, &host))
        {
            return Ok(route);
        }
        cp.proxy_routes.evict(id);
    }
    Err(Refusal::HostDown)
}

/// Read `id`'s capsule and host, and cache a route to it.
async fn fresh_route(
    cp: &Cp,
    id: &CapsuleId,
) -> Result<(Arc<Route>, Arc<crate::hosts::HostConn>), Refusal> {
    let c = running(cp, id).await?;
    let host = c.host_id.as_ref().and_then(|h| cp.hosts.get(h));
    let agent = host.as_ref().and_then(|h| h.address.parse().ok());
    let (Some(agent), Some(host)) = (agent, host) else {
        return Err(Refusal::HostDown);
    };
    let client = if cp.config.shared_transport {
        host.h2.clone()
    } else {
        cp.proxy.clone()
    };
    // The seed's shared-transport mode (benchmarks) keeps the HTTP hop.
    let local = cp
        .local_agent
        .get()
        .filter(|(h, _)| !cp.config.shared_transport && c.host_id.as_ref() == Some(h))
        .map(|(_, p)| p.clone());
    let route = cp.proxy_routes.insert(
        id,
        || cp.stop.child_token(),
        |stop| Route {
            team: c.team_id.clone(),
            host: host.id.clone(),
            agent,
            agent_name: host.name.clone(),
            client,
            local,
            token: c.access_token.clone(),
            agent_token: host.agent_token.clone(),
            at: Instant::now(),
            stale: AtomicBool::new(false),
            stop,
        },
    );
    Ok((route, host))
}

/// `id` as the database has it, if it is running.
async fn running(cp: &Cp, id: &CapsuleId) -> Result<crate::db::CapsuleRow, Refusal> {
    match cp.db.capsule_any(id).await {
        Ok(Some(c)) if c.status == Status::Running => Ok(c),
        Ok(Some(c)) if c.status != Status::Stopped => Err(Refusal::NotRunning(c.status)),
        Ok(_) => Err(Refusal::Unknown),
        Err(e) => {
            tracing::error!(error = ?e, "proxy lookup failed");
            Err(Refusal::Internal)
        }
    }
}

/// Whether the request's key (if any) belongs to `team`; `require` makes
/// a key mandatory.
async fn allowed(
    cp: &Cp,
    key: Option<String>,
    team: &TeamId,
    require: bool,
) -> Result<(), Response> {
    let Some(key) = key else {
        return if require {
            Err(plain(StatusCode::UNAUTHORIZED, "missing X-API-Key header"))
        } else {
            Ok(())
        };
    };
    match authenticate(&cp.db, key.trim()).await {
        Ok((_, t)) if t.id == *team => Ok(()),
        Ok(_) => Err(plain(StatusCode::NOT_FOUND, "capsule not found")),
        Err(e) => Err(plain(e.status, e.message)),
    }
}

async fn proxy(
    cp: &Cp,
    req: Request,
    id: CapsuleId,
    port: u16,
    rest: String,
    subdomain: bool,
) -> Response {
    let route = match lookup(cp, &id).await {
        Ok(r) => r,
        Err(refusal) => return refusal.response(),
    };
    let key = req
        .headers()
        .get(&relay::X_API_KEY)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if let Err(resp) = allowed(cp, key, &route.team, !subdomain).await {
        return resp;
    }
    relay_to(cp, req, &id, &route, port, &rest, subdomain).await
}

/// Send `req` to port `port` of capsule `id` through its agent's path
/// proxy; `rest` is the path in the capsule. `subdomain` strips the
/// agent's prefix from `Location` again.
pub async fn relay_to(
    cp: &Cp,
    req: Request,
    id: &CapsuleId,
    route: &Route,
    port: u16,
    rest: &str,
    subdomain: bool,
) -> Response {
    let prefix = format!("/proxy/{id}/{port}");
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{prefix}{rest}?{q}"),
        None => format!("{prefix}{rest}"),
    };
    let strip = |h: &mut http::HeaderMap| {
        if !subdomain {
            return;
        }
        let new = h
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.strip_prefix(prefix.as_str()))
            .map(|l| {
                if l.is_empty() {
                    "/".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .and_then(|l| HeaderValue::from_str(&l).ok());
        if let Some(v) = new {
            h.insert(header::LOCATION, v);
        }
    };
    let upgrade = relay::is_upgrade(req.headers());
    let resp = match &route.local {
        Some(local) => {
            let Ok(uri) = path_and_query.parse::<Uri>() else {
                return plain(StatusCode::BAD_REQUEST, "unparsable path");
            };
            let (mut parts, body) = req.into_parts();
            parts.uri = uri;
            // (the HTTP path overwrites it, and the agent drops it)
            parts.headers.remove(AGENT_TOKEN_HEADER);
            let req = Request::from_parts(parts, body);
            // (an upgrade's request still holds the client connection's
            // upgrade: the agent's proxy takes it over for its tunnel)
            let resp = if upgrade {
                local.clone().tunnel(req, route.stop.clone()).await
            } else {
                local.clone().serve(req).await
            };
            let (mut parts, body) = resp.into_parts();
            strip(&mut parts.headers);
            Response::from_parts(parts, body)
        }
        _ => {
            let mut req = req;
            req.headers_mut()
                .insert(AGENT_TOKEN_HEADER, route.agent_token.clone());
            if upgrade {
                return relay::tunnel(
                    req,
                    route.agent,
                    Some((&cp.tunnel_tls, &route.agent_name)),
                    &path_and_query,
                    &cp.tasks,
                    std::slice::from_ref(&route.stop),
                    strip,
                )
                .await;
            }
            let Ok(uri) = format!("https://{}{}", route.agent, path_and_query).parse::<Uri>()
            else {
                return plain(StatusCode::BAD_REQUEST, "unparsable path");
            };
            let client = if port == ENVD_PORT && !cp.config.shared_transport {
                &cp.envd_proxy
            } else {
                &route.client
            };
            relay::forward(client, None, req, uri, strip).await
        }
    };
    settle(cp, id.as_str(), route, resp)
}

/// The last step of every relay: a refusal by the agent marks the route
/// for a new lookup, and the answer's body ends when the route is evicted.
fn settle(cp: &Cp, id: &str, route: &Route, resp: Response) -> Response {
    let refused = resp.status() == StatusCode::BAD_GATEWAY && relay::refusal_kind(&resp).is_some();
    if refused || resp.status() == StatusCode::UNAUTHORIZED {
        // The agent itself may be gone, or have a new token since the
        // route was cached: look the route up again next time (keeping its
        // stop token, which streams still open were given).
        if let Some(r) = cp.proxy_routes.map.lock().unwrap().get(id) {
            r.stale.store(true, Ordering::Relaxed);
        }
    }
    relay::cut_on(resp, route.stop.clone())
}

/// The subdomain proxy's hot path, in front of the router: a plain
/// request whose Host names a port of a capsule whose route is cached,
/// and whose agent runs in this process, goes straight to that agent's
/// proxy. It answers exactly as [`subdomain`] would, which takes every
/// other request: those with a key (checked there) or E2B's routing
/// headers, upgrades, a capsule's first request (which fills the cache).
#[derive(Debug)]
pub struct FastLane(pub Arc<Cp>);

impl wrenn_http::Front for FastLane {
    fn take(
        &self,
        req: Request,
        pair: &Arc<wrenn_http::Pair>,
    ) -> Result<wrenn_http::Answer, Request> {
        use crate::e2b::dataplane::{self, SANDBOX_ID_HEADER};
        // (typed: a `&str` name is parsed again on every lookup)
        const SANDBOX_ID: HeaderName = HeaderName::from_static(SANDBOX_ID_HEADER);
        const AGENT_TOKEN: HeaderName = HeaderName::from_static(AGENT_TOKEN_HEADER);
        let h = req.headers();
        let routed_elsewhere = h.contains_key(&SANDBOX_ID)
            || h.contains_key(&relay::X_API_KEY)
            || h.contains_key(&AGENT_TOKEN)
            || relay::is_upgrade(h);
        if routed_elsewhere {
            return Err(req);
        }
        // (as `subdomain` reads it; an ambiguous one is its 400)
        let Ok(host) = target_host(&req) else {
            return Err(req);
        };
        let Some(HostTarget::Capsule { port, id }) = host.map(parse_host) else {
            return Err(req);
        };
        let Some(route) = self.0.proxy_routes.fresh(id) else {
            return Err(req);
        };
        let Some(local) = route.local.clone() else {
            return Err(req);
        };
        let path = req.uri().path_and_query().cloned();
        let path = path.as_ref().map_or("/", |p| p.as_str());
        if !path.starts_with('/') {
            // (`OPTIONS *` and the like: the router's refusal)
            return Err(req);
        }
        let id = id.to_owned();
        let to = relay::PortTarget {
            capsule: &id,
            port,
            path_and_query: path,
        };
        let answer = local.serve_port(to, req, pair.clone());
        let cp = self.0.clone();
        Ok(Box::pin(async move {
            let resp = settle(&cp, &id, &route, answer.await);
            if port == ENVD_PORT {
                dataplane::as_e2b(resp, &id, port)
            } else {
                resp
            }
        }))
    }
}

/// The host a request is for (RFC 9112 §3.2): an absolute-form target's
/// (or HTTP/2's `:authority`), else the one `Host` header. Two `Host`
/// headers, or an HTTP/1.1 request with neither, is a 400: routed by one
/// and forwarded with both, a capsule would see a host other than the
/// one the route was chosen by.
fn target_host(req: &Request) -> Result<Option<&str>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err("more than one Host header");
    }
    if let Some(h) = req.uri().host() {
        return Ok(Some(h));
    }
    match first {
        Some(v) => v.to_str().map(Some).map_err(|_| "invalid Host header"),
        None if req.version() == http::Version::HTTP_11 => Err("missing Host header"),
        None => Ok(None),
    }
}

/// Whether a connection whose first request is this one carries user
/// traffic to a capsule port (served on the bulk runtime, see
/// [`wrenn_http::BulkClass`]): the subdomain and path forms and E2B's
/// routing headers, except to envd's port, which carries E2B's process
/// and PTY RPC and stays with the API.
pub fn is_bulk(path: &str, headers: &http::HeaderMap) -> bool {
    use crate::e2b::dataplane::{SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER};
    let user_port = |p: &str| p.trim().parse::<u16>().is_ok_and(|p| p != ENVD_PORT);
    if headers.contains_key(SANDBOX_ID_HEADER) {
        return headers
            .get(SANDBOX_PORT_HEADER)
            .and_then(|p| p.to_str().ok())
            .is_some_and(user_port);
    }
    if let Some(t) = parse_target(path) {
        return user_port(t.port);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    matches!(parse_host(host), HostTarget::Capsule { port, .. } if port != ENVD_PORT)
}

/// Middleware: E2B's data plane first (routing headers, signed URLs),
/// then requests whose `Host` names a capsule port are proxied; the rest
/// go to the API.
pub async fn subdomain(State(cp): State<Arc<Cp>>, req: Request, next: Next) -> Response {
    if let Err(why) = target_host(&req) {
        return plain(StatusCode::BAD_REQUEST, why);
    }
    let req = match crate::e2b::dataplane::route(&cp, req).await {
        crate::e2b::dataplane::Routed::Done(resp) => return resp,
        crate::e2b::dataplane::Routed::Pass(req) => req,
    };
    let host = target_host(&req)
        .ok()
        .flatten()
        .unwrap_or_default()
        .to_owned();
    match parse_host(&host) {
        HostTarget::NotProxy => next.run(req).await,
        HostTarget::Invalid(why) => plain(StatusCode::BAD_REQUEST, why),
        HostTarget::Capsule { port, id } if port == ENVD_PORT => {
            // envd by Host: what E2B's SDKs and signed URLs reach.
            let id = id.to_owned();
            crate::e2b::dataplane::serve(&cp, req, &id, port).await
        }
        HostTarget::Capsule { port, id } => {
            let Ok(id) = id.parse::<CapsuleId>() else {
                return plain(StatusCode::BAD_REQUEST, "invalid capsule ID");
            };
            let rest = req.uri().path().to_owned();
            proxy(&cp, req, id, port, rest, true).await
        }
    }
}

/// `/proxy/{capsule}/{port}/…` on the API listener (owner's key needed).
pub async fn path(State(cp): State<Arc<Cp>>, req: Request) -> Response {
    let p = req.uri().path().to_owned();
    let Some(t) = parse_target(&p) else {
        return plain(StatusCode::NOT_FOUND, "not a proxy path");
    };
    let Ok(id) = t.id.parse::<CapsuleId>() else {
        return plain(StatusCode::BAD_REQUEST, "invalid capsule ID");
    };
    let port = match t.port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return plain(StatusCode::BAD_REQUEST, "invalid port"),
    };
    let rest = t.rest.to_owned();
    proxy(&cp, req, id, port, rest, false).await
}
