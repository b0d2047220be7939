//! The port proxy: `/proxy/{capsule}/{port}/{rest}` → `http://{capsule
//! ip}:{port}/{rest}`.
//!
//! - Its own HTTP/1.1 pool ([`wrenn_http::proxy_client`]), never shared;
//!   dials are retried 3 times with linear backoff, for ports that are just
//!   coming up (envd's forwarder scans every second).
//! - The path after the port is forwarded byte for byte (no decoding, no
//!   normalising: trailing slashes and `%2F` survive), with the query.
//! - `Location` headers keep the prefix: a root-relative one gets it, an
//!   absolute one naming the capsule's own address becomes prefix + path.
//!   (`LocalProxy::serve_port`, for a subdomain client in this process,
//!   makes the same rewrite with no prefix.)
//! - WebSocket (any `Upgrade`) requests get a connection of their own and,
//!   after the upstream's 101, a byte tunnel. Tunnels are tasks owned by
//!   the proxy's tracker and cancelled with it, with their capsule, and
//!   (`wrenn up`'s control plane hands its upgrades over in-process) with
//!   the control plane's route.
//! - Routes (capsule, port → address and prefix) are cached and evicted
//!   when the capsule is destroyed; the capsule's state is checked on
//!   every request (a paused capsule answers 503, never 404). Refusals of
//!   the proxy's own are marked ([`wrenn_http::relay::PROXY_ERROR`]), and
//!   streamed responses fail when the capsule is destroyed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{StatusCode, Uri};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wrenn_http::relay::{self, is_upgrade, plain, refused, PortTarget};
use wrenn_types::envd::ENVD_PORT;
use wrenn_types::ids::CapsuleId;
use wrenn_types::proxy::{parse_target, rewrite_location};

use crate::agent::Agent;
use crate::error::{AgentError, ErrorKind};

/// One cached route.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: SocketAddr,
    /// `upstream` as a URI's authority (formatted once, not per request).
    authority: Authority,
    pub prefix: String,
    /// Cancelled when the capsule is destroyed: ends its tunnels (a
    /// deleted netns never resets their upstream sockets).
    stop: CancellationToken,
}

#[derive(Debug)]
pub struct PortProxy {
    agent: Arc<Agent>,
    client: wrenn_http::ProxyClient,
    routes: Mutex<HashMap<(CapsuleId, u16), Arc<Route>>>,
    tunnels: TaskTracker,
    stop: CancellationToken,
}

impl PortProxy {
    pub fn new(agent: Arc<Agent>) -> Arc<PortProxy> {
        Arc::new(PortProxy {
            agent,
            client: wrenn_http::proxy_client(None),
            routes: Mutex::new(HashMap::new()),
            tunnels: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// Forget every route of a destroyed capsule.
    pub fn evict(&self, id: &CapsuleId) {
        self.routes.lock().unwrap().retain(|(c, _), route| {
            if c == id {
                route.stop.cancel();
            }
            c != id
        });
    }

    pub fn cached_routes(&self) -> usize {
        self.routes.lock().unwrap().len()
    }

    /// Close every tunnel and wait for them (shutdown).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tunnels.close();
        self.tunnels.wait().await;
    }

    fn route(&self, id: &CapsuleId, port: u16) -> Result<Arc<Route>, AgentError> {
        // The state check and the address lookup run on every request; an
        // entry is used only while it names the capsule's address, so it can
        // never point at an address the capsule no longer has.
        let upstream = self.agent.proxy_target(id, port)?;
        let key = (id.clone(), port);
        let mut routes = self.routes.lock().unwrap();
        if let Some(r) = routes.get(&key).filter(|r| r.upstream == upstream) {
            return Ok(r.clone());
        }
        let authority = Authority::try_from(upstream.to_string())
            .map_err(|e| AgentError::Invalid(format!("capsule address {upstream}: {e}")))?;
        let route = Arc::new(Route {
            upstream,
            authority,
            prefix: format!("/proxy/{id}/{port}"),
            stop: self.stop.child_token(),
        });
        routes.insert(key, route.clone());
        Ok(route)
    }

    /// Relay a `/proxy/…` request; plain ones over `pair` when it is free.
    /// A tunnel also ends when `caller` (another proxy's route) is
    /// cancelled.
    pub async fn handle(
        self: Arc<Self>,
        req: Request,
        pair: Option<Arc<wrenn_http::Pair>>,
        caller: Option<CancellationToken>,
    ) -> Response {
        let path = req.uri().path().to_owned();
        let Some(t) = parse_target(&path) else {
            return plain(StatusCode::NOT_FOUND, "not a proxy path");
        };
        let Ok(id) = t.id.parse::<CapsuleId>() else {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("invalid capsule ID {:?}", t.id),
            );
        };
        let port = match t.port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("invalid port {:?}", t.port),
                )
            }
        };
        let route = match self.route(&id, port) {
            Ok(r) => r,
            Err(e) => return refusal(&e),
        };
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{}?{q}", t.rest),
            None => t.rest.to_owned(),
        };
        if is_upgrade(req.headers()) {
            return self.tunnel(req, route, &path_and_query, caller).await;
        }
        self.forward(req, route, &path_and_query, true, pair).await
    }

    /// Relay a plain request (over `pair` when it is free); `prefixed`:
    /// `Location` headers get the path-form prefix.
    fn forward(
        self: Arc<Self>,
        req: Request,
        route: Arc<Route>,
        path_and_query: &str,
        prefixed: bool,
        pair: Option<Arc<wrenn_http::Pair>>,
    ) -> wrenn_http::Answer {
        // (the request's own target, when it is the one to send, is
        // shared rather than parsed again)
        let pq = match req.uri().path_and_query() {
            Some(pq) if pq.as_str() == path_and_query => Ok(pq.clone()),
            _ => path_and_query.parse::<PathAndQuery>(),
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(route.authority.clone());
        parts.path_and_query = pq.ok();
        let Ok(uri) = Uri::from_parts(parts) else {
            return Box::pin(std::future::ready(plain(
                StatusCode::BAD_REQUEST,
                "unparsable path",
            )));
        };
        Box::pin(async move {
            let stop = route.stop.clone();
            let fix = |h: &mut HeaderMap| fix_location(h, &route, prefixed);
            let via = pair.as_deref().map(|pair| relay::Via {
                pair,
                upstream: route.upstream,
                stop: &stop,
            });
            let resp = relay::forward(&self.client, via, req, uri, fix).await;
            relay::cut_on(resp, stop)
        })
    }

    async fn tunnel(
        &self,
        req: Request,
        route: Arc<Route>,
        path_and_query: &str,
        caller: Option<CancellationToken>,
    ) -> Response {
        let stops: Vec<_> = std::iter::once(route.stop.clone()).chain(caller).collect();
        relay::tunnel(
            req,
            route.upstream,
            None,
            path_and_query,
            &self.tunnels,
            &stops,
            |h| fix_location(h, &route, true),
        )
        .await
    }
}

