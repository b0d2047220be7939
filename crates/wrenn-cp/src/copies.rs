//! Templates on more than one host. A template's files are made on one
//! host, the one its row names (`minimal` and `busybox`, whose rows name
//! none, are made on every host). A capsule may be placed on any host
//! ([`crate::hosts::Hosts::place`]): one that lacks the template first
//! gets a copy ([`ensure`]), streamed from a host that has it to that one
//! through the control plane (the agents' `ExportTemplate` and
//! `ImportTemplate`), layer by layer from the bottom of its stack, each
//! recorded in `template_copies`.
//!
//! A host's files of a layer are current when a row names that layer on
//! every host or on that one, when a copy row says so, or, for a
//! snapshot's layer (`s-…`, a name never reused) that no row names any
//! more, when they are there at all. Other files of that name are stale
//! (the template was deleted, or made again, while the host was away):
//! they are replaced. A template made again drops its copy rows
//! ([`crate::build`]); deleting one removes its copies wherever the hosts
//! answer.

use std::collections::HashSet;
use std::time::Duration;

use connectrpc::client::CallOptions;
use connectrpc::ConnectError;
use tokio::sync::mpsc;
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::HostId;

use crate::db::TemplateRow;
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::server::Cp;

/// Longest a copy of one layer may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(600);
/// Export pieces in flight to the importing host.
const COPY_BUFFER: usize = 8;

/// The hosts that have template `t`'s files, the one that made them
/// first; None when every host makes its own.
pub async fn holders(cp: &Cp, t: &TemplateRow) -> ApiResult<Option<Vec<HostId>>> {
    let Some(home) = &t.host_id else {
        return Ok(None);
    };
    let mut hosts = vec![home.clone()];
    for h in cp.db.template_copies(&t.agent_name).await? {
        if h != *home {
            hosts.push(h);
        }
    }
    Ok(Some(hosts))
}

/// Give `target` template `t`'s files unless it has them (`holders`, as
/// [`holders`] found them), copied from the first holder that is
/// connected. Copies of one template to one host are made one at a time;
/// a create that waited for another's finds it made.
pub async fn ensure(
    cp: &Cp,
    t: &TemplateRow,
    holders: Option<&[HostId]>,
    target: &HostConn,
) -> ApiResult<()> {
    let Some(holders) = holders else {
        return Ok(());
    };
    if holders.contains(&target.id) {
        return Ok(());
    }
    let _one = cp
        .copying
        .lock(&(t.agent_name.clone(), target.id.clone()))
        .await;
    if cp
        .db
        .template_copies(&t.agent_name)
        .await?
        .contains(&target.id)
    {
        return Ok(());
    }
    let source = holders
        .iter()
        .find_map(|h| cp.hosts.get(h))
        .ok_or_else(|| {
            ApiError::host_unavailable(format!(
                "no host with the files of template {} is connected",
                t.name
            ))
        })?;
    let t0 = std::time::Instant::now();
    match copy_stack(cp, &t.agent_name, &source, target).await {
        Ok(bytes) => {
            tracing::info!(template = %t.name, from = %source.id, to = %target.id, bytes,
                ms = t0.elapsed().as_millis() as u64, "copied a template");
            Ok(())
        }
        Err(e) => Err(ApiError::host_unavailable(format!(
            "cannot copy template {} from host {} to host {}: {e}",
            t.name, source.id, target.id
        ))),
    }
}

/// Copy `top` and the layers under it that `target` lacks from `source`;
/// the bytes copied.
async fn copy_stack(
    cp: &Cp,
    top: &str,
    source: &HostConn,
    target: &HostConn,
) -> Result<u64, String> {
    let layers = templates(source)
        .await?
        .into_iter()
        .find(|t| t.name == top)
        .ok_or_else(|| "that host does not have it".to_owned())?
        .layers;
    let present: HashSet<String> = templates(target)
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    let mut bytes = 0;
    for layer in layers.iter().rev() {
        let here = present.contains(layer);
        if here
            && current(cp, layer, &target.id)
                .await
                .map_err(|e| e.message)?
        {
            continue;
        }
        if here {
            // (stale: see the module's comment)
            target
                .drop_template(layer)
                .await
                .map_err(|e| format!("removing its stale layer {layer}: {}", said(&e)))?;
        }
        bytes += copy_layer(layer, source, target).await?;
        cp.db
            .add_template_copy(layer, &target.id)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(bytes)
}

async fn templates(host: &HostConn) -> Result<Vec<pb::Template>, String> {
    host.rpc
        .list_templates(pb::Empty::default())
        .await
        .map(|l| l.into_owned().templates)
        .map_err(|e| format!("listing host {}'s templates: {}", host.id, said(&e)))
}

/// Whether the files of `layer` that host `target` has are current.
async fn current(cp: &Cp, layer: &str, target: &HostId) -> ApiResult<bool> {
    let homes = cp.db.template_homes(layer).await?;
    if homes.is_empty() {
        return Ok(layer.starts_with("s-"));
    }
    if homes.iter().any(|h| h.as_ref().is_none_or(|h| h == target)) {
        return Ok(true);
    }
    Ok(cp.db.template_copies(layer).await?.contains(target))
}

/// Stream one layer from `source`'s export into `target`'s import; its
/// size there. An export that fails part way cuts the import short,
/// which keeps nothing.
async fn copy_layer(name: &str, source: &HostConn, target: &HostConn) -> Result<u64, String> {
    let opts = || CallOptions::default().with_timeout(COPY_TIMEOUT);
    let what = pb::TemplateRef {
        name: name.to_owned(),
        ..Default::default()
    };
    let mut export = source
        .rpc
        .export_template_with_options(what, opts())
        .await
        .map_err(|e| format!("export of {name}: {}", said(&e)))?;
    let (tx, rx) = mpsc::channel::<pb::ImportTemplateRequest>(COPY_BUFFER);
    let first = pb::ImportTemplateRequest {
        name: name.to_owned(),
        ..Default::default()
    };
    let _ = tx.send(first).await;
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let import = target.rpc.import_template_with_options(requests, opts());
    tokio::pin!(import);
    let mut tx = Some(tx);
    let mut ended = false;
    loop {
        tokio::select! {
            done = &mut import => {
                return match done {
                    Ok(t) if ended => Ok(t.into_owned().size_bytes),
                    Ok(_) => Err(format!("import of {name} ended early")),
                    Err(e) => Err(format!("import of {name}: {}", said(&e))),
                };
            }
            piece = export.message::<pb::FileChunk>(), if tx.is_some() => {
                let msg = match piece {
                    Ok(Some(m)) => pb::ImportTemplateRequest {
                        data: m.to_owned_message().data,
                        ..Default::default()
                    },
                    Ok(None) => {
                        ended = true;
                        pb::ImportTemplateRequest {
                            end: true,
                            ..Default::default()
                        }
                    }
                    // (dropping the import's stream without `end` discards it)
                    Err(e) => return Err(format!("export of {name}: {}", said(&e))),
                };
                let sender = tx.take().expect("only polled while sending");
                if sender.send(msg).await.is_ok() && !ended {
                    tx = Some(sender);
                }
                // (else the import ended; its answer comes next round)
            }
        }
    }
}

fn said(e: &ConnectError) -> String {
    e.message
        .clone()
        .unwrap_or_else(|| e.code.as_str().to_owned())
}
