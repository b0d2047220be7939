//! Templates on more than one host. A template's files are made on one
//! host, the one its row names; `minimal` and `busybox`, whose rows name
//! none, are on every host or meant to be (each agent makes `busybox`;
//! `minimal` is made by `wrenn up`, so another host may lack it). A
//! capsule may be placed on any host ([`crate::hosts::Hosts::place`]): one
//! that lacks the template first gets a copy ([`ensure`]), streamed from a
//! host that has it through the control plane (the agents'
//! `ExportTemplate` and `ImportTemplate`), layer by layer from the bottom
//! of its stack, each recorded in `template_copies`. A template of every
//! host that a host lacks is copied to it ahead of any capsule, in the
//! background, when the reconciler finds it missing there ([`prewarm`]).
//!
//! A host's files of a layer are current when a row names that layer on
//! every host or on that one, when a copy row says so, or, for a
//! snapshot's layer (`s-…`, a name never reused) that no row names any
//! more, when they are there at all. Other files of that name are stale
//! (left by a host that was deleted and registered again): they are
//! replaced. Deleting a template removes its copies, and is refused while
//! any host that has it is away or stacks another template on it, so a
//! name built again never meets old files that a current one stands on.

use std::sync::Arc;
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
/// How long a host whose copy of a template failed is passed over for
/// that template's capsules.
const RETRY_AFTER: Duration = Duration::from_secs(300);

/// The hosts that a copy of host-side template `agent_name` failed to
/// reach within [`RETRY_AFTER`] (placement passes them over: a create
/// should not wait for a copy that will likely fail again).
pub fn avoided(cp: &Cp, agent_name: &str) -> Vec<HostId> {
    let mut failures = cp.copy_failures.lock().unwrap();
    failures.retain(|_, at| at.elapsed() < RETRY_AFTER);
    failures
        .keys()
        .filter(|(name, _)| name == agent_name)
        .map(|(_, host)| host.clone())
        .collect()
}

/// The hosts that have template `t`'s files, the one that made them
/// first; None when every host has them (or should).
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

/// Give `target` template `t`'s files unless it has them (`holders` as
/// [`holders`] found them), copied from a host that has them: one of
/// `holders`, or for a template of every host, any (this process's own
/// first). Each layer is copied to a host once at a time; a copy that
/// waited for another's finds it made.
pub async fn ensure(
    cp: &Cp,
    t: &TemplateRow,
    holders: Option<&[HostId]>,
    target: &HostConn,
) -> ApiResult<()> {
    if holders.is_some_and(|h| h.contains(&target.id))
        || cp
            .db
            .template_copies(&t.agent_name)
            .await?
            .contains(&target.id)
    {
        return Ok(());
    }
    let sources: Vec<Arc<HostConn>> = match holders {
        Some(hs) => hs.iter().filter_map(|h| cp.hosts.get(h)).collect(),
        None => {
            let own = cp.local_agent.get().map(|(h, _)| h.clone());
            let mut all = cp.hosts.all();
            all.retain(|h| h.id != target.id);
            all.sort_by_key(|h| Some(&h.id) != own.as_ref());
            all
        }
    };
    let t0 = std::time::Instant::now();
    let copied = copy_stack(cp, &t.agent_name, &sources, target).await;
    if copied.is_ok() {
        // (another copy's failure no longer holds)
        let key = (t.agent_name.clone(), target.id.clone());
        cp.copy_failures.lock().unwrap().remove(&key);
    }
    match copied {
        Ok(0) => Ok(()),
        Ok(bytes) => {
            tracing::info!(template = %t.name, to = %target.id, bytes,
                ms = t0.elapsed().as_millis() as u64, "copied a template");
            Ok(())
        }
        Err(failed) => {
            let e = match failed {
                // (nothing is wrong with the target: it is not passed over)
                Failed::NoSource => "no connected host has it".to_owned(),
                Failed::Copy(e) => {
                    cp.copy_failures.lock().unwrap().insert(
                        (t.agent_name.clone(), target.id.clone()),
                        std::time::Instant::now(),
                    );
                    e
                }
            };
            Err(ApiError::host_unavailable(format!(
                "cannot copy template {} to host {}: {e}",
                t.name, target.id
            )))
        }
    }
}

/// Copy the templates of every host that `host` lacks (`listed` is its
/// list of templates) to it in the background, so that a capsule placed
/// there does not wait for them: `minimal` on a host that `wrenn up` did
/// not make it on. One copy per template and host at a time; a host whose
/// copy failed lately is left alone until placement would try it again
/// ([`avoided`]). Cut off when the control plane stops.
pub async fn prewarm(cp: &Cp, host: &Arc<HostConn>, listed: &[pb::Template]) {
    let rows = match cp.db.everywhere_templates().await {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, "prewarm: database"),
    };
    for t in rows {
        if listed.iter().any(|l| l.name == t.agent_name)
            || avoided(cp, &t.agent_name).contains(&host.id)
        {
            continue;
        }
        if cp
            .prewarming
            .is_claimed(&(t.agent_name.clone(), host.id.clone()))
        {
            continue; // (under way)
        }
        let (cp, host) = (cp.arc(), host.clone());
        cp.clone().tasks.spawn(async move {
            let Some(_under_way) = cp.prewarming.claim((t.agent_name.clone(), host.id.clone()))
            else {
                return; // (another round's, since)
            };
            tracing::info!(template = %t.name, to = %host.id, "copying a template of every host");
            tokio::select! {
                r = ensure(&cp, &t, None, &host) => if let Err(e) = r {
                    tracing::warn!(template = %t.name, to = %host.id, error = %e.message,
                        "cannot copy a template of every host");
                },
                () = cp.stop.cancelled() => {}
            }
        });
    }
}