/// The proxy's answer when a capsule's port cannot be reached.
fn refusal(e: &AgentError) -> Response {
    if e.kind() == ErrorKind::NotFound {
        refused(StatusCode::NOT_FOUND, "not-found", e.to_string())
    } else {
        refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-running",
            format!("capsule is not available: {e}"),
        )
    }
}

fn fix_location(h: &mut HeaderMap, route: &Route, prefixed: bool) {
    let prefix = if prefixed { route.prefix.as_str() } else { "" };
    let new = h
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| rewrite_location(l, route.upstream, prefix))
        .and_then(|l| HeaderValue::from_str(&l).ok());
    if let Some(v) = new {
        h.insert(header::LOCATION, v);
    }
}

/// Connections that start with a proxied request to a user port are user
/// traffic, served on the bulk runtime ([`wrenn_http::BulkClass`]); RPC,
/// and requests to envd's port (E2B's process and PTY RPC, which the
/// control plane sends on a pool of their own), stay on the main one.
pub fn is_bulk(path: &str, _headers: &HeaderMap) -> bool {
    parse_target(path).is_some_and(|t| t.port.parse::<u16>().is_ok_and(|p| p != ENVD_PORT))
}

/// `wrenn up`'s control plane calls its agent's proxy directly.
impl wrenn_http::relay::LocalProxy for PortProxy {
    fn serve(self: Arc<Self>, req: Request) -> wrenn_http::Answer {
        Box::pin(self.handle(req, None, None))
    }

    fn tunnel(self: Arc<Self>, req: Request, stop: CancellationToken) -> wrenn_http::Answer {
        Box::pin(self.handle(req, None, Some(stop)))
    }

    fn serve_port(
        self: Arc<Self>,
        to: PortTarget<'_>,
        req: Request,
        pair: Arc<wrenn_http::Pair>,
    ) -> wrenn_http::Answer {
        let refused = match to.capsule.parse::<CapsuleId>() {
            Ok(id) => match self.route(&id, to.port) {
                Ok(route) => return self.forward(req, route, to.path_and_query, false, Some(pair)),
                Err(e) => refusal(&e),
            },
            Err(e) => plain(StatusCode::BAD_REQUEST, e.to_string()),
        };
        Box::pin(std::future::ready(refused))
    }
}

/// The axum handler (state: the proxy).
pub async fn handler(State(proxy): State<Arc<PortProxy>>, req: Request) -> Response {
    proxy.handle(req, None, None).await
}

/// The agent listener's hot path, in front of its router: a plain
/// `/proxy/…` request that carries the agent's token goes straight to the
/// proxy, over the client connection's own upstream connection (as the
/// control plane's subdomain proxy does, see [`wrenn_http::Pair`]),
/// sparing the router and its middleware. Everything else — upgrades, and
/// requests without the right token, which the router's middleware
/// refuses — is handed back.
#[derive(Debug)]
pub struct FastLane {
    pub proxy: Arc<PortProxy>,
    pub token: Arc<str>,
}

impl wrenn_http::Front for FastLane {
    fn take(
        &self,
        mut req: Request,
        pair: &Arc<wrenn_http::Pair>,
    ) -> Result<wrenn_http::Answer, Request> {
        if !req.uri().path().starts_with("/proxy/")
            || is_upgrade(req.headers())
            || !crate::auth::presents(req.headers(), &self.token)
        {
            return Err(req);
        }
        req.headers_mut().remove(crate::auth::AGENT_TOKEN_HEADER);
        Ok(Box::pin(self.proxy.clone().handle(
            req,
            Some(pair.clone()),
            None,
        )))
    }
}
