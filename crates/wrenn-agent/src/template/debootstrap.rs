//! The `minimal` template: Debian bookworm from debootstrap (`minbase`)
//! with ca-certificates, curl, sudo, python3 and git. Needs the Debian
//! mirror and a few minutes; built once and cached like any template.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use super::{io_err, TemplateError, TemplateMeta, TemplateStore};

/// Packages on top of `minbase`.
pub const MINIMAL_PACKAGES: &str = "ca-certificates,curl,sudo,python3,git,procps,iproute2";
pub const SUITE: &str = "bookworm";

/// A build step reported while debootstrap runs: its phase
/// (`Retrieving`, `Validating`, `Extracting`, `Unpacking`, `Configuring`…)
/// and how many steps have gone by.
#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: String,
    pub detail: String,
    pub steps: u32,
}

/// The first Debian mirror the host's apt uses, else deb.debian.org.
pub fn host_mirror() -> String {
    let mut texts: Vec<String> = std::fs::read_to_string("/etc/apt/sources.list")
        .into_iter()
        .collect();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".list") || n.ends_with(".sources") {
                texts.extend(std::fs::read_to_string(e.path()).ok());
            }
        }
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .find(|w| {
            (w.starts_with("http://") || w.starts_with("https://"))
                && w.trim_end_matches('/').ends_with("/debian")
        })
        .map(str::to_owned)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// Build `minimal` unless it exists, reporting each debootstrap step.
pub fn build_minimal(
    store: &TemplateStore,
    mirror: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<TemplateMeta, TemplateError> {
    let name = "minimal".parse().expect("valid name");
    if store.exists(&name) {
        return store.get(&name);
    }
    let staged = store.stage(&name)?;
    let fail = |what: String| TemplateError::Build {
        name: name.clone(),
        what,
    };
    let mut child = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={MINIMAL_PACKAGES}"),
            SUITE,
        ])
        .arg(&staged.layer)
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("run debootstrap: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let mut steps = 0;
    let mut last = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("I: ") {
            steps += 1;
            let (phase, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            progress(Progress {
                phase: phase.to_owned(),
                detail: detail.trim_end_matches('.').to_owned(),
                steps,
            });
        }
        last = line;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait for debootstrap: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!(
            "debootstrap {}: {} {}",
            out.status,
            err.trim(),
            last
        )));
    }
    tidy(&staged.layer)?;
    let meta = TemplateMeta::base(name.clone(), true);
    // (a control plane may have copied `minimal` here from another host
    // while debootstrap ran)
    store.commit_or_existing(staged, meta)
}

/// Drop the package cache and the files the agent bind-mounts per capsule.
fn tidy(root: &Path) -> Result<(), TemplateError> {
    let cache = root.join("var/cache/apt/archives");
    if let Ok(rd) = std::fs::read_dir(&cache) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                std::fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
            }
        }
    }
    for f in ["etc/hostname", "etc/resolv.conf"] {
        let p = root.join(f);
        if p.symlink_metadata().is_ok() {
            std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
        }
        std::fs::write(&p, "").map_err(io_err("write", &p))?;
    }
    Ok(())
}
