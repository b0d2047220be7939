//! Everything envd holds that changes at run time, in one place.
//!
//! Defaults (user, workdir, env) and the access token sit behind `RwLock`s
//! that are never held across an await; `/init` replaces them atomically.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use subtle::ConstantTimeEq;
use wrenn_types::envd::InitRequest;

use crate::config::Config;
use crate::fs::watch::Watchers;
use crate::metrics::Sampler;
use crate::portfwd::Forwarder;
use crate::process::{ProcessSpec, ProcessTable, RequestedConfig};
use crate::reaper::Reaper;
use crate::users::{Accounts, User, UserError};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Per-capsule defaults that `/init` sets.
#[derive(Debug, Clone)]
struct Defaults {
    user: String,
    workdir: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

/// Why `/init` was refused.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error("invalid metadata key '{0}': use letters, digits and '_'")]
    MetadataKey(String),
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's state.
pub struct Envd {
    pub config: Config,
    pub processes: Arc<ProcessTable>,
    pub watchers: Watchers,
    pub metrics: Sampler,
    pub forwarder: Forwarder,
    reaper: Reaper,
    defaults: RwLock<Defaults>,
    token: RwLock<Option<String>>,
    last_init: Mutex<Option<i64>>,
    path_env: String,
}

impl std::fmt::Debug for Envd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envd").finish_non_exhaustive()
    }
}

impl Envd {
    pub fn new(config: Config, reaper: Reaper) -> anyhow::Result<Self> {
        let accounts = Accounts::load(&config.accounts_root)?;
        let user = match &config.default_user {
            Some(name) => accounts.user(name)?.name,
            None => {
                // SAFETY: geteuid has no preconditions.
                let euid = unsafe { libc::geteuid() };
                accounts
                    .by_uid(euid)
                    .map_or_else(|| "root".into(), |u| u.name.clone())
            }
        };
        let mut env = BTreeMap::new();
        let in_capsule = (!config.dev).to_string();
        env.insert("WRENN_SANDBOX".into(), in_capsule.clone());
        env.insert("E2B_SANDBOX".into(), in_capsule);
        Ok(Self {
            processes: Arc::new(ProcessTable::new(reaper.clone())),
            watchers: Watchers::default(),
            metrics: Sampler::new(),
            forwarder: Forwarder::new(config.forward_ports()),
            reaper,
            defaults: RwLock::new(Defaults {
                user,
                workdir: None,
                env,
            }),
            token: RwLock::new(None),
            last_init: Mutex::new(None),
            path_env: std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
            config,
        })
    }

    /// The account databases as they are now.
    pub fn accounts(&self) -> Result<Accounts, UserError> {
        Accounts::load(&self.config.accounts_root)
    }

    /// The user called `name`, or the default user.
    pub fn user(&self, accounts: &Accounts, name: Option<&str>) -> Result<User, UserError> {
        match name {
            Some(n) if !n.is_empty() => accounts.user(n),
            _ => accounts.user(&self.read_defaults().user),
        }
    }

    fn read_defaults(&self) -> std::sync::RwLockReadGuard<'_, Defaults> {
        self.defaults.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The default env map (what `GET /envs` shows).
    pub fn default_env(&self) -> BTreeMap<String, String> {
        self.read_defaults().env.clone()
    }

    /// The cwd a process of `user` gets when it names none: the
    /// template's workdir, else the user's home, else (a home that does
    /// not exist, as `nobody`'s `/nonexistent`) `/`.
    pub fn default_cwd(&self, user: &User) -> PathBuf {
        match self.read_defaults().workdir.clone() {
            Some(w) => w,
            None if user.home.is_dir() => user.home.clone(),
            None => PathBuf::from("/"),
        }
    }

