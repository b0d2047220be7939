//! `wrenn up`: control plane + agent on one machine.
//!
//! 1. The agent opens its data dir (re-adopting capsules from an earlier
//!    run) and serves its RPC on a loopback port.
//! 2. The control plane opens its database (SQLite under the data dir
//!    unless `--database-url` says otherwise) and registers the agent as a
//!    host through the registration path a remote agent uses; the host's
//!    ID is kept in `<data-dir>/host-id` so a restart updates the same host.
//! 3. First start: an admin team with a wrenn key and an E2B key, written
//!    to `<data-dir>/admin-api-key` and `admin-e2b-api-key` (0600).
//! 4. Templates: `busybox` is there at once; `minimal` (debootstrap) is
//!    built in the background with a progress bar; `/health` answers 503
//!    with the build's progress until it can be used.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use wrenn_agent::cli::AgentArgs;
use wrenn_agent::register::write_private;
use wrenn_agent::template::{self, TemplateStore};
use wrenn_agent::Agent;
use wrenn_cp::api::hosts::{adopt_cert, certify, issue_registration, register_host};
use wrenn_cp::api::keys::new_team;
use wrenn_cp::auth::{create_key, KeyKind};
use wrenn_cp::db::{platform_team, HostRegistration, TemplateRow};
use wrenn_cp::{ControlPlane, Cp, CpConfig};
use wrenn_types::ids::HostId;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the API (and of the subdomain proxy).
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://…`; default SQLite under the data dir.
    #[arg(long, env = "WRENN_DATABASE_URL")]
    database_url: Option<String>,
    /// Where the agent's RPC listens (loopback; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    agent_listen: SocketAddr,
    /// Do not build the `code-runner-beta` template (Jupyter; needs PyPI).
    #[arg(long)]
    no_code_runner: bool,
    /// Do not build the `code-interpreter-v1` template (E2B's code
    /// interpreter; needs PyPI).
    #[arg(long)]
    no_code_interpreter: bool,
    /// Benchmarks only: proxy over the agent's RPC connection (one shared
    /// HTTP/2 client for both traffic classes, the seed system's bug).
    #[arg(long, hide = true)]
    shared_transport: bool,
    /// Domain of subdomain proxy URLs (`{port}-{capsule}.{domain}`).
    #[arg(long, env = "WRENN_PROXY_DOMAIN")]
    proxy_domain: Option<String>,
    /// Serve E2B's debug mode (`E2B_DEBUG=true`): sandbox
    /// `debug_sandbox_id`, asked for from loopback with no key, is a `base`
    /// capsule of the admin team. Only where nothing proxies to this port
    /// from the same host (to the server, every such client is loopback).
    #[arg(long, env = "WRENN_E2B_DEBUG")]
    e2b_debug: bool,
    /// How often this process's agent tells the control plane it lives
    /// (a call over its RPC, as a remote agent's heartbeat).
    #[arg(long, hide = true, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat_interval: std::time::Duration,
    /// How often the database is compared with what the agents report.
    #[arg(long, hide = true, default_value = "30s", value_parser = humantime::parse_duration)]
    reconcile_interval: std::time::Duration,
    /// How old unrecorded snapshot layers on a host must be before the
    /// reconciler deletes them (tests shorten it).
    #[arg(long, hide = true, default_value = "15m", value_parser = humantime::parse_duration)]
    orphan_layer_grace: std::time::Duration,
    /// How long a host may go without a heartbeat before it is
    /// `unreachable` and its capsules `missing` (tests shorten it).
    #[arg(long, hide = true, default_value = "90s", value_parser = humantime::parse_duration)]
    host_heartbeat_timeout: std::time::Duration,
    /// How often the control plane looks for silent hosts.
    #[arg(long, hide = true, default_value = "15s", value_parser = humantime::parse_duration)]
    host_monitor_interval: std::time::Duration,
    #[command(flatten)]
    agent: AgentArgs,
}

pub async fn run(args: UpArgs) -> i32 {
    match up(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wrenn up: {e:#}");
            1
        }
    }
}

