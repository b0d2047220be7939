//! Template builds: a recipe run in a capsule of the base template, whose
//! filesystem then becomes a platform template (its writable layer stacked
//! on the base's). The capsule is recorded like any other, marked with
//! [`BUILD_KEY`], and destroyed at the end, also on failure, also when the
//! build is cut off (its client hangs up; the reconciler destroys a build
//! capsule whose build no longer runs, as after a restart).
//!
//! - `RUN` runs `/bin/sh -c` as the current `USER` in the current
//!   `WORKDIR` with the `ENV`s so far; a non-zero exit fails the build.
//! - `USER` creates the user if needed (home, bash, passwordless sudo).
//! - `START` starts the command now (for the healthcheck) and makes it the
//!   template's start command (envd runs it, as the template's default
//!   user, when a capsule boots: capsules are OCI containers, so processes
//!   are not kept in the template).
//! - `COPY` copies from the build context (a directory here: the files of
//!   an uploaded archive, or a recipe's own directory), which is sent to
//!   the capsule as one tar and unpacked at [`CONTEXT_DIR`] before the
//!   steps run, then `cp -r` and `chown -R` to the current user, as
//!   wrenn's builder does; the directory is removed after the last step.
//! - The healthcheck runs until it passes before the snapshot is taken.
//! - CA certificates the host added (`/usr/local/share/ca-certificates`)
//!   are trusted in the build capsule too, so builds work behind the same
//!   TLS-intercepting proxy the host is behind; they stay in the template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_proto::wrenn::agent::v1::__buffa::oneof::write_file_stream_request::Msg;
use wrenn_types::ids::{CapsuleId, TemplateName};

use crate::api::capsules::{launch, Launch, DEFAULT_TEMPLATE_ALIAS};
use crate::db::{now_ms, platform_team, CapsuleRow, TemplateRow};
use crate::error::ApiError;
use crate::events::Actor;
use crate::hosts::HostConn;
use crate::model::Status;
use crate::server::Cp;
use wrenn_types::recipe::{Healthcheck, Step};

/// The metadata key that marks a build capsule (its value: the template).
pub const BUILD_KEY: &str = "wrenn_build";
/// And the one naming the control plane that runs its build
/// ([`Cp::identity`]): only that one's reconciler may destroy it.
pub const BUILD_OWNER_KEY: &str = "wrenn_build_by";

/// Where the build context is unpacked in the build capsule.
pub const CONTEXT_DIR: &str = "/tmp/build-files";

#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: TemplateName,
    pub base: String,
    pub steps: Vec<Step>,
    pub healthcheck: Option<Healthcheck>,
    /// Where `COPY` sources are read from.
    pub context: Option<PathBuf>,
    pub vcpus: i64,
    pub memory_mb: i64,
    /// Never deleted (`wrenn up`'s built-ins); an admin's build is not.
    pub protected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("base template {0} not found")]
    NoBase(String),
    #[error("template {0} exists")]
    Exists(String),
    #[error("template {0} is being built")]
    Busy(String),
    #[error("the name {0} is reserved")]
    Reserved(String),
    #[error("step {step} ({what}) failed: {msg}")]
    Step {
        step: usize,
        what: String,
        msg: String,
    },
    #[error("healthcheck did not pass: {0}")]
    Health(String),
    #[error("build context: {0}")]
    Context(String),
    /// The control plane's or an agent's refusal, as the API answers it.
    #[error("{}: {}", .0.code, .0.message)]
    Api(crate::error::ApiError),
}

impl From<crate::error::ApiError> for BuildError {
    fn from(e: crate::error::ApiError) -> Self {
        BuildError::Api(e)
    }
}

impl From<crate::db::DbError> for BuildError {
    fn from(e: crate::db::DbError) -> Self {
        BuildError::Api(e.into())
    }
}

