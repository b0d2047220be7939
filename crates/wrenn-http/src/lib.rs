//! HTTP plumbing shared by every Wrenn server and client.
//!
//! Servers: [`serve`] runs an axum router on a listener with the timeouts
//! DESIGN.md requires of every hop (read-header 10 s, idle 620 s),
//! `TCP_NODELAY`, HTTP/1.1 and h2c on one port, WebSocket upgrades, and a
//! graceful shutdown with a deadline; a [`Front`] may take requests before the
//! router does. Every connection is a task owned by the accept loop's
//! `JoinSet`; nothing is detached.
//!
//! Clients: [`client`] builds a hyper client with its **own** connection pool
//! (never a process-wide default), `TCP_NODELAY` on, pinned to the HTTP
//! version a traffic class needs. A [`Pair`] is a downstream connection's
//! own upstream connection, driven by that connection's task (a proxy's
//! hot path).
//!
//! Between the control plane and its agents: mutual TLS ([`tls`]).

mod client;
mod pair;
pub mod relay;
mod server;
pub mod tls;

pub use client::{
    client, dial_with_retry, proxy_client, rpc_h2_client, ClientBody, Conn, HttpClient,
    HttpVersion, ProxyBody, ProxyClient, RetryConnector, PROXY_DIAL_ATTEMPTS, PROXY_DIAL_STEP,
};
pub use pair::Pair;
pub use server::{
    bulk_runtime, serve, thread_nice, Answer, BulkClass, Classify, Front, ServerConfig, BULK_NICE,
    DRAIN_LIMIT,
};