/// Register this process's agent (or update the host it registered before)
/// and have it serve mutual TLS with a certificate for its address, as a
/// remote agent does.
async fn register_agent(
    cp: &Cp,
    data_dir: &Path,
    facts: &HostRegistration,
    tls: &wrenn_http::tls::TlsSlot,
) -> Result<HostId> {
    let id_file = data_dir.join("host-id");
    let known = match std::fs::read_to_string(&id_file) {
        Ok(id) => match id.trim().parse::<HostId>() {
            Ok(id) => cp.db.update_host(&id, facts).await?,
            Err(_) => None,
        },
        Err(_) => None,
    };
    let host = match known {
        Some(host) => host,
        None => {
            let (_, token) = issue_registration(cp)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let registered = register_host(cp, &token, facts)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            std::fs::write(&id_file, registered.host.id.as_str())?;
            registered.host
        }
    };
    install_cert(cp, &host, tls).await?;
    cp.hosts.connect(&host).map_err(anyhow::Error::msg)?;
    Ok(host.id)
}

/// Give the agent a new certificate for `host`; once it serves that one,
/// the one before is revoked.
async fn install_cert(
    cp: &Cp,
    host: &wrenn_cp::db::Host,
    tls: &wrenn_http::tls::TlsSlot,
) -> Result<()> {
    let cert = certify(cp, host).map_err(|e| anyhow::anyhow!(e.message))?;
    let files = wrenn_agent::register::TlsFiles {
        cert_pem: cert.identity.cert_pem.clone(),
        key_pem: cert.identity.key_pem.clone(),
        ca_cert_pem: cert.ca_cert_pem.clone(),
    };
    wrenn_agent::register::install_tls(tls, &files).map_err(anyhow::Error::msg)?;
    adopt_cert(cp, &host.id, &cert)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))
}

/// How often `wrenn up` renews its own agent's certificate, well inside
/// the certificate's life ([`wrenn_cp::pki::HOST_VALIDITY_DAYS`]), as a
/// remote agent's refresh does.
const RECERTIFY_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Renew the local agent's certificate every [`RECERTIFY_EVERY`] until
/// the control plane stops.
fn recertify(cp: Arc<Cp>, host: HostId, tls: wrenn_http::tls::TlsSlot) {
    let stop = cp.stop.clone();
    cp.tasks.clone().spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RECERTIFY_EVERY) => {}
                () = stop.cancelled() => return,
            }
            let renewed = match cp.db.host(&host).await {
                Ok(Some(h)) => install_cert(&cp, &h, &tls).await,
                Ok(None) => Err(anyhow::anyhow!("the host is gone")),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = renewed {
                tracing::error!(error = %e, "cannot renew the agent's certificate");
            }
        }
    });
}

