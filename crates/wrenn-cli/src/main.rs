//! `wrenn`: the command line. `wrenn up` runs the control plane and a host
//! agent in one process on one machine; the agent is reached over the
//! same RPC a remote agent is, and registers through the same path.

mod template;
mod up;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: isolated capsules for untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane and an agent on this machine.
    Up(up::UpArgs),
    /// Templates.
    #[command(subcommand)]
    Template(template::TemplateCmd),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match cli.command {
        Command::Up(args) => rt.block_on(up::run(args)),
        Command::Template(cmd) => rt.block_on(template::run(cmd)),
    };
    std::process::exit(code);
}
