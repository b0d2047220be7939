//! wrenn-agent: the host agent. It owns every capsule on one host: OCI
//! runtime, overlay rootfs, network namespace and firewall, cgroup limits,
//! lifecycle and timeouts, one envd client per capsule; it serves the agent
//! RPC and the port proxy to the control plane.

pub mod agent;
pub mod auth;
pub mod cgroup;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod error;
pub mod history;
pub mod network;
pub mod proxy;
pub mod record;
pub mod register;
pub mod rootfs;
pub mod rpc;
pub mod runtime;
pub mod server;
pub mod state;
pub mod template;

pub use agent::{Agent, CapsuleInfo, CreateRequest};
pub use config::AgentConfig;
pub use error::{AgentError, ErrorKind};