/// The admin team and its keys, made on first start.
async fn admin_keys(cp: &Cp, data_dir: &Path) -> Result<bool> {
    if cp.db.admin_team().await?.is_some() && data_dir.join("admin-api-key").exists() {
        return Ok(false);
    }
    let (team, key) = new_team(cp, "admin", true)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let (_, e2b) = create_key(&cp.db, &team.id, "e2b", KeyKind::E2b).await?;
    for (file, secret) in [("admin-api-key", key), ("admin-e2b-api-key", e2b)] {
        let path = data_dir.join(file);
        write_private(&path, &format!("{secret}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(true)
}

/// Record a built template as a platform template: one of every host
/// (`minimal`, `busybox`), or else one whose files were made on one host
/// (a recipe's, with copies on others): the host its row names already
/// (it may have been built elsewhere and copied here), else this one.
async fn publish_template(
    cp: &Cp,
    store: &TemplateStore,
    name: &str,
    on_every_host: bool,
) -> Result<()> {
    let meta = store.get(&name.parse()?)?;
    let old = cp.db.own_template(&platform_team(), name).await?;
    let recorded = match old.as_ref().and_then(|t| t.host_id.clone()) {
        Some(home) if cp.db.host(&home).await?.is_some() => Some(home),
        _ => None, // (or a host since deleted)
    };
    let host_id = match on_every_host {
        true => None,
        false => match recorded {
            Some(home) => Some(home),
            None => Some(
                cp.local_agent
                    .get()
                    .map(|(host, _)| host.clone())
                    .context("this host is not registered yet")?,
            ),
        },
    };
    let row = TemplateRow {
        team_id: platform_team(),
        name: name.to_owned(),
        agent_name: name.to_owned(),
        kind: "base".into(),
        host_id,
        vcpus: None,
        memory_mb: None,
        size_bytes: template::dir_size(&store.layer_dir(&meta.name)) as i64,
        default_user: meta.default_user.clone().unwrap_or_default(),
        protected: true,
        metadata: old.map(|t| t.metadata).unwrap_or_default(),
        created_at: (meta.created_at as i64) * 1000,
    };
    cp.db.put_template(&row).await?;
    Ok(())
}

/// Build `minimal` in the background, publishing progress; the API is
/// ready when it is.
async fn build_minimal(cp: Arc<Cp>, agent: Arc<Agent>, extra: Vec<&'static BuiltIn>) {
    let later = || std::iter::once(&BASE).chain(extra.iter().copied());
    cp.set_building("minimal", true);
    for t in later() {
        cp.set_building(t.name, true);
    }
    let store = agent.templates().clone();
    let exists = store.exists(&"minimal".parse().expect("valid"));
    if !exists {
        eprintln!(
            "wrenn up: building the `minimal` template (Debian bookworm with debootstrap): \
             about 1-3 minutes on the first start, then cached"
        );
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] minimal: {msg}")
            .expect("valid template"),
    );
    if !exists {
        bar.enable_steady_tick(Duration::from_millis(200));
    }
    let started = Instant::now();
    let cp2 = cp.clone();
    let bar2 = bar.clone();
    let built = tokio::task::spawn_blocking(move || {
        let mirror = template::host_mirror();
        template::build_minimal(&store, &mirror, &mut |p| {
            bar2.set_message(format!("step {} · {} {}", p.steps, p.phase, p.detail));
            cp2.set_progress(json!({
                "template": "minimal", "step": p.steps, "phase": p.phase, "detail": p.detail,
                "elapsed_sec": started.elapsed().as_secs(),
            }));
        })
        .map(|_| ())
    })
    .await;
    match built {
        Ok(Ok(())) => {
            bar.finish_and_clear();
            if !exists {
                eprintln!("wrenn up: `minimal` built in {:.0?}", started.elapsed());
            }
            let published = publish_template(&cp, agent.templates(), "minimal", true).await;
            cp.set_building("minimal", false);
            if let Err(e) = published {
                for t in later() {
                    cp.set_building(t.name, false);
                }
                return tracing::error!(error = %e, "cannot record the minimal template");
            }
            // E2B's SDKs default to `base`: usable when the API is.
            build_recipe(&cp, &agent, &BASE).await;
            cp.set_ready(true);
            for t in &extra {
                build_recipe(&cp, &agent, t).await;
            }
        }
        Ok(Err(e)) => {
            bar.abandon_with_message("failed");
            tracing::error!(error = %e, "building the minimal template failed");
            cp.set_progress(json!({"template": "minimal", "error": e.to_string()}));
        }
        Err(e) => tracing::error!(error = %e, "the minimal build task failed"),
    }
    // (none of them will be built now)
    cp.set_building("minimal", false);
    for t in later() {
        cp.set_building(t.name, false);
    }
}

/// A template `wrenn up` builds from a recipe in `recipes/`.
#[derive(Debug)]
struct BuiltIn {
    name: &'static str,
    recipe: &'static str,
    healthcheck: Option<&'static str>,
    base: &'static str,
    vcpus: i64,
    memory_mb: i64,
    /// Said before a build, after "building `name`".
    what: &'static str,
    /// The build context: files `COPY` takes (name, contents).
    files: &'static [(&'static str, &'static str)],
}

pub const CODE_RUNNER: &str = "code-runner-beta";

static BASE: BuiltIn = BuiltIn {
    name: "base",
    recipe: include_str!("../../../recipes/base.recipefile"),
    healthcheck: None,
    base: "minimal",
    vcpus: 1,
    memory_mb: 512,
    what: "E2B's default template: `minimal` with the user `user`; seconds, once",
    files: &[],
};

static CODE_RUNNER_RECIPE: BuiltIn = BuiltIn {
    name: CODE_RUNNER,
    recipe: include_str!("../../../recipes/code-runner-beta.recipefile"),
    healthcheck: Some(include_str!(
        "../../../recipes/code-runner-beta.healthcheck"
    )),
    base: "minimal",
    vcpus: 2,
    memory_mb: 2048,
    what: "Jupyter and the scientific Python stack from PyPI: a few minutes, once",
    files: &[],
};

pub const CODE_INTERPRETER: &str = "code-interpreter-v1";

static CODE_INTERPRETER_RECIPE: BuiltIn = BuiltIn {
    name: CODE_INTERPRETER,
    recipe: include_str!("../../../recipes/code-interpreter-v1.recipefile"),
    healthcheck: Some(include_str!("../../../recipes/code-interpreter-v1.healthcheck")),
    base: "base",
    vcpus: 2,
    memory_mb: 2048,
    what: "E2B's code interpreter: IPython kernels and numpy, pandas, matplotlib from PyPI; a few minutes, once",
    files: &[(
        "server.py",
        include_str!("../../../recipes/code-interpreter-v1/server.py"),
    )],
};

/// Build a built-in template from its recipe unless it is on disk (then
/// only record it).
/// Build (or publish, if its files are there) a built-in template; it is
/// no longer pending afterwards, built or not.
async fn build_recipe(cp: &Cp, agent: &Agent, t: &BuiltIn) {
    build_recipe_once(cp, agent, t).await;
    cp.set_building(t.name, false);
}

async fn build_recipe_once(cp: &Cp, agent: &Agent, t: &BuiltIn) {
    let store = agent.templates();
    if store.exists(&t.name.parse().expect("valid")) {
        if let Err(e) = publish_template(cp, store, t.name, false).await {
            tracing::error!(error = %e, template = t.name, "cannot record a built-in template");
        }
        return;
    }
    let steps = wrenn_types::recipe::parse(t.recipe);
    let healthcheck = t
        .healthcheck
        .map(wrenn_types::recipe::parse_healthcheck)
        .transpose();
    let context = match write_context(t.files) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot write a build context"),
    };
    let spec = match (steps, healthcheck) {
        (Ok(steps), Ok(healthcheck)) => wrenn_cp::build::BuildSpec {
            name: t.name.parse().expect("valid"),
            base: t.base.into(),
            steps,
            healthcheck,
            context: context.as_ref().map(|d| d.path().to_owned()),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            protected: true,
        },
        (Err(e), _) | (_, Err(e)) => return tracing::error!(error = %e, "bad built-in recipe"),
    };
    eprintln!("wrenn up: building `{}` ({})", t.name, t.what);
    let started = Instant::now();
    let mut log = |line: String| eprintln!("wrenn up: {}: {line}", t.name);
    match wrenn_cp::build::build(cp, spec, &mut log).await {
        Ok(_) => eprintln!("wrenn up: `{}` built in {:.0?}", t.name, started.elapsed()),
        Err(e) => eprintln!("wrenn up: building `{}` failed: {e}", t.name),
    }
}

/// A temporary directory holding `files`, if there are any.
fn write_context(files: &[(&str, &str)]) -> std::io::Result<Option<tempfile::TempDir>> {
    if files.is_empty() {
        return Ok(None);
    }
    let dir = tempfile::Builder::new().prefix("wrenn-build-").tempdir()?;
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text)?;
    }
    Ok(Some(dir))
}