/// Why [`copy_stack`] failed.
enum Failed {
    /// No connected host has the template.
    NoSource,
    /// Copying it to the target failed.
    Copy(String),
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Copy(e)
    }
}

/// Copy `top` and the layers under it that `target` lacks from the first
/// of `sources` that has it; the bytes copied.
async fn copy_stack(
    cp: &Cp,
    top: &str,
    sources: &[Arc<HostConn>],
    target: &HostConn,
) -> Result<u64, Failed> {
    // (a template of every host that is there already needs no source)
    if has(target, top).await? && current(cp, top, &target.id).await? {
        record(cp, top, &target.id).await?;
        return Ok(0);
    }
    let mut found = None;
    for s in sources {
        match templates(s).await {
            Ok(list) => {
                if let Some(t) = list.into_iter().find(|t| t.name == top) {
                    found = Some((s, t.layers));
                    break;
                }
            }
            Err(e) => tracing::debug!(host = %s.id, error = %e, "not a copy source now"),
        }
    }
    let (source, layers) = found.ok_or(Failed::NoSource)?;
    let _held = Held::new(cp, &layers, &target.id);
    let mut bytes = 0;
    for layer in layers.iter().rev() {
        let _one = cp.copying.lock(&(layer.clone(), target.id.clone())).await;
        // (asked under the lock: a copy that held it may have made it)
        let here = has(target, layer).await?;
        if here && current(cp, layer, &target.id).await? {
            record(cp, layer, &target.id).await?;
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
        tracing::debug!(layer, from = %source.id, to = %target.id, "copied a layer");
        record(cp, layer, &target.id).await?;
    }
    Ok(bytes)
}

/// Whether `layer` is part of a stack being copied to `host`: a layer
/// copied there first has nothing standing on it yet, and must stay until
/// the layers above it arrive.
pub fn being_copied(cp: &Cp, layer: &str, host: &HostId) -> bool {
    cp.in_copy
        .lock()
        .unwrap()
        .contains_key(&(layer.to_owned(), host.clone()))
}

/// A stack's layers marked as being copied to a host, until dropped.
struct Held<'a> {
    cp: &'a Cp,
    keys: Vec<(String, HostId)>,
}

impl<'a> Held<'a> {
    fn new(cp: &'a Cp, layers: &[String], host: &HostId) -> Self {
        let keys: Vec<_> = layers.iter().map(|l| (l.clone(), host.clone())).collect();
        let mut held = cp.in_copy.lock().unwrap();
        for k in &keys {
            *held.entry(k.clone()).or_default() += 1;
        }
        Held { cp, keys }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.cp.in_copy.lock().unwrap();
        for k in &self.keys {
            if let Some(n) = held.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    held.remove(k);
                }
            }
        }
    }
}

async fn record(cp: &Cp, layer: &str, host: &HostId) -> Result<(), String> {
    cp.db
        .add_template_copy(layer, host)
        .await
        .map_err(|e| e.to_string())
}

async fn templates(host: &HostConn) -> Result<Vec<pb::Template>, String> {
    host.rpc
        .list_templates(pb::Empty::default())
        .await
        .map(|l| l.into_owned().templates)
        .map_err(|e| format!("listing host {}'s templates: {}", host.id, said(&e)))
}

async fn has(host: &HostConn, name: &str) -> Result<bool, String> {
    Ok(templates(host).await?.iter().any(|t| t.name == name))
}

/// Whether the files of `layer` that host `target` has are current.
async fn current(cp: &Cp, layer: &str, target: &HostId) -> Result<bool, String> {
    let db = |e: crate::db::DbError| e.to_string();
    let homes = cp.db.template_homes(layer).await.map_err(db)?;
    if homes.is_empty() {
        return Ok(layer.starts_with("s-"));
    }
    if homes.iter().any(|h| h.as_ref().is_none_or(|h| h == target)) {
        return Ok(true);
    }
    Ok(cp
        .db
        .template_copies(layer)
        .await
        .map_err(db)?
        .contains(target))
}

/// Stream one layer from `source`'s export into `target`'s import; its
/// size there. An export that fails part way cuts the import short,
/// which keeps nothing; an import that fails stops the export.
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
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    // Both halves polled together: the import takes what the pump sends.
    // The pump's end drops `tx`: after `end`, the stream is complete; after
    // an error, without `end`, the import discards what it has.
    let pump = async move {
        let mut msg = pb::ImportTemplateRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        loop {
            match export.message::<pb::FileChunk>().await {
                Ok(Some(m)) => msg.data = m.to_owned_message().data,
                Ok(None) => msg.end = true,
                Err(e) => return Err(format!("export of {name}: {}", said(&e))),
            }
            let end = msg.end;
            if tx.send(std::mem::take(&mut msg)).await.is_err() || end {
                return Ok(()); // (or the import ended: its answer says why)
            }
        }
    };
    let import = target.rpc.import_template_with_options(requests, opts());
    let (pumped, imported) = tokio::join!(pump, import);
    pumped?;
    imported
        .map(|t| t.into_owned().size_bytes)
        .map_err(|e| format!("import of {name}: {}", said(&e)))
}

fn said(e: &ConnectError) -> String {
    e.message
        .clone()
        .unwrap_or_else(|| e.code.as_str().to_owned())
}
