//! `wrenn-agent`: parse the configuration, open the capsule manager, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wrenn_agent::template::RuntimeChoice;
use wrenn_agent::{Agent, AgentConfig};

/// The Wrenn host agent: owns the capsules of this host.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the RPC and port-proxy listener.
    #[arg(long, env = "WRENN_AGENT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Templates, capsules and their records.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    /// The static envd binary bind-mounted into capsules.
    #[arg(
        long,
        env = "WRENN_ENVD_BIN",
        default_value = "/usr/local/lib/wrenn/envd"
    )]
    envd: PathBuf,
    /// OCI runtime binary (runc, crun, runsc, youki…).
    #[arg(long, env = "WRENN_RUNTIME", default_value = "runc")]
    runtime: String,
    /// Extra global flag for the runtime (repeatable), e.g. `--platform=ptrace` for runsc.
    #[arg(long = "runtime-arg", allow_hyphen_values = true)]
    runtime_args: Vec<String>,
    /// Prefix of host object names (netns, veth, nft table, cgroups); 1-8 of [a-z0-9].
    #[arg(long, env = "WRENN_INSTANCE", default_value = "wrenn")]
    instance: String,
    /// Capsule address pool; each capsule takes a /30.
    #[arg(long, env = "WRENN_POOL", default_value = "10.88.0.0/16")]
    pool: ipnet::Ipv4Net,
    /// Static busybox the `busybox` template is built from.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Keep SIZE capsules of TEMPLATE booted in advance (repeatable), e.g. `busybox=4`.
    #[arg(long = "warm", value_name = "TEMPLATE=SIZE")]
    warm: Vec<wrenn_agent::config::WarmPool>,
    /// Network slots kept set up ahead of creates.
    #[arg(long, default_value_t = 4)]
    net_pool: usize,
    /// How often expired capsules are looked for.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    reaper_interval: Duration,
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
    let mut cfg = AgentConfig::new(args.data_dir, args.envd).with_instance(&args.instance);
    cfg.runtime = RuntimeChoice {
        binary: args.runtime,
        args: args.runtime_args,
    };
    cfg.network.pool = args.pool;
    cfg.busybox_bin = args.busybox;
    cfg.reaper_interval = args.reaper_interval;
    cfg.warm_pools = args.warm;
    cfg.net_pool = args.net_pool;
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
