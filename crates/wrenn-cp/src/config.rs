//! The control plane's configuration, validated once at start.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CpConfig {
    /// `sqlite:PATH` (WAL; created if missing) or `postgres://…`.
    pub database_url: String,
    /// Host suffix of subdomain proxy URLs (`{port}-{capsule}.{domain}`).
    /// Any suffix is routed; this is only what URLs are built with.
    pub proxy_domain: Option<String>,
    /// Serve E2B's debug mode: requests for sandbox `debug_sandbox_id`
    /// from loopback reach a `base` capsule of the admin team, with no key
    /// or token. Off by default: behind a reverse proxy on the same host
    /// every request comes from loopback.
    pub e2b_debug: bool,
    /// How often the database is compared with what agents report.
    pub reconcile_interval: Duration,
    /// How old a team snapshot's layers on a host must be before the
    /// reconciler deletes them for want of a template naming them: the
    /// control plane taking a snapshot records it only after the agent
    /// made it (another control plane's may be in flight).
    pub orphan_layer_grace: Duration,
    /// How often the host monitor looks for silent hosts, and how long a
    /// host may go without a sign of life before it is `unreachable`.
    pub host_monitor_interval: Duration,
    pub host_heartbeat_timeout: Duration,
    /// JSON request bodies larger than this are refused (413).
    pub max_json_body: usize,
    /// `files/write` bodies larger than this are refused (413).
    pub max_file_body: usize,
    /// Benchmarks only: send proxied HTTP requests over the agent's RPC
    /// connection (one shared HTTP/2 client for both traffic classes, as
    /// the seed system did) to measure what separate transports buy.
    pub shared_transport: bool,
    /// How long host tokens and refresh tokens are good for, and a used
    /// refresh token's grace (tests shorten them; [`crate::host_tokens`]).
    pub host_token_ttl: Duration,
    pub host_refresh_ttl: Duration,
    pub host_refresh_grace: Duration,
}

impl CpConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        CpConfig {
            database_url: database_url.into(),
            proxy_domain: None,
            e2b_debug: false,
            reconcile_interval: Duration::from_secs(30),
            orphan_layer_grace: Duration::from_secs(15 * 60),
            host_monitor_interval: Duration::from_secs(15),
            host_heartbeat_timeout: Duration::from_secs(90),
            max_json_body: 1 << 20,
            max_file_body: 100 << 20,
            shared_transport: false,
            host_token_ttl: crate::host_tokens::TOKEN_TTL,
            host_refresh_ttl: crate::host_tokens::REFRESH_TTL,
            host_refresh_grace: crate::host_tokens::REFRESH_GRACE,
        }
    }
}
