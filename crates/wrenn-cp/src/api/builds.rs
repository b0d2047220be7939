//! `POST /v1/admin/builds` (admin team): build a platform template from a
//! recipe, synchronously; 201 with the template and the build log.
//!
//! The body is the build as JSON, or — when the recipe `COPY`s files — a
//! `multipart/form-data` body with that JSON in a `config` part and the
//! files in an `archive` part (wrenn's part names): a tar or tar.gz of
//! regular files and directories only (no links, devices or paths leaving
//! the archive's root), at most [`CONTEXT_LIMIT`] bytes sent and
//! [`UNPACKED_LIMIT`] unpacked, unpacked into a private directory for the
//! build and removed after it. (wrenn also takes zip; we do not.)

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_types::ids::TemplateName;

use super::ApiJson;
use crate::auth::Caller;
use crate::build::{build, BuildError, BuildSpec};
use crate::error::{ApiError, ApiResult};
use crate::model::TemplateJson;
use crate::server::Cp;
use wrenn_types::recipe::{parse, parse_healthcheck, Step};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecipeText {
    Lines(Vec<String>),
    Text(String),
}

#[derive(Debug, Deserialize)]
pub struct BuildBody {
    #[serde(default)]
    name: String,
    base_template: Option<String>,
    recipe: RecipeText,
    healthcheck: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
}

/// The largest archive accepted (as sent), wrenn's 100 MB.
pub const CONTEXT_LIMIT: u64 = 100 << 20;
/// The most its files may hold once unpacked (a gzip may expand a lot).
pub const UNPACKED_LIMIT: u64 = 1 << 30;
/// The most entries a context may hold.
const CONTEXT_ENTRIES: usize = 100_000;

pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
    req: Request,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require_admin()?;
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let (body, context) = if multipart {
        read_form(&cp, req).await?
    } else {
        (ApiJson::<BuildBody>::from_request(req, &cp).await?.0, None)
    };
    let name: TemplateName = body
        .name
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid template name {:?}", body.name)))?;
    let text = match body.recipe {
        RecipeText::Lines(l) => l.join("\n"),
        RecipeText::Text(t) => t,
    };
    let steps = parse(&text).map_err(|e| ApiError::invalid(format!("recipe: {e}")))?;
    if context.is_none() && steps.iter().any(|s| matches!(s, Step::Copy { .. })) {
        return Err(ApiError::invalid(
            "COPY needs a build context: send a multipart/form-data body with the build \
             as its `config` part and a tar (or tar.gz) of the files as its `archive` part",
        ));
    }
    let healthcheck = body
        .healthcheck
        .filter(|h| !h.trim().is_empty())
        .map(|h| parse_healthcheck(&h))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("healthcheck: {e}")))?;
    let spec = BuildSpec {
        name,
        base: body.base_template.unwrap_or_else(|| "minimal".into()),
        steps,
        healthcheck,
        context: context.as_ref().map(|d| d.path().to_owned()),
        vcpus: body.vcpus.filter(|v| (1..=16).contains(v)).unwrap_or(2),
        memory_mb: body
            .memory_mb
            .filter(|m| (128..=65536).contains(m))
            .unwrap_or(2048),
        protected: false,
    };
    let mut logs = Vec::new();
    let mut log = |l: String| logs.push(l);
    let row = build(&cp, spec, &mut log).await.map_err(|e| match e {
        BuildError::NoBase(b) => ApiError::not_found(format!(
            "base template {b} not found (a build starts from a platform template; \
             GET /v1/admin/templates lists them)"
        )),
        e @ (BuildError::Exists(_) | BuildError::Busy(_) | BuildError::Reserved(_)) => {
            ApiError::conflict(e.to_string())
        }
        // (no capacity, a host gone, the database: as the API says them)
        BuildError::Api(e) => e,
        other => ApiError::invalid(format!("build failed: {other}")),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"template": TemplateJson::from(&row), "logs": logs})),
    ))
}

/// A failure on our side: logged, answered as a plain 500.
fn server_side<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ApiError {
    move |e| {
        tracing::error!(error = %e, "{what}");
        ApiError::internal()
    }
}

