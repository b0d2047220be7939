//! envd, the daemon inside every capsule.
//!
//! It serves E2B's envd protocol on one port: Connect RPC services
//! `process.Process` and `filesystem.Filesystem` plus plain-HTTP endpoints
//! (`/health`, `/init`, `/files`, `/envs`, `/metrics`, `/snapshot/prepare`).
//! As PID 1 it also mounts what a bare rootfs lacks, reaps zombies and
//! forwards SIGTERM; with `--dev` it is an ordinary process on a host.
//!
//! Layout: [`state`] owns everything mutable (defaults, token, process table,
//! watchers); [`process`] and [`fs`] are the domain logic and know nothing of
//! the wire; [`rpc`] and [`http`] translate the wire into calls on them, and
//! map domain errors to wire errors once, at that edge.

pub mod auth;
pub mod config;
pub mod fs;
pub mod http;
pub mod init;
pub mod metrics;
pub mod paths;
pub mod portfwd;
pub mod process;
pub mod reaper;
pub mod rpc;
pub mod state;
pub mod users;

use std::future::Future;
use std::sync::Arc;

pub use config::{Config, ConfigError};
use tokio::net::TcpListener;

/// The version envd reports on `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Entry point of the binary: PID-1 duties, runtime, listener, signals.
pub fn main(config: Config) -> anyhow::Result<()> {
    let config = config.validate()?;
    init_tracing();
    let pid1 = !config.dev && std::process::id() == 1;
    // Workloads start at envd's nice value as it is now, whatever priority
    // envd is given later (by itself below, or by the agent).
    process::set_workload_nice(wrenn_http::thread_nice(0));
    if pid1 {
        init::prepare_rootfs();
        // Before any thread starts: threads take their starter's nice value.
        init::raise_priority();
    }
    init::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((config.listen_addr(), config.port)).await?;
        let addr = listener.local_addr()?;
        // Tests and the agent read this line to learn the port.
        println!("envd listening on {addr}");
        let shutdown = init::shutdown_signal(pid1);
        run(config, listener, shutdown).await
    })
}

/// Serve envd on `listener` until `shutdown` resolves. Tests call this too.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let reaper = reaper::Reaper::start()?;
    let state = Arc::new(state::Envd::new(config, reaper)?);
    state.start_background();
    if let Some(cmd) = state.config.cmd.clone() {
        state.spawn_init_cmd(&cmd);
    }
    let router = http::router(state.clone());
    let result = wrenn_http::serve(listener, router, Default::default(), shutdown).await;
    state.shutdown().await;
    result?;
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ENVD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
