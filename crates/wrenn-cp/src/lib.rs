//! The control plane (`wrenn-cp`): wrenn's `/v1` REST + WebSocket + SSE
//! API over a database of teams, keys, hosts, capsules and templates; it
//! places capsules on hosts, reaches their agents over the agent RPC,
//! reconciles its records with what agents report, and routes subdomain
//! traffic `{port}-{capsule}.{domain}` to capsule ports.
//!
//! `server::ControlPlane::start` wires it together; `wrenn up` runs it next
//! to an agent in one process.

pub mod api;
pub mod auth;
pub mod build;
pub mod config;
pub mod copies;
pub mod db;
pub mod e2b;
pub mod error;
pub mod events;
pub mod host_tokens;
pub mod hosts;
pub mod locks;
pub mod model;
pub mod pki;
pub mod proxy;
pub mod reconcile;
pub mod server;

pub use config::CpConfig;
pub use server::{ControlPlane, Cp};