/// The `config` and `archive` parts of a multipart body (other parts are
/// skipped).
async fn read_form(cp: &Cp, req: Request) -> ApiResult<(BuildBody, Option<tempfile::TempDir>)> {
    let malformed = |e: multer::Error| ApiError::invalid(format!("malformed multipart body: {e}"));
    let boundary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| ApiError::invalid("multipart/form-data without a boundary"))?;
    let mut form = multer::Multipart::new(req.into_body().into_data_stream(), boundary);
    let (mut body, mut context) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("config") => {
                let limit = cp.config.max_json_body;
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    if bytes.len() + chunk.len() > limit {
                        return Err(ApiError::too_large(format!(
                            "the config part exceeds {limit} bytes"
                        )));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                body = Some(
                    serde_json::from_slice::<BuildBody>(&bytes)
                        .map_err(|e| ApiError::invalid(format!("invalid config part: {e}")))?,
                );
            }
            Some("archive") => {
                use std::io::{Seek, Write};
                let mut archive =
                    tempfile::tempfile().map_err(server_side("a file for the build context"))?;
                let mut total = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    total += chunk.len() as u64;
                    if total > CONTEXT_LIMIT {
                        return Err(ApiError::too_large(format!(
                            "the archive exceeds {CONTEXT_LIMIT} bytes"
                        )));
                    }
                    archive
                        .write_all(&chunk)
                        .map_err(server_side("store the build context"))?;
                }
                archive
                    .rewind()
                    .map_err(server_side("read the build context"))?;
                let dir = tokio::task::spawn_blocking(move || unpack_context(archive))
                    .await
                    .map_err(server_side("unpack the build context"))??;
                context = Some(dir);
            }
            _ => while field.chunk().await.map_err(malformed)?.is_some() {},
        }
    }
    let body = body.ok_or_else(|| ApiError::invalid("the config part is missing"))?;
    Ok((body, context))
}

/// Unpack a context archive into a new private directory: regular files
/// and directories only, every path inside it.
fn unpack_context(mut archive: std::fs::File) -> ApiResult<tempfile::TempDir> {
    use std::io::{Read, Seek};
    use std::path::Component;
    let bad = |what: String| ApiError::invalid(format!("build context: {what}"));
    let dir = tempfile::Builder::new()
        .prefix("wrenn-build-context-")
        .tempdir()
        .map_err(server_side("a directory for the build context"))?;
    let mut magic = [0u8; 2];
    let gzip = archive.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    archive
        .rewind()
        .map_err(server_side("read the build context"))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(archive))
    } else {
        Box::new(archive)
    };
    let mut unpacked = 0u64;
    let mut ar = tar::Archive::new(reader);
    // (tar's own words would echo the junk it read)
    let not_tar = |e: std::io::Error| {
        tracing::debug!(error = %e, "build context");
        bad("not a tar or tar.gz archive, or a damaged one".to_owned())
    };
    let entries = ar.entries().map_err(not_tar)?;
    for (n, entry) in entries.enumerate() {
        if n >= CONTEXT_ENTRIES {
            return Err(bad(format!("more than {CONTEXT_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(not_tar)?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("unreadable path: {e}")))?
            .into_owned();
        unpacked += entry.size();
        if unpacked > UNPACKED_LIMIT {
            return Err(bad(format!("more than {UNPACKED_LIMIT} bytes unpacked")));
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(bad(format!(
                "{path:?}: only regular files and directories are taken, not {kind:?}"
            )));
        }
        if !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad(format!("{path:?}: paths must stay inside the archive")));
        }
        let unpacked = entry
            .unpack_in(dir.path())
            .map_err(|e| bad(format!("{path:?}: {e}")))?;
        if !unpacked {
            return Err(bad(format!("{path:?}: paths must stay inside the archive")));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> std::fs::File {
        use std::io::{Seek, Write};
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        f.rewind().unwrap();
        f
    }

    fn entry(b: &mut tar::Builder<Vec<u8>>, path: &[u8], kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        // Written raw: `set_path` refuses the hostile paths under test.
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/shadow").unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn contexts_hold_files_and_directories_only() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let dir = unpack_context(archive(|b| {
            entry(b, b"app/", Directory, b"");
            entry(b, b"app/hello.txt", Regular, b"hello");
            entry(b, b"./top.bin", Regular, &[0, 255]);
        }))
        .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("app/hello.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(std::fs::read(dir.path().join("top.bin")).unwrap(), [0, 255]);

        for (path, kind) in [
            (&b"../evil"[..], Regular),
            (b"/etc/evil", Regular),
            (b"app/../../evil", Regular),
            (b"link", Symlink),
        ] {
            let err = unpack_context(archive(|b| entry(b, path, kind, b"x"))).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{path:?}");
            assert!(
                err.message.starts_with("build context: "),
                "{}",
                err.message
            );
        }
        // the same, gzipped
        let plain = archive(|b| entry(b, b"gz.txt", Regular, b"zipped"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::copy(&mut &plain, &mut gz).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &gz.finish().unwrap()).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let dir = unpack_context(f).unwrap();
        assert_eq!(std::fs::read(dir.path().join("gz.txt")).unwrap(), b"zipped");

        let mut junk = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut junk, &[7u8; 1000]).unwrap();
        std::io::Seek::rewind(&mut junk).unwrap();
        let err = unpack_context(junk).unwrap_err();
        assert_eq!(
            err.message,
            "build context: not a tar or tar.gz archive, or a damaged one"
        );
    }
}
