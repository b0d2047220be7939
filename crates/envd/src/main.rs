//! `envd`: parse the command line, then hand over to [`envd::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = envd::Config::parse();
    match envd::main(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("envd: {err:#}");
            // 64 = EX_USAGE: bad configuration fails fast and says so.
            std::process::ExitCode::from(if err.is::<envd::ConfigError>() { 64 } else { 1 })
        }
    }
}
