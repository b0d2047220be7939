//! Types shared by Wrenn's components.
//!
//! Only plain data lives here (no I/O, no async): the JSON bodies of envd's
//! HTTP endpoints, the signed-URL scheme both envd and its clients compute,
//! protocol constants, typed IDs, proxy paths and template recipes. Each component maps these to its own errors.

pub mod envd;
pub mod hosts;
pub mod ids;
pub mod proxy;
pub mod recipe;