/// A call into the build capsule that failed ([`Ctx::failed`]).
#[derive(Debug)]
enum CallError {
    /// Its host is gone or shutting down: the build may be tried again,
    /// so it is the API's 503, not a failed step's 400.
    Host(ApiError),
    /// Anything else, told as the step's failure.
    Other(String),
}

impl CallError {
    /// The build's error: the host's as it is, anything else by `other`.
    fn or(self, other: impl FnOnce(String) -> BuildError) -> BuildError {
        match self {
            CallError::Host(e) => BuildError::Api(e),
            CallError::Other(msg) => other(msg),
        }
    }
}

/// `s` as one single-quoted `sh` word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell line that runs `cmd` in `cwd` as `user` with `env` (not at
/// all when `cwd` cannot be entered).
fn wrap(cmd: &str, user: &str, cwd: &str, env: &BTreeMap<String, String>) -> String {
    let mut inner = format!("cd {} || exit 1\n", quote(cwd));
    for (k, v) in env {
        inner.push_str(&format!("export {k}={}\n", quote(v)));
    }
    inner.push_str(cmd);
    if user == "root" {
        inner
    } else {
        format!("su -s /bin/sh {} -c {}", quote(user), quote(&inner))
    }
}

/// `path` as an absolute path: a relative one is taken from `cwd`.
fn absolute(path: &str, cwd: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    }
}

/// How much of each of a build command's outputs is kept.
const SH_TAIL: usize = 64 << 10;
/// Where a build command's outputs are caught, in the capsule.
const SH_DIR: &str = "/tmp/.wrenn-sh";

struct Ctx<'a> {
    host: &'a HostConn,
    capsule: &'a CapsuleRow,
}

/// How long a host whose call failed has to answer before it is taken
/// for gone ([`Ctx::failed`]).
const HOST_PROBE: Duration = Duration::from_secs(5);

