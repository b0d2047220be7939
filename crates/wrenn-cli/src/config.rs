//! Where the server is and which key to use, and `wrenn login`.
//!
//! Order: flags, then `WRENN_BASE_URL` / `WRENN_API_KEY`, then the config
//! file (`$WRENN_CONFIG`, else `$XDG_CONFIG_HOME/wrenn/config.json`, else
//! `~/.config/wrenn/config.json`; JSON `{"base_url", "api_key"}`, 0600),
//! then `http://127.0.0.1:8000` for the URL. There is no default key.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use wrenn_sdk::{Client, API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL};

/// Options every client subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The control plane [env: WRENN_BASE_URL; else `wrenn login`'s; else http://127.0.0.1:8000].
    #[arg(long, global = true)]
    pub base_url: Option<String>,
    /// An API key of your team [env: WRENN_API_KEY; else `wrenn login`'s].
    #[arg(long, global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Saved {
    base_url: Option<String>,
    api_key: Option<String>,
}

pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WRENN_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(dir.join("wrenn").join("config.json"))
}

fn saved() -> Saved {
    config_path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Global {
    pub fn base_url(&self) -> String {
        self.base_url_from(&saved())
    }

    fn base_url_from(&self, saved: &Saved) -> String {
        self.base_url
            .clone()
            .or_else(|| env(BASE_URL_ENV))
            .or_else(|| saved.base_url.clone())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned())
    }

    /// A client, or an error saying how to give a key.
    pub fn client(&self) -> Result<Client> {
        let saved = saved();
        let key = self
            .api_key
            .clone()
            .or_else(|| env(API_KEY_ENV))
            .or_else(|| saved.api_key.clone());
        let Some(key) = key else {
            bail!(
                "no API key: pass --api-key, set {API_KEY_ENV}, or run `wrenn login` \
                 (`wrenn up` writes the admin key to /var/lib/wrenn/admin-api-key)"
            );
        };
        Ok(Client::new(&self.base_url_from(&saved), key.trim())?)
    }
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The key to save [default: read from stdin].
    #[arg(long = "key")]
    key: Option<String>,
}

/// Check the key against the server, then save both.
pub async fn login(g: &Global, a: LoginArgs) -> Result<i32> {
    let key = match a.key.or_else(|| g.api_key.clone()) {
        Some(k) => k,
        None => {
            if std::io::stdin().is_terminal() {
                eprint!("API key: ");
            }
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("read the key from stdin")?;
            line.trim().to_owned()
        }
    };
    if key.is_empty() {
        bail!("no key given (pass --key or type it on stdin)");
    }
    let base = g.base_url();
    let client = Client::new(&base, &key)?;
    client.capsules().await?;
    let path = config_path().context("no config directory: set HOME or WRENN_CONFIG")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let body = json!({"base_url": base, "api_key": key}).to_string();
    wrenn_agent::register::write_private(&path, &format!("{body}\n"))
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("logged in to {base}; saved in {}", path.display());
    Ok(0)
}