async fn up(args: UpArgs) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("wrenn up needs root (it creates namespaces, cgroups and firewall rules)");
    }
    if !args.agent.envd.is_file() {
        bail!(
            "envd is not at {} (build it with scripts/install.sh, or pass --envd)",
            args.agent.envd.display()
        );
    }
    std::fs::create_dir_all(&args.agent.data_dir)
        .with_context(|| format!("create {}", args.agent.data_dir.display()))?;
    // The bundle names both by absolute path.
    let mut args = args;
    args.agent.envd = std::fs::canonicalize(&args.agent.envd)?;
    args.agent.data_dir = std::fs::canonicalize(&args.agent.data_dir)?;
    let data_dir = args.agent.data_dir.clone();
    let agent = Agent::open(args.agent.config())
        .await
        .context("open the agent")?;
    let agent_listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .with_context(|| format!("listen on {}", args.agent_listen))?;
    let agent_addr = agent_listener.local_addr()?;
    let (agent_stop_tx, agent_stop) = tokio::sync::oneshot::channel::<()>();
    let agent_server = wrenn_agent::server::AgentServer::new(agent.clone());
    let local_proxy = agent_server.proxy().clone();
    let agent_tls = agent_server.tls().clone();
    // mutual TLS only, as a remote agent: nothing is served until the
    // control plane has issued the certificate (`register_agent`)
    agent_tls.require();
    let agent_task = tokio::spawn(agent_server.run(agent_listener, async {
        let _ = agent_stop.await;
    }));

    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", data_dir.join("wrenn.db").display()));
    let mut config = CpConfig::new(database_url);
    config.proxy_domain = args.proxy_domain.clone();
    config.e2b_debug = args.e2b_debug;
    config.shared_transport = args.shared_transport;
    config.reconcile_interval = args.reconcile_interval;
    config.orphan_layer_grace = args.orphan_layer_grace;
    config.host_heartbeat_timeout = args.host_heartbeat_timeout;
    config.host_monitor_interval = args.host_monitor_interval;
    let plane = ControlPlane::start(config)
        .await
        .context("open the database")?;
    let cp = plane.cp.clone();
    cp.set_ready(false);
    let facts = wrenn_agent::register::host_facts(&data_dir, agent_addr, agent.token());
    let host = register_agent(&cp, &data_dir, &facts, &agent_tls).await?;
    // (the same across restarts: the build capsules of this process's
    // builds carry it, so its reconciler knows those cut off by a restart)
    cp.identity
        .set(host.to_string())
        .map_err(|_| anyhow::anyhow!("the control plane was named before registering"))?;
    recertify(cp.clone(), host.clone(), agent_tls.clone());
    cp.tasks.spawn(wrenn_cp::reconcile::heartbeat_for(
        cp.clone(),
        host.clone(),
        args.heartbeat_interval,
    ));
    cp.tasks.spawn(wrenn_cp::reconcile::follow_auto_pauses(
        cp.clone(),
        host.clone(),
        agent.subscribe_auto_pauses(),
    ));
    let _ = cp.local_agent.set((host.clone(), local_proxy));
    publish_template(&cp, agent.templates(), "busybox", true).await?;
    let first = admin_keys(&cp, &data_dir).await?;
    wrenn_cp::reconcile::reconcile_all(&cp).await;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("wrenn listening on http://{addr}");
    let key_file = data_dir.join("admin-api-key");
    // The SDK names a capsule's port `{port}-{id}.<domain>`, the domain
    // taken from the base URL unless set: an IP address there makes names
    // that resolve nowhere, `localhost` ones resolve (nss-myhostname).
    let proxy_domain = args
        .proxy_domain
        .clone()
        .unwrap_or_else(|| format!("localhost:{}", addr.port()));
    eprintln!(
        "wrenn up: host {host}, agent on {agent_addr}{}\n\
         Point the SDK at it:\n  export WRENN_BASE_URL=http://{addr}\n  \
         export WRENN_PROXY_DOMAIN={proxy_domain}\n  export WRENN_API_KEY=$(cat {})",
        if first { ", admin keys created" } else { "" },
        key_file.display()
    );
    let builder = tokio::spawn(build_minimal(
        cp.clone(),
        agent.clone(),
        [
            (!args.no_code_runner).then_some(&CODE_RUNNER_RECIPE),
            (!args.no_code_interpreter).then_some(&CODE_INTERPRETER_RECIPE),
        ]
        .into_iter()
        .flatten()
        .collect(),
    ));
    let served = plane.serve(listener, shutdown_signal()).await;
    builder.abort();
    let _ = agent_stop_tx.send(());
    let _ = agent_task.await;
    served.context("serve")?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
