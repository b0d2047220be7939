//! `wrenn-bench`: parse the command line, then hand over to [`wrenn_bench::run`].

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _, Result};
use clap::{Parser, Subcommand};
use wrenn_bench::{Bench, Config, Sizes};

/// Benchmarks of envd against baselines measured in the same run.
///
/// Prints one JSON line per benchmark as it finishes, then a table of all
/// results and of the ratios checked against the goals.
#[derive(Debug, Parser)]
#[command(name = "wrenn-bench")]
struct Cli {
    #[command(subcommand)]
    bench: Option<Which>,
    /// Shrink everything (20 execs, 16 MiB files, 20 keystrokes, 1 run) so all
    /// four finish in seconds; explicit sizes below still win.
    #[arg(long, global = true)]
    smoke: bool,
    /// The envd binary [default: `envd` next to this executable].
    #[arg(long, global = true, env = "WRENN_BENCH_ENVD")]
    envd: Option<PathBuf>,
    /// Parent of the temporary directory for data files [default: $TMPDIR or /tmp].
    #[arg(long, global = true)]
    tmp_dir: Option<PathBuf>,
    /// exec: measured execs of each kind [full: 1000].
    #[arg(long, global = true)]
    execs: Option<usize>,
    /// stream: size of the file cat streams, in MiB [full: 1024].
    #[arg(long, global = true)]
    stream_mib: Option<u64>,
    /// files: bytes uploaded and downloaded, in MiB [full: 1024].
    #[arg(long, global = true)]
    files_mib: Option<u64>,
    /// pty: measured keystrokes on each PTY [full: 500].
    #[arg(long, global = true)]
    keystrokes: Option<usize>,
    /// stream, files: runs of each throughput measurement (medians reported) [full: 5].
    #[arg(long, global = true)]
    reps: Option<usize>,
    /// Also append the JSON lines to this file.
    #[arg(long, global = true)]
    json_out: Option<PathBuf>,
    /// Exit with status 2 when a goal is not met (default: report only).
    #[arg(long, global = true)]
    check_goals: bool,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Which {
    /// All four benchmarks (the default).
    All,
    /// exec round trip of /bin/true vs fork+exec+wait.
    Exec,
    /// cat of a large file through envd vs cat > /dev/null.
    Stream,
    /// /files upload and download vs loopback TCP.
    Files,
    /// PTY keystroke -> echo latency vs a local openpty.
    Pty,
}

impl Cli {
    fn config(&self) -> Result<Config> {
        let benches = match self.bench.unwrap_or(Which::All) {
            Which::All => Bench::ALL.to_vec(),
            Which::Exec => vec![Bench::Exec],
            Which::Stream => vec![Bench::Stream],
            Which::Files => vec![Bench::Files],
            Which::Pty => vec![Bench::Pty],
        };
        let mut sizes = if self.smoke {
            Sizes::smoke()
        } else {
            Sizes::full()
        };
        sizes.execs = self.execs.unwrap_or(sizes.execs);
        sizes.stream_bytes = self.stream_mib.map_or(sizes.stream_bytes, |m| m << 20);
        sizes.files_bytes = self.files_mib.map_or(sizes.files_bytes, |m| m << 20);
        sizes.keystrokes = self.keystrokes.unwrap_or(sizes.keystrokes);
        sizes.reps = self.reps.unwrap_or(sizes.reps);
        if sizes.execs == 0
            || sizes.stream_bytes == 0
            || sizes.files_bytes == 0
            || sizes.keystrokes == 0
            || sizes.reps == 0
        {
            return Err(anyhow!("sizes, iterations and reps must be positive"));
        }
        let envd_bin = match &self.envd {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locate wrenn-bench")?
                .with_file_name("envd"),
        };
        if !envd_bin.is_file() {
            return Err(anyhow!(
                "no envd binary at {} (build it with `cargo build --release -p envd`, \
                 or pass --envd)",
                envd_bin.display()
            ));
        }
        Ok(Config {
            benches,
            sizes,
            smoke: self.smoke,
            envd_bin,
            tmp_parent: self.tmp_dir.clone().unwrap_or_else(std::env::temp_dir),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(&cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("wrenn-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: &Cli) -> Result<ExitCode> {
    let config = cli.config()?;
    let mut json_out = match &cli.json_out {
        Some(path) => Some(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let smoke = config.smoke;
    let mut write_error = None;
    let on_result = |outcome: &wrenn_bench::Outcome| {
        let line = outcome.json(smoke).to_string();
        println!("{line}");
        if let Some(file) = json_out.as_mut() {
            if let Err(e) = writeln!(file, "{line}") {
                write_error.get_or_insert(e);
            }
        }
    };
    // Ctrl-C or SIGTERM drops the run future, whose guards kill envd and
    // remove the temp dir.
    let outcomes = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("watch for SIGTERM")?;
        tokio::select! {
            result = wrenn_bench::run(&config, on_result) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted by SIGINT")),
            _ = term.recv() => Err(anyhow!("interrupted by SIGTERM")),
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("write the JSON lines");
    }
    println!();
    print!("{}", wrenn_bench::table(&outcomes));
    let missed = outcomes
        .iter()
        .flat_map(|o| &o.checks)
        .any(|c| c.met() == Some(false));
    Ok(if cli.check_goals && missed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
