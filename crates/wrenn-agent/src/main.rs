//! `wrenn-agent`: parse the configuration, open the capsule manager, serve.

use std::net::SocketAddr;

use clap::Parser;
use wrenn_agent::cli::AgentArgs;
use wrenn_agent::Agent;

/// The Wrenn host agent: owns the capsules of this host.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the RPC and port-proxy listener.
    #[arg(long, env = "WRENN_AGENT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    agent: AgentArgs,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = args.agent.config();
    let agent = match Agent::open(cfg).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wrenn-agent: {e}");
            std::process::exit(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wrenn-agent: listen on {}: {e}", args.listen);
            std::process::exit(69);
        }
    };
    let addr = listener.local_addr().expect("bound");
    println!("wrenn-agent listening on {addr}");
    if let Err(e) = wrenn_agent::server::run(agent, listener, shutdown()).await {
        eprintln!("wrenn-agent: {e}");
        std::process::exit(1);
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
