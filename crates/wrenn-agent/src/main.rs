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
    /// A control plane to register with and heartbeat to (`http://host:port`).
    #[arg(long, env = "WRENN_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// One-time token from `POST /v1/hosts` (first start only).
    #[arg(long, env = "WRENN_REGISTRATION_TOKEN")]
    registration_token: Option<String>,
    /// How often the control plane hears from this agent (tests shorten it).
    #[arg(long, hide = true, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat_interval: std::time::Duration,
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
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = wrenn_agent::server::AgentServer::new(agent.clone());
    if args.control_plane.is_some() {
        // a control plane's agent never serves plain HTTP
        server.tls().require();
    }
    match wrenn_agent::register::restore_tls(&args.agent.data_dir, server.tls()) {
        Ok(true) => println!("wrenn-agent serves mutual TLS (certificate from host.json)"),
        Ok(false) => {}
        Err(e) => {
            eprintln!("wrenn-agent: the certificate in host.json: {e}");
            std::process::exit(78);
        }
    }
    // cancelled when the control plane says this host was deleted
    let deleted = tokio_util::sync::CancellationToken::new();
    let joined = args.control_plane.clone().map(|cp| {
        let facts = wrenn_agent::register::host_facts(&args.agent.data_dir, addr, agent.token());
        let membership = wrenn_agent::register::Membership {
            control_plane: cp,
            registration_token: args.registration_token.clone(),
            data_dir: args.agent.data_dir.clone(),
            facts,
            tls: server.tls().clone(),
            every: args.heartbeat_interval,
            auto_pauses: Some(agent.subscribe_auto_pauses()),
        };
        let heartbeats = wrenn_agent::register::run(membership, async {
            let _ = stop_rx.await;
        });
        let deleted = deleted.clone();
        tokio::spawn(async move {
            if heartbeats.await == wrenn_agent::register::Ended::Deleted {
                deleted.cancel();
            }
        })
    });
    let served = server
        .run(listener, async {
            tokio::select! {
                () = shutdown() => {}
                () = deleted.cancelled() => {}
            }
        })
        .await;
    let _ = stop_tx.send(());
    if let Some(j) = joined {
        let _ = j.await;
    }
    if deleted.is_cancelled() {
        // Its capsules are the control plane's no more: none may outlive
        // it. Its registration goes too (a restart needs a new token).
        eprintln!("wrenn-agent: the control plane deleted this host; destroying its capsules");
        agent.destroy_all().await;
        let _ = std::fs::remove_file(args.agent.data_dir.join("host.json"));
        return;
    }
    if let Err(e) = served {
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
