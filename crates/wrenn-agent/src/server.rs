//! The agent's one listener: the Connect RPC (`/wrenn.agent.v1.Agent/…`),
//! the port proxy (`/proxy/{capsule}/{port}/…`) and `/health`, on h1 and
//! h2c, or over mutual TLS once the control plane has issued this host a
//! certificate ([`AgentServer::tls`], [`crate::register`]). The control
//! plane reaches RPC and proxy through separate pools.
//! All but `/health` need the agent's token ([`crate::auth`]).
//!
//! [`run`] owns the reaper, warm-pool and sampler tasks and the proxy's tunnels; when `shutdown`
//! resolves it stops accepting, drains connections, stops the reaper and
//! closes tunnels. Capsules are left running: containers outlive the agent
//! and the next one re-adopts them.

use std::future::Future;
use std::sync::Arc;

use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::proxy::{self, PortProxy};
use crate::rpc;

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// The agent's HTTP surface, before it is served.
#[derive(Debug)]
pub struct AgentServer {
    agent: Arc<Agent>,
    proxy: Arc<PortProxy>,
    tls: wrenn_http::tls::TlsSlot,
}

impl AgentServer {
    /// Build the proxy and hook its route eviction to capsule destruction.
    pub fn new(agent: Arc<Agent>) -> AgentServer {
        let proxy = PortProxy::new(agent.clone());
        let weak = Arc::downgrade(&proxy);
        agent.on_destroy(Box::new(move |id| {
            if let Some(p) = weak.upgrade() {
                p.evict(id);
            }
        }));
        AgentServer {
            agent,
            proxy,
            tls: Default::default(),
        }
    }

    pub fn proxy(&self) -> &Arc<PortProxy> {
        &self.proxy
    }

    /// Where the certificate the control plane issues goes: once it is
    /// installed, the listener serves only mutual TLS.
    pub fn tls(&self) -> &wrenn_http::tls::TlsSlot {
        &self.tls
    }

    /// Serve until `shutdown` resolves.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let AgentServer { agent, proxy, tls } = self;
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(agent.clone().run_reaper(stop.clone().cancelled_owned()));
        let warm = tokio::spawn(agent.clone().run_warm_pools(stop.clone().cancelled_owned()));
        let sampler = tokio::spawn(agent.clone().run_sampler(stop.clone().cancelled_owned()));
        let router = axum::Router::new()
            .route("/proxy/{*rest}", any(proxy::handler))
            .with_state(proxy.clone())
            .route("/health", get(health))
            .fallback_service(rpc::router(agent.clone()).into_axum_service())
            .layer(axum::middleware::from_fn_with_state(
                agent.token().clone(),
                crate::auth::require,
            ));
        let served = wrenn_http::serve(
            listener,
            router,
            wrenn_http::ServerConfig {
                bulk: Some(wrenn_http::BulkClass::new(proxy::is_bulk)),
                tls,
                front: Some(Arc::new(proxy::FastLane {
                    proxy: proxy.clone(),
                    token: agent.token().clone(),
                })),
                ..Default::default()
            },
            shutdown,
        )
        .await;
        stop.cancel();
        let _ = reaper.await;
        let _ = warm.await;
        let _ = sampler.await;
        agent.drain_pools().await;
        proxy.shutdown().await;
        served
    }
}

/// Serve `agent` on `listener` until `shutdown` resolves.
pub async fn run(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    AgentServer::new(agent).run(listener, shutdown).await
}
