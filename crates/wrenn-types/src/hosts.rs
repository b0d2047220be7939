//! What a host agent tells the control plane about itself, when it
//! registers and on every heartbeat.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// `ip:port` of the agent's RPC and port-proxy listener.
    pub address: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub cpu_cores: i64,
    #[serde(default)]
    pub memory_mb: i64,
    #[serde(default)]
    pub disk_gb: i64,
    /// The secret the agent requires on its RPC and port proxy, which the
    /// control plane must send (`X-Wrenn-Agent-Token`).
    #[serde(default)]
    pub agent_token: String,
}

/// The header carrying [`HostFacts::agent_token`] to the agent.
pub const AGENT_TOKEN_HEADER: &str = "x-wrenn-agent-token";

/// The message of the control plane's 404 (code `not_found`) for a host it
/// does not know. An agent whose heartbeat gets it was deleted, and
/// leaves; a 404 with any other message (a wrong URL) is not that.
pub const HOST_NOT_FOUND: &str = "host not found";

/// The least memory an agent gives a capsule (MiB); the control plane
/// refuses less before it places one.
pub const MIN_MEMORY_MB: u64 = 32;

/// The longest inactivity timeout an agent takes (a year, seconds).
pub const MAX_TIMEOUT_SEC: u64 = 366 * 24 * 3600;
