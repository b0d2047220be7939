//! `wrenn template build FILE`: send a recipe to the control plane
//! (`POST /v1/admin/builds`, admin key) and wait for the template. The
//! healthcheck comes from `--healthcheck` or a `FILE`-named `.healthcheck`
//! next to it (`recipes/code-runner-beta.{recipefile,healthcheck}`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Build a platform template from a recipe file (admin key).
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe: one step per line (RUN, ENV, WORKDIR, USER, START).
    file: PathBuf,
    /// Template name [default: the file name without its extension].
    #[arg(long)]
    name: Option<String>,
    /// Template the build starts from.
    #[arg(long, default_value = "minimal")]
    base: String,
    /// Healthcheck line [default: FILE's `.healthcheck` sibling, if any].
    #[arg(long)]
    healthcheck: Option<String>,
    /// The control plane.
    #[arg(long, env = "WRENN_BASE_URL", default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// An admin team key (`wrenn up` writes one to <data-dir>/admin-api-key).
    #[arg(long, env = "WRENN_API_KEY", hide_env_values = true)]
    api_key: String,
}

pub async fn run(cmd: TemplateCmd) -> i32 {
    let r = match cmd {
        TemplateCmd::Build(a) => build(a).await,
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wrenn template build: {e:#}");
            1
        }
    }
}

async fn build(a: BuildArgs) -> Result<()> {
    let recipe =
        std::fs::read_to_string(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    // Catch mistakes here, with line numbers, before a capsule is started.
    wrenn_types::recipe::parse(&recipe).with_context(|| format!("{}", a.file.display()))?;
    let name = match a.name {
        Some(n) => n,
        None => a
            .file
            .file_stem()
            .and_then(|s| s.to_str())
            .context("name the template with --name")?
            .to_owned(),
    };
    let healthcheck = match a.healthcheck {
        Some(h) => Some(h),
        None => std::fs::read_to_string(a.file.with_extension("healthcheck"))
            .ok()
            .map(|h| h.trim().to_owned()),
    };
    let body = json!({
        "name": name, "base_template": a.base, "recipe": recipe, "healthcheck": healthcheck,
    });
    let base = a.base_url.trim_end_matches('/');
    let req = http::Request::post(format!("{base}/v1/admin/builds"))
        .header("x-api-key", &a.api_key)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )?;
    eprintln!(
        "building {name} from {} on {base} (steps run in a capsule; this waits for the result)",
        a.base
    );
    let client = wrenn_http::client(wrenn_http::HttpVersion::Http1);
    let resp = tokio::time::timeout(Duration::from_secs(3600), client.request(req))
        .await
        .context("the build took over an hour")?
        .with_context(|| format!("cannot reach the control plane at {base} (is `wrenn up` running? set WRENN_BASE_URL)"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = v["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let code = v["error"]["code"].as_str().unwrap_or("error");
        if status == 401 {
            bail!("{code}: {msg} (pass an admin key: --api-key or WRENN_API_KEY)");
        }
        bail!("{code} ({status}): {msg}");
    }
    for line in v["logs"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    println!(
        "built template {} ({} bytes)",
        v["template"]["name"].as_str().unwrap_or(&name),
        v["template"]["size_bytes"]
    );
    Ok(())
}