    /// The environment of a new process: `PATH`, `HOME`, `USER`, `LOGNAME`,
    /// then the capsule's defaults, then the request's own, later ones winning.
    pub fn process_env(
        &self,
        user: &User,
        requested: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), self.path_env.clone()),
            ("HOME".into(), user.home.to_string_lossy().into_owned()),
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
        ];
        for (k, v) in self.read_defaults().env.iter().chain(requested) {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// Whether `presented` is the access token (always true while none is set).
    pub fn token_ok(&self, presented: Option<&[u8]>) -> bool {
        match &*self.token.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(token) => presented.is_some_and(|p| bool::from(p.ct_eq(token.as_bytes()))),
        }
    }

    /// The access token, if one is set.
    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Apply `/init`. Returns false when the request was older than the last
    /// one applied and was ignored.
    pub fn apply_init(&self, req: InitRequest) -> Result<bool, InitError> {
        // Validate everything before changing anything: a refused /init
        // leaves no trace.
        let accounts = self.accounts()?;
        let user = req
            .default_user
            .as_deref()
            .map(|u| accounts.user(u))
            .transpose()?;
        let mut metadata = Vec::new();
        for (key, value) in req.metadata.iter().flatten() {
            let suffix = env_suffix(key).ok_or_else(|| InitError::MetadataKey(key.clone()))?;
            metadata.push((suffix, value.clone()));
        }
        if let Some(ts) = req.timestamp.as_deref().and_then(parse_timestamp) {
            let mut last = self.last_init.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|l| ts < l) {
                return Ok(false);
            }
            *last = Some(ts);
            if !self.config.dev {
                catch_up_clock(ts);
            }
        }
        for (suffix, value) in &metadata {
            self.write_run_file(&format!(".WRENN_{suffix}"), value)?;
        }
        {
            let mut d = self.defaults.write().unwrap_or_else(|p| p.into_inner());
            if let Some(u) = user {
                d.user = u.name;
            }
            if let Some(w) = req.default_workdir.filter(|w| !w.is_empty()) {
                d.workdir = Some(PathBuf::from(w));
            }
            d.env.extend(req.env_vars.into_iter().flatten());
            for (suffix, value) in metadata {
                for prefix in ["WRENN_", "E2B_"] {
                    d.env.insert(format!("{prefix}{suffix}"), value.clone());
                }
            }
        }
        if let Some(token) = req.access_token {
            *self.token.write().unwrap_or_else(|p| p.into_inner()) =
                (!token.is_empty()).then_some(token);
        }
        self.forwarder.resume();
        self.metrics.resume();
        Ok(true)
    }

    fn write_run_file(&self, name: &str, value: &str) -> Result<(), InitError> {
        let dir = &self.config.run_dir;
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, value))
            .map_err(|source| InitError::Write { path, source })
    }

    /// `/snapshot/prepare`: stop background work that must not run across a
    /// snapshot; `/init` restarts it.
    pub fn prepare_snapshot(&self) {
        self.forwarder.pause();
        self.metrics.pause();
    }

    /// Start the background tasks (metrics sampler, port forwarder).
    pub fn start_background(self: &Arc<Self>) {
        // (spec §7.1; not in `--dev`, where the run dir is the host's)
        if !self.config.dev {
            if let Err(e) = self.write_run_file(".WRENN_SANDBOX", "true") {
                tracing::warn!(error = %e, "cannot write the sandbox marker");
            }
        }
        self.metrics.start();
        self.forwarder.start();
    }

    /// Start the template's start command, tagged `init-cmd`, as the default user.
    pub fn spawn_init_cmd(self: &Arc<Self>, cmd: &str) {
        let state = self.clone();
        let cmd = cmd.to_string();
        tokio::spawn(async move {
            let result = async {
                let accounts = state.accounts()?;
                let user = state.user(&accounts, None)?;
                let spec = ProcessSpec {
                    cmd: "/bin/sh".into(),
                    args: vec!["-c".into(), cmd.clone()],
                    env: state.process_env(&user, &BTreeMap::new()),
                    cwd: state.default_cwd(&user),
                    user,
                    tag: Some("init-cmd".into()),
                    pty: None,
                    stdin: false,
                    deadline: None,
                    config: RequestedConfig {
                        cmd: "/bin/sh".into(),
                        args: vec!["-c".into(), cmd],
                        ..Default::default()
                    },
                };
                state.processes.start(spec).await?;
                anyhow::Ok(())
            };
            if let Err(err) = result.await {
                tracing::error!(%err, "cannot start the init command");
            }
        });
    }

    /// Stop everything envd started.
    pub async fn shutdown(&self) {
        self.forwarder.stop().await;
        self.metrics.stop();
        self.watchers.clear();
        self.processes.shutdown().await;
        self.reaper.stop();
    }
}

/// `sandboxId` → `SANDBOX_ID`; `None` for keys that are not identifiers.
fn env_suffix(key: &str) -> Option<String> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let mut out = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    Some(out)
}

/// Move the system clock forward to `ts` (unix seconds) when it is behind
/// by more than a second: a microVM restored from a snapshot wakes up with
/// the time it was paused at. Never moves the clock back. Where the capsule
/// may not set the clock (an OCI capsule shares the host's), nothing happens.
fn catch_up_clock(ts: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if ts <= now + 1 {
        return;
    }
    let t = libc::timespec {
        tv_sec: ts as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec; the call has no other preconditions.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &t) };
    if rc == 0 {
        tracing::info!(behind_s = ts - now, "clock moved forward by /init");
    } else {
        tracing::debug!(err = %std::io::Error::last_os_error(), "cannot set the clock");
    }
}

/// Unix seconds, or RFC 3339.
fn parse_timestamp(s: &str) -> Option<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keys_become_env_names() {
        assert_eq!(env_suffix("sandboxId").as_deref(), Some("SANDBOX_ID"));
        assert_eq!(env_suffix("templateID").as_deref(), Some("TEMPLATE_ID"));
        assert_eq!(env_suffix("../x"), None);
        assert_eq!(env_suffix(""), None);
    }

    #[test]
    fn timestamps_parse_both_ways() {
        assert_eq!(parse_timestamp("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_timestamp("yesterday"), None);
    }
}
