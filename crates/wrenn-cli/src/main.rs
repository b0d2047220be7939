//! `wrenn`: the command line. `wrenn up` runs the control plane and a host
//! agent in one process on one machine; every other subcommand is a client
//! of a control plane's `/v1` API through `wrenn-sdk`.
//!
//! Where the server is and which key to use: `--base-url` / `--api-key`,
//! else `WRENN_BASE_URL` / `WRENN_API_KEY` (the Python SDK's names), else
//! the file `wrenn login` writes ([`config`]). Listings print tables, or
//! JSON with `--json`. Failures print one line saying what went wrong and
//! what to do, and exit 1 (`wrenn exec` exits with the command's code).

mod capsules;
mod config;
mod cp;
mod exec;
mod keys;
mod output;
mod shell;
mod template;
mod up;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: isolated capsules for untrusted code"
)]
struct Cli {
    #[command(flatten)]
    global: config::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane and an agent on this machine.
    Up(Box<up::UpArgs>),
    /// Save the server and API key for later commands.
    Login(config::LoginArgs),
    /// List capsules.
    Ls,
    /// Create a capsule and print its ID.
    Create(capsules::CreateArgs),
    /// Run a command in a capsule, streaming its output; exits with its code.
    Exec(exec::ExecArgs),
    /// An interactive terminal in a capsule (detach: ctrl-p ctrl-q).
    Shell(shell::ShellArgs),
    /// Copy files and directories between here and a capsule (`ID:/path`).
    Cp(cp::CpArgs),
    /// Follow the output of a process in a capsule (its start command by default).
    Logs(capsules::LogsArgs),
    /// Pause capsules (memory kept).
    Pause(capsules::IdsArgs),
    /// Resume paused capsules.
    Resume(capsules::IdsArgs),
    /// Destroy capsules.
    Kill(capsules::IdsArgs),
    /// The URL of a port in a capsule.
    Url(capsules::UrlArgs),
    /// Save a capsule as a template of your team.
    Snapshot(capsules::SnapshotArgs),
    /// Templates: list, build from a recipe, remove.
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// API keys of your team.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Hosts (agents) of the control plane.
    #[command(subcommand)]
    Hosts(keys::HostsCmd),
    /// Print a shell completion script (bash, zsh, fish, …).
    Completions { shell: clap_complete::Shell },
}

// mimalloc: the proxy's and the RPC's many small short-lived allocations
// (headers, frames, buffers) cost less than with glibc's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let code = rt.block_on(run(cli));
    // stdin may still be read by a blocking thread (`wrenn shell`)
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let g = cli.global;
    let result = match cli.command {
        Command::Up(args) => return up::run(*args).await,
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "wrenn", &mut std::io::stdout());
            return 0;
        }
        Command::Login(a) => config::login(&g, a).await,
        Command::Ls => capsules::ls(&g).await,
        Command::Create(a) => capsules::create(&g, a).await,
        Command::Exec(a) => exec::run(&g, a).await,
        Command::Shell(a) => shell::run(&g, a).await,
        Command::Cp(a) => cp::run(&g, a).await,
        Command::Logs(a) => capsules::logs(&g, a).await,
        Command::Pause(a) => capsules::each(&g, a, capsules::Op::Pause).await,
        Command::Resume(a) => capsules::each(&g, a, capsules::Op::Resume).await,
        Command::Kill(a) => capsules::each(&g, a, capsules::Op::Kill).await,
        Command::Url(a) => capsules::url(&g, a).await,
        Command::Snapshot(a) => capsules::snapshot(&g, a).await,
        Command::Template(c) => template::run(&g, c).await,
        Command::Keys(c) => keys::run(&g, c).await,
        Command::Hosts(c) => keys::hosts(&g, c).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wrenn: {}", output::explain(&e));
            1
        }
    }
}