impl Ctx<'_> {
    /// The failure of a call into the build capsule as the build tells
    /// it. `unavailable` or `deadline_exceeded` is the host's (503) only
    /// when its agent does not answer now either: the agent also says
    /// `unavailable` when envd in the capsule cannot be reached (a step
    /// that ran it out of memory), and that is the step's failure.
    async fn failed(&self, e: connectrpc::ConnectError) -> CallError {
        let msg = e.message.unwrap_or_else(|| e.code.as_str().to_owned());
        if !matches!(
            e.code,
            connectrpc::ErrorCode::Unavailable | connectrpc::ErrorCode::DeadlineExceeded
        ) {
            return CallError::Other(msg);
        }
        let probe = self
            .host
            .rpc
            .list_capsules(pb::ListCapsulesRequest::default());
        match tokio::time::timeout(HOST_PROBE, probe).await {
            Ok(Ok(_)) => CallError::Other(msg),
            _ => CallError::Host(ApiError::host_unavailable(format!(
                "host {} does not answer: {msg}",
                self.host.id
            ))),
        }
    }

    /// Run a shell line as root; (exit code, stdout, stderr), of each
    /// output its last [`SH_TAIL`] bytes only: a step may print any amount
    /// (a foreground exec answers at most 12 MiB), and only a failed
    /// step's tail is shown.
    async fn sh(&self, line: &str, timeout: Duration) -> Result<(i32, String, String), CallError> {
        // (files under SH_DIR: a step that times out leaves its pair there,
        // and the build removes the directory before the snapshot)
        let kept = format!(
            "mkdir -p {SH_DIR} && __wrenn_o=$(mktemp -p {SH_DIR}) && __wrenn_e=$(mktemp -p {SH_DIR}) \
             || exit 125\n(\n{line}\n) >\"$__wrenn_o\" 2>\"$__wrenn_e\"\n__wrenn_rc=$?\n\
             tail -c {SH_TAIL} \"$__wrenn_o\"; tail -c {SH_TAIL} \"$__wrenn_e\" >&2; \
             rm -f \"$__wrenn_o\" \"$__wrenn_e\"; exit $__wrenn_rc"
        );
        let req = pb::ExecRequest {
            id: self.capsule.id.to_string(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), kept],
            // whatever the base template's default user is
            user: "root".into(),
            timeout_sec: timeout.as_secs().clamp(1, u32::MAX as u64) as u32,
            ..Default::default()
        };
        let opts = connectrpc::client::CallOptions::default()
            .with_timeout(timeout + Duration::from_secs(5));
        let out = match self.host.rpc.exec_with_options(req, opts).await {
            Ok(o) => o.into_owned(),
            Err(e) => return Err(self.failed(e).await),
        };
        Ok((
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Write a file as root: the agent writes as the capsule's default
    /// user, so the file is staged in /tmp and moved into place.
    async fn upload(&self, path: &str, data: Vec<u8>) -> Result<(), CallError> {
        let chunks: Vec<Vec<u8>> = data.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        self.upload_stream(path, futures::stream::iter(chunks))
            .await
    }

    /// [`Ctx::upload`] of a file that arrives in chunks.
    async fn upload_stream(
        &self,
        path: &str,
        chunks: impl futures::Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<(), CallError> {
        let staged = format!("/tmp/.wrenn-upload-{}", crate::auth::random_hex(8));
        self.write(&staged, chunks).await?;
        let line = format!(
            "mkdir -p \"$(dirname {p})\" && mv -f {s} {p} && chown root:root {p}",
            p = quote(path),
            s = quote(&staged)
        );
        match self.sh(&line, Duration::from_secs(60)).await? {
            (0, _, _) => Ok(()),
            (c, o, e) => Err(CallError::Other(format!(
                "moving {path} into place: exit {c}: {o}{e}"
            ))),
        }
    }

    async fn write(
        &self,
        path: &str,
        chunks: impl futures::Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<(), CallError> {
        use futures::StreamExt;
        let meta = pb::WriteFileStreamRequest {
            msg: Some(Msg::Meta(Box::new(pb::FileMeta {
                id: self.capsule.id.to_string(),
                path: path.to_owned(),
                ..Default::default()
            }))),
            ..Default::default()
        };
        let end = pb::WriteFileStreamRequest {
            msg: Some(Msg::End(true)),
            ..Default::default()
        };
        let msgs = futures::stream::once(async { meta })
            .chain(chunks.map(|c| pb::WriteFileStreamRequest {
                msg: Some(Msg::Chunk(c)),
                ..Default::default()
            }))
            .chain(futures::stream::once(async { end }));
        match self.host.rpc.write_file_stream(msgs).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }
}

/// The shell line of a `COPY` to the absolute `dest`, as wrenn runs it:
/// `cp -r` from the unpacked context, then what was copied (not the
/// directory it went into) becomes `user`'s, unless that is root (a
/// root `chown` would clear setuid bits, even of files it leaves alone).
/// A trailing `/` names a directory to copy into; missing parents are made.
fn copy_line(context: &str, sources: &[String], dest: &str, user: &str) -> String {
    let d = quote(dest);
    let parent = if dest.ends_with('/') {
        d.clone()
    } else {
        format!("\"$(dirname {d})\"")
    };
    let srcs: Vec<String> = sources.iter().map(|s| quote(s)).collect();
    let srcs = srcs.join(" ");
    let mut line = format!(
        "mkdir -p {parent} && cd {} && if [ -d {d} ]; then into=1; else into=; fi \
         && cp -r -- {srcs} {d}",
        quote(context)
    );
    if user != "root" {
        line.push_str(&format!(
            " && for s in {srcs}; do if [ -n \"$into\" ]; then t={d}/\"$(basename \"$s\")\"; \
             else t={d}; fi; chown -R {} \"$t\" || exit 1; done",
            quote(user)
        ));
    }
    line
}

/// The build context, archived here and unpacked at [`CONTEXT_DIR`] in the
/// capsule by its own `tar`.
async fn send_context(
    cx: &Ctx<'_>,
    dir: &Path,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), BuildError> {
    // Archived into a temporary file and streamed from there: a context
    // may be large, and several builds may run at once.
    let d = dir.to_owned();
    let (archive, size) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        use std::io::Seek;
        let mut ar = tar::Builder::new(tempfile::tempfile()?);
        ar.append_dir_all(".", &d)?;
        let mut f = ar.into_inner()?;
        let size = f.stream_position()?;
        f.rewind()?;
        Ok((f, size))
    })
    .await
    .map_err(|e| BuildError::Context(e.to_string()))?
    .map_err(|e| BuildError::Context(format!("archive {}: {e}", dir.display())))?;
    log(format!("context: {size} bytes → {CONTEXT_DIR}"));
    let tarball = format!("{CONTEXT_DIR}.tar");
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<std::io::Error>));
    let chunks = futures::stream::unfold(
        (tokio::fs::File::from_std(archive), failed.clone()),
        |(mut f, failed)| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 64 << 10];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((buf, (f, failed)))
                }
                Err(e) => {
                    *failed.lock().unwrap() = Some(e);
                    None
                }
            }
        },
    );
    let sent = cx.upload_stream(&tarball, chunks).await;
    if let Some(e) = failed.lock().unwrap().take() {
        return Err(BuildError::Context(format!("read the archive: {e}")));
    }
    sent.map_err(|e| e.or(BuildError::Context))?;
    let line = format!(
        "rm -rf {CONTEXT_DIR} && mkdir -p {CONTEXT_DIR} && tar -xf {tarball} -C {CONTEXT_DIR} && rm -f {tarball}"
    );
    match cx.sh(&line, Duration::from_secs(600)).await {
        Ok((0, _, _)) => Ok(()),
        Ok((c, o, e)) => Err(BuildError::Context(format!("unpack: exit {c}: {o}{e}"))),
        Err(e) => Err(e.or(BuildError::Context)),
    }
}

