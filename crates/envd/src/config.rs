//! Command-line configuration, validated once at start.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// envd's command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "envd", version, about = "Wrenn's in-capsule daemon")]
pub struct Config {
    /// Port for RPC and HTTP.
    #[arg(long, default_value_t = wrenn_types::envd::ENVD_PORT)]
    pub port: u16,
    /// Address to listen on [default: 0.0.0.0 in a capsule, 127.0.0.1 with
    /// `--dev`, where envd runs unauthenticated on a host].
    #[arg(long)]
    pub addr: Option<IpAddr>,
    /// Run as an ordinary process on a host: no mounts, no init duties, no
    /// port forwarding unless `--port-forward on`.
    #[arg(long)]
    pub dev: bool,
    /// Forward services bound to 127.0.0.1/::1 to the capsule's external
    /// addresses: `auto` = on unless `--dev`.
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    pub port_forward: Toggle,
    /// The user processes and files default to (until `/init` changes it).
    #[arg(long)]
    pub default_user: Option<String>,
    /// Where `/init` writes metadata files.
    #[arg(long, default_value = "/run/wrenn")]
    pub run_dir: PathBuf,
    /// Largest accepted upload, in bytes.
    #[arg(long, default_value_t = 64 << 30)]
    pub max_upload_bytes: u64,
    /// A command started at boot with tag `init-cmd` (a template's start command).
    #[arg(long)]
    pub cmd: Option<String>,
    /// Root the `/etc/passwd` and `/etc/group` lookups read from.
    #[arg(long, default_value = "/", hide = true)]
    pub accounts_root: PathBuf,
}

/// An on/off/auto switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-upload-bytes must be positive")]
    ZeroUpload,
    #[error("--cmd must not be empty")]
    EmptyCmd,
}

impl Config {
    /// Check what clap cannot.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.max_upload_bytes == 0 {
            return Err(ConfigError::ZeroUpload);
        }
        if self.cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(ConfigError::EmptyCmd);
        }
        Ok(self)
    }

    /// The address to listen on.
    pub fn listen_addr(&self) -> IpAddr {
        self.addr.unwrap_or(if self.dev {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0, 0, 0, 0])
        })
    }

    /// Whether the localhost port forwarder runs.
    pub fn forward_ports(&self) -> bool {
        match self.port_forward {
            Toggle::On => true,
            Toggle::Off => false,
            Toggle::Auto => !self.dev,
        }
    }
}