fn tail(s: &str) -> &str {
    let n = s.len();
    let mut i = n.saturating_sub(2000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

async fn run_steps(
    cx: &Ctx<'_>,
    spec: &BuildSpec,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(Option<String>, BTreeMap<String, String>, String), BuildError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    // Python's and curl's own CA bundles ignore the system's; point them at it.
    let build_env: BTreeMap<String, String> = [
        ("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"),
        ("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"),
        ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        ("DEBIAN_FRONTEND", "noninteractive"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let (mut user, mut cwd) = ("root".to_owned(), "/root".to_owned());
    let mut start = None;
    for (i, step) in spec.steps.iter().enumerate() {
        let n = i + 1;
        let fail = |what: &str, msg: String| BuildError::Step {
            step: n,
            what: what.to_owned(),
            msg,
        };
        let t0 = Instant::now();
        let mut all_env = build_env.clone();
        all_env.extend(env.clone());
        match step {
            Step::Run { cmd, timeout } => {
                log(format!("[{n}/{}] RUN {cmd}", spec.steps.len()));
                let (code, out, err) = cx
                    .sh(&wrap(cmd, &user, &cwd, &all_env), *timeout)
                    .await
                    .map_err(|e| e.or(|m| fail("RUN", m)))?;
                if code != 0 {
                    return Err(fail(
                        "RUN",
                        format!("exit {code}\n{}{}", tail(&out), tail(&err)),
                    ));
                }
            }
            Step::Env { key, value } => {
                log(format!("[{n}/{}] ENV {key}", spec.steps.len()));
                env.insert(key.clone(), value.clone());
            }
            Step::Workdir { path } => {
                log(format!("[{n}/{}] WORKDIR {path}", spec.steps.len()));
                // (made by root, whoever the user is, and then given to the
                // user if it was new: a user may not write under /opt, and
                // an existing /tmp stays as it is)
                let dir = absolute(path, &cwd);
                let q = quote(&dir);
                let mut line = format!("[ -d {q} ] || {{ mkdir -p {q}");
                if user != "root" {
                    line.push_str(&format!(" && chown {}: {q}", quote(&user)));
                }
                line.push_str("; }");
                match cx.sh(&line, Duration::from_secs(30)).await {
                    Ok((0, _, _)) => cwd = dir,
                    Ok((c, o, e)) => return Err(fail("WORKDIR", format!("exit {c}: {o}{e}"))),
                    Err(e) => return Err(e.or(|m| fail("WORKDIR", m))),
                }
            }
            Step::User { name } => {
                log(format!("[{n}/{}] USER {name}", spec.steps.len()));
                let q = quote(name);
                // (a new user gets a home, bash and sudo; an existing one,
                // such as `nobody`, keeps what /etc/passwd gives it, and
                // works in its home if that exists, else in /)
                let line = format!(
                    "id -u {q} >/dev/null 2>&1 || {{ useradd -m -s /bin/bash {q} && \
                     mkdir -p /etc/sudoers.d && echo {q}' ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{name} && \
                     chmod 0440 /etc/sudoers.d/{name}; }} || exit 1\n\
                     while IFS=: read -r n _ _ _ _ h _; do [ \"$n\" = {q} ] && break; done </etc/passwd\n\
                     [ \"$n\" = {q} ] || h=\n\
                     echo \"$h\"; [ -n \"$h\" ] && [ -d \"$h\" ] && echo dir; exit 0"
                );
                match cx.sh(&line, Duration::from_secs(60)).await {
                    Ok((0, out, _)) => {
                        let mut lines = out.lines();
                        let home = lines.next().unwrap_or_default().trim();
                        let home = if home.is_empty() { "/" } else { home }.to_owned();
                        user = name.clone();
                        cwd = if lines.next() == Some("dir") {
                            home.clone()
                        } else {
                            "/".to_owned()
                        };
                        env.insert("HOME".into(), home);
                    }
                    Ok((c, o, e)) => return Err(fail("USER", format!("exit {c}: {o}{e}"))),
                    Err(e) => return Err(e.or(|m| fail("USER", m))),
                }
            }
            Step::Copy { sources, dest } => {
                log(format!(
                    "[{n}/{}] COPY {} {dest}",
                    spec.steps.len(),
                    sources.join(" ")
                ));
                if spec.context.is_none() {
                    return Err(fail("COPY", "this build has no context".into()));
                }
                let dest = absolute(dest, &cwd);
                let line = copy_line(CONTEXT_DIR, sources, &dest, &user);
                match cx.sh(&line, Duration::from_secs(600)).await {
                    Ok((0, _, _)) => {}
                    Ok((c, o, e)) => return Err(fail("COPY", format!("exit {c}: {o}{e}"))),
                    Err(e) => return Err(e.or(|m| fail("COPY", m))),
                }
            }
            Step::Start { cmd } => {
                log(format!("[{n}/{}] START {cmd}", spec.steps.len()));
                let line = wrap(&format!("exec {cmd}"), &user, &cwd, &all_env);
                let req = pb::ExecRequest {
                    id: cx.capsule.id.to_string(),
                    cmd: "/bin/sh".into(),
                    args: vec!["-c".into(), line.clone()],
                    user: "root".into(),
                    tag: format!("start-{n}"),
                    ..Default::default()
                };
                if let Err(e) = cx.host.rpc.start_background(req).await {
                    return Err(cx.failed(e).await.or(|m| fail("START", m)));
                }
                start = Some((cmd.clone(), user.clone(), cwd.clone(), all_env.clone()));
            }
        }
        tracing::debug!(step = n, elapsed = ?t0.elapsed(), "build step done");
    }
    // envd runs a template's start command as the template's default user
    // (the last USER): wrap it in `su` only when START ran as someone else
    // and root can switch (else it runs as the default user).
    let start = start.map(|(cmd, as_user, cwd, env)| {
        let who = if as_user != user && user == "root" {
            as_user
        } else {
            "root".to_owned()
        };
        wrap(&format!("exec {cmd}"), &who, &cwd, &env)
    });
    Ok((start, env, user))
}

async fn wait_healthy(
    cx: &Ctx<'_>,
    h: &Healthcheck,
    user: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), BuildError> {
    log(format!("healthcheck: {}", h.cmd));
    let t0 = Instant::now();
    let mut failures = 0u32;
    loop {
        let line = wrap(&h.cmd, user, "/", &BTreeMap::new());
        let last = match cx.sh(&line, h.interval.max(Duration::from_secs(5))).await {
            Ok((0, _, _)) => return Ok(()),
            Ok((c, o, e)) => format!("exit {c}: {}{}", tail(&o), tail(&e)),
            Err(CallError::Other(msg)) => msg,
            Err(CallError::Host(e)) => return Err(BuildError::Api(e)),
        };
        if t0.elapsed() >= h.start_period {
            failures += 1;
        }
        if (h.retries > 0 && failures >= h.retries) || t0.elapsed() >= h.timeout {
            return Err(BuildError::Health(last));
        }
        tokio::time::sleep(h.interval).await;
    }
}

/// A build running in this process: its name and build capsule are in
/// [`Cp::builds`] while it lives. Dropped before [`Running::finish`] (its
/// client hung up), it has the capsule destroyed in the background, also
/// when that comes while the capsule is being launched (the launch runs to
/// its end on its own and then sees that); if the process dies instead,
/// the reconciler destroys it at the next start.
struct Running {
    cp: Arc<Cp>,
    name: String,
    capsule: CapsuleId,
    state: Arc<Mutex<Capsule>>,
}

/// Where a build's capsule is, as its guard and its launch see it.
enum Capsule {
    Launching,
    Up(Arc<HostConn>),
    /// The build is gone (or done): whoever sees this destroys it.
    Dropped,
}

impl Running {
    fn start(cp: &Cp, name: &str) -> Result<Running, BuildError> {
        let capsule = CapsuleId::random();
        match cp.builds.lock().unwrap().entry(name.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => {
                return Err(BuildError::Busy(name.to_owned()))
            }
            std::collections::hash_map::Entry::Vacant(v) => v.insert(capsule.clone()),
        };
        Ok(Running {
            cp: cp.arc(),
            name: name.to_owned(),
            capsule,
            state: Arc::new(Mutex::new(Capsule::Launching)),
        })
    }

    /// Launch the build capsule (to its end, even if the build is
    /// dropped meanwhile) and the host it runs on.
    async fn launch(&self, spec: Launch) -> Result<(CapsuleRow, Arc<HostConn>), BuildError> {
        let state = self.state.clone();
        let up = self
            .cp
            .to_completion(move |cp| async move {
                let capsule = launch(&cp, &platform_team(), Actor::system(), spec).await?;
                let host = crate::api::host_of(&cp, &capsule)?;
                let mut now = state.lock().unwrap();
                if matches!(*now, Capsule::Dropped) {
                    let (owned, id, h) = (cp.clone(), capsule.id.clone(), host.clone());
                    cp.tasks
                        .spawn(async move { discard(&owned, &h, &id).await });
                    return Err(ApiError::not_found("the build was cut off"));
                }
                *now = Capsule::Up(host.clone());
                Ok::<_, ApiError>((capsule, host))
            })
            .await?;
        Ok(up)
    }

    /// Destroy the build capsule and let the name go.
    async fn finish(self) {
        let up = std::mem::replace(&mut *self.state.lock().unwrap(), Capsule::Dropped);
        if let Capsule::Up(host) = up {
            discard(&self.cp, &host, &self.capsule).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let was = std::mem::replace(&mut *self.state.lock().unwrap(), Capsule::Dropped);
        if let Capsule::Up(host) = was {
            let (cp, id) = (self.cp.clone(), self.capsule.clone());
            tracing::info!(capsule = %id, template = %self.name, "build cut off: destroying its capsule");
            self.cp
                .tasks
                .spawn(async move { discard(&cp, &host, &id).await });
        }
        self.cp.builds.lock().unwrap().remove(&self.name);
    }
}

/// Destroy a build capsule (it is the platform's: no events).
async fn discard(cp: &Cp, host: &HostConn, id: &CapsuleId) {
    if let Err(e) = host.destroy(id).await {
        return tracing::warn!(capsule = %id, error = %e, "cannot destroy the build capsule");
    }
    let _ = cp.db.transition(id, &[], Status::Stopped).await;
}

/// Build a platform template. `log` gets one line per step.
pub async fn build(
    cp: &Cp,
    spec: BuildSpec,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<TemplateRow, BuildError> {
    let team = platform_team();
    if spec.name.as_str() == DEFAULT_TEMPLATE_ALIAS {
        return Err(BuildError::Reserved(spec.name.to_string()));
    }
    let running = Running::start(cp, spec.name.as_str())?;
    if cp
        .db
        .own_template(&team, spec.name.as_str())
        .await?
        .is_some()
    {
        return Err(BuildError::Exists(spec.name.to_string()));
    }
    let base = cp
        .db
        .resolve_template(&team, &spec.base)
        .await?
        .ok_or_else(|| BuildError::NoBase(spec.base.clone()))?;
    let launch_spec = Launch {
        id: running.capsule.clone(),
        vcpus: spec.vcpus,
        memory_mb: spec.memory_mb,
        metadata: BTreeMap::from([
            (BUILD_KEY.to_owned(), spec.name.to_string()),
            (BUILD_OWNER_KEY.to_owned(), cp.identity().to_owned()),
        ]),
        ..Launch::new(&base)
    };
    let (capsule, host) = running.launch(launch_spec).await?;
    let cx = Ctx {
        host: &host,
        capsule: &capsule,
    };
    let result = async {
        trust_host_cas(&cx, log).await;
        if let Some(dir) = &spec.context {
            send_context(&cx, dir, log).await?;
        }
        let (start, env, user) = run_steps(&cx, &spec, log).await?;
        if spec.context.is_some() {
            match cx
                .sh(&format!("rm -rf {CONTEXT_DIR}"), Duration::from_secs(60))
                .await
            {
                Ok((0, _, _)) => {}
                Ok((c, o, e)) => return Err(BuildError::Context(format!("rm: exit {c}: {o}{e}"))),
                Err(e) => return Err(e.or(BuildError::Context)),
            }
        }
        if let Some(h) = &spec.healthcheck {
            wait_healthy(&cx, h, &user, log).await?;
        }
        // (what timed-out commands left of their outputs stays out of the
        // template; best effort)
        let _ = cx
            .sh(&format!("rm -rf {SH_DIR}"), Duration::from_secs(30))
            .await;
        // (a build of this name cut off after its snapshot left the files
        // and no row, which would refuse this snapshot: they go)
        host.drop_template(spec.name.as_str())
            .await
            .map_err(|e| BuildError::Api(ApiError::agent(&e)))?;
        log(format!("snapshot → {}", spec.name));
        let req = pb::SnapshotRequest {
            id: capsule.id.to_string(),
            name: spec.name.to_string(),
            start_cmd: start,
            env: env
                .clone()
                .into_iter()
                .filter(|(k, _)| k != "HOME")
                .collect(),
            default_user: Some(user.clone()),
            ready_cmd: spec.healthcheck.as_ref().map(|h| h.cmd.clone()),
            ..Default::default()
        };
        let opts =
            connectrpc::client::CallOptions::default().with_timeout(Duration::from_secs(600));
        let made = host
            .rpc
            .create_snapshot_with_options(req, opts)
            .await
            .map_err(|e| BuildError::Api(crate::error::ApiError::agent(&e)))?
            .into_owned();
        let row = TemplateRow {
            team_id: team.clone(),
            name: spec.name.to_string(),
            agent_name: spec.name.to_string(),
            kind: "base".into(),
            host_id: Some(host.id.clone()),
            vcpus: None,
            memory_mb: None,
            size_bytes: made.size_bytes as i64,
            default_user: made.default_user,
            protected: spec.protected,
            metadata: BTreeMap::from([("base".to_owned(), spec.base.clone())]),
            created_at: now_ms(),
        };
        cp.db.put_template(&row).await?;
        // (made again: copies of what the name held before are stale)
        cp.db.drop_template_copy(&row.agent_name, None).await?;
        Ok(row)
    }
    .await;
    // The build capsule goes whatever happened.
    running.finish().await;
    result
}

async fn trust_host_cas(cx: &Ctx<'_>, log: &mut (dyn FnMut(String) + Send)) {
    let Ok(rd) = std::fs::read_dir("/usr/local/share/ca-certificates") else {
        return;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "crt") {
            if let (Ok(data), Some(name)) = (std::fs::read(&p), p.file_name()) {
                let target = format!(
                    "/usr/local/share/ca-certificates/{}",
                    name.to_string_lossy()
                );
                if cx.upload(&target, data).await.is_ok() {
                    n += 1;
                }
            }
        }
    }
    if n > 0 {
        log(format!("trusting {n} CA certificate(s) the host added"));
        let _ = cx
            .sh("command -v update-ca-certificates >/dev/null && update-ca-certificates >/dev/null 2>&1", Duration::from_secs(60))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn run(line: &str) {
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", line])
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {out:?}");
    }

    /// `COPY` for real, with `/bin/sh`: into an existing directory, to a
    /// new name, as root and as another user. Only what was copied changes
    /// owner; the directory it went into (and the setuid bit of a file
    /// already there) is left alone.
    #[test]
    fn copy_changes_only_what_it_copied() {
        // (/proc/self belongs to the process's effective user)
        if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
            eprintln!("skipped: chown needs root (CI runs this as root)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (ctx, root) = (t.path().join("ctx"), t.path().join("root"));
        std::fs::create_dir_all(ctx.join("app/sub")).unwrap();
        std::fs::write(ctx.join("app/sub/f"), "f").unwrap();
        std::fs::write(ctx.join("tool"), "t").unwrap();
        let bin = root.join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let suid = bin.join("sudo");
        std::fs::write(&suid, "s").unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let ctx_s = ctx.display().to_string();
        let at = |p: &str| format!("{}/{p}", root.display());

        // as a user: into an existing directory
        run(&copy_line(&ctx_s, &s(&["tool"]), &at("usr/bin"), "nobody"));
        let nobody = std::fs::metadata(bin.join("tool")).unwrap().uid();
        assert_ne!(nobody, 0);
        assert_eq!(
            std::fs::metadata(&bin).unwrap().uid(),
            0,
            "the directory stays root's"
        );
        assert_eq!(std::fs::metadata(&suid).unwrap().mode() & 0o7777, 0o4755);
        // as a user: a directory to a new name (its contents, as cp -r does)
        run(&copy_line(&ctx_s, &s(&["app"]), &at("opt/app"), "nobody"));
        assert_eq!(
            std::fs::read_to_string(root.join("opt/app/sub/f")).unwrap(),
            "f"
        );
        assert_eq!(
            std::fs::metadata(root.join("opt/app/sub/f")).unwrap().uid(),
            nobody
        );
        assert_eq!(std::fs::metadata(root.join("opt")).unwrap().uid(), 0);
        // a trailing slash copies into a directory it makes
        run(&copy_line(
            &ctx_s,
            &s(&["tool", "app"]),
            &at("srv/"),
            "root",
        ));
        assert!(root.join("srv/tool").is_file() && root.join("srv/app/sub/f").is_file());
        // as root, nothing is chowned: the setuid bit survives
        run(&copy_line(&ctx_s, &s(&["tool"]), &at("usr/bin/"), "root"));
        assert_eq!(std::fs::metadata(&suid).unwrap().mode() & 0o7777, 0o4755);
    }
}
