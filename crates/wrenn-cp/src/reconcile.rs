//! Truth: the agents own capsules, the database records them. The
//! reconciler compares the two at start and every `reconcile_interval`:
//!
//! - a capsule the agent reports in another state takes the agent's state
//!   (auto-paused by the TTL reaper → `paused`, event `capsule.pause` with
//!   `reason: ttl_expired`);
//! - a capsule the agent no longer has becomes `stopped` (`reason:
//!   orphaned`); one it has whose create never finished (the agent
//!   crashed, the answer was lost, a restart cut it off; never `running`)
//!   is destroyed (`reason: cleanup_after_create_error`); one it has that
//!   the database calls stopped is destroyed (a destroy that failed half
//!   way).
//!
//! Liveness is the host monitor's ([`monitor`]): every
//! `host_monitor_interval` (15 s), a host with no sign of life for
//! `host_heartbeat_timeout` (90 s) becomes `unreachable` and its running,
//! starting and pending capsules `missing` (`reason: host_failure`). A sign
//! of life is an agent's heartbeat or a call the reconciler got through; one
//! failed call is not one (a capsule the SDK sees `missing` fails its
//! waits, so a timeout under load must not make it so). The first heartbeat
//! after that reconciles the host at once: what it still runs is `running`
//! again, what it no longer has `stopped`. So does the first heartbeat over
//! a new connection ([`host_joined`]: a host that registered, or whose
//! agent restarted on another address), which also starts the copies of
//! the templates of every host to a host that lacks them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::ids::{CapsuleId, HostId};

use crate::api::capsules::{capsule_event, cref};
use crate::db::{now_ms, CapsuleRow};
use crate::events::{Actor, Event, Kind, Resource};
use crate::hosts::HostConn;
use crate::model::Status;
use crate::server::Cp;

/// How long the reconciler waits for a host's list of capsules.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an auto-pause report waits for its agent's word (the agent
/// waits for the answer).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// The status the API shows for an agent state (`hibernated` is shown as
/// `paused`: the SDK only resumes paused capsules).
pub fn status_of(agent_state: &str) -> Status {
    match agent_state {
        "running" => Status::Running,
        "paused" | "hibernated" => Status::Paused,
        "pending" | "starting" => Status::Starting,
        "stopped" => Status::Stopped,
        _ => Status::Error,
    }
}

async fn set(cp: &Cp, c: &CapsuleRow, to: Status, reason: &str) {
    if c.status == to {
        return;
    }
    match cp.db.transition(&c.id, &[c.status], to).await {
        Ok(Some(row)) => {
            tracing::info!(capsule = %c.id, from = %c.status, to = %to, reason, "reconciled");
            crate::api::capsules::log(cp, &c.id, "warn", format!("{} → {to} ({reason})", c.status))
                .await;
            if matches!(to, Status::Stopped | Status::Paused) {
                cp.proxy_routes.evict(&c.id);
            }
            let kind = match (c.status, to) {
                (Status::Running, Status::Paused) => Kind::CapsulePause,
                (_, Status::Stopped) => Kind::CapsuleDestroy,
                _ => Kind::CapsuleStateChanged,
            };
            let ev = capsule_event(kind, &row, Actor::system())
                .meta("reason", reason)
                .meta("from", c.status.as_str())
                .meta("to", to.as_str());
            let ev = if kind == Kind::CapsuleStateChanged {
                ev
            } else {
                ev.outcome(Ok(()))
            };
            cp.events.publish(ev);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(capsule = %c.id, error = %e, "cannot record reconciled state"),
    }
}

/// Bring one capsule in line with its agent (after the agent refused an
/// operation because of the capsule's state).
pub async fn refresh_capsule(cp: &Cp, host: &HostConn, c: &CapsuleRow) {
    match host.rpc.get_capsule(cref(&c.id)).await {
        Ok(info) => {
            let info = info.into_owned();
            set(cp, c, status_of(&info.state), "agent_state").await;
        }
        Err(e) if e.code == connectrpc::ErrorCode::NotFound => {
            set(cp, c, Status::Stopped, "orphaned").await;
        }
        Err(e) => tracing::debug!(capsule = %c.id, error = %e, "cannot refresh"),
    }
}

/// A host's capsules, as its agent lists them (waiting [`LIST_TIMEOUT`]
/// at most).
async fn list(host: &HostConn) -> Result<pb::ListCapsulesResponse, String> {
    let asked = host.rpc.list_capsules(pb::ListCapsulesRequest::default());
    match tokio::time::timeout(LIST_TIMEOUT, asked).await {
        Ok(Ok(l)) => Ok(l.into_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {LIST_TIMEOUT:?}")),
    }
}

/// Whether `c` is a build capsule of this control plane (by its
/// [`Cp::identity`], so also one from before a restart) whose build does
/// not run now.
fn is_abandoned_build(cp: &Cp, c: &CapsuleRow) -> bool {
    c.metadata.contains_key(crate::build::BUILD_KEY)
        && c.metadata
            .get(crate::build::BUILD_OWNER_KEY)
            .is_none_or(|owner| owner == cp.identity())
        && !cp.creating.lock().unwrap().contains(&c.id)
        && !cp.builds.lock().unwrap().values().any(|b| *b == c.id)
}

/// How long a create of another control plane sharing the database may
/// last before its row, `starting` and not on its host yet, is taken for
/// cut off (that control plane stopped): a create waits for its host's
/// copy of the template, up to 10 minutes a layer.
const FOREIGN_CREATE_GRACE: Duration = Duration::from_secs(30 * 60);

/// Whether `c` is a create still in flight: in this process, or not
/// started yet by another control plane, within [`FOREIGN_CREATE_GRACE`]
/// (a row from before migration 10 names none and is this one's).
fn create_in_flight(cp: &Cp, c: &CapsuleRow) -> bool {
    cp.creating.lock().unwrap().contains(&c.id)
        || (c.status == Status::Starting
            && c.started_at.is_none()
            && c.created_by
                .as_deref()
                .is_some_and(|by| by != cp.identity())
            && now_ms() - c.created_at < FOREIGN_CREATE_GRACE.as_millis() as i64)
}

/// Reconcile one host.
pub async fn reconcile_host(cp: &Cp, host: &HostConn) {
    let rows = match cp.db.capsules_on(&host.id).await {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, "reconcile: database"),
    };
    let listed = match list(host).await {
        Ok(l) => l,
        Err(e) => return tracing::warn!(host = %host.id, error = %e, "reconcile: no answer"),
    };
    host.reconciled.store(true, Ordering::Relaxed);
    if let Ok(true) = cp.db.heartbeat(&host.id).await {
        host_event(cp, Kind::HostUp, &host.id).await;
    }
    let auto_paused: Vec<&str> = listed.auto_paused_ids.iter().map(String::as_str).collect();
    let on_agent: HashMap<&str, &pb::Capsule> =
        listed.capsules.iter().map(|c| (c.id.as_str(), c)).collect();
    for c in &rows {
        match on_agent.get(c.id.as_str()) {
            // A destroy that did not finish (the control plane stopped
            // in the middle): finish it.
            Some(_) if c.status == Status::Stopping => match host.destroy(&c.id).await {
                Ok(()) => set(cp, c, Status::Stopped, "destroy_finished").await,
                Err(e) => {
                    tracing::warn!(capsule = %c.id, error = %e, "cannot finish a destroy")
                }
            },
            // A create that never finished: its caller was told it failed
            // (the agent crashed or the answer was lost), or the control
            // plane restarted before the answer came, and the host may have
            // been `missing` since. Nobody holds the ID, so whatever the
            // agent made of it (`error` after its own restart, `running` if
            // only the answer was lost) is undone.
            Some(_) if c.started_at.is_none() && !create_in_flight(cp, c) => {
                // (read again: a create that ended since the rows were read
                // has started it, and is out of `creating` only after that)
                let fresh = match cp.db.capsule_any(&c.id).await {
                    Ok(Some(f)) if f.started_at.is_none() && f.status != Status::Stopped => f,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(capsule = %c.id, error = %e, "reconcile: database");
                        continue;
                    }
                };
                if let Err(e) = host.destroy(&c.id).await {
                    tracing::warn!(capsule = %c.id, error = %e, "cannot clean up a cut-off create");
                    continue;
                }
                set(cp, &fresh, Status::Stopped, "cleanup_after_create_error").await;
            }
            // A create in flight whose agent has made the capsule: the
            // create moves the row on (taking it to `running` here would
            // make the create's own step find it gone).
            Some(_) if create_in_flight(cp, c) => {}
            // A build capsule whose build no longer runs (cut off by a
            // restart): nobody will finish or destroy it.
            Some(_) if is_abandoned_build(cp, c) => {
                if let Err(e) = host.destroy(&c.id).await {
                    tracing::warn!(capsule = %c.id, error = %e, "cannot destroy an abandoned build capsule");
                    continue;
                }
                set(cp, c, Status::Stopped, "build_abandoned").await;
            }
            // Gone while the host was down (its agent found no process):
            // stopped, and what it still holds on the host is freed.
            Some(a) if status_of(&a.state) == Status::Stopped => {
                if let Err(e) = host.destroy(&c.id).await {
                    tracing::warn!(capsule = %c.id, error = %e, "cannot free a stopped capsule")
                }
                set(cp, c, Status::Stopped, "capsule_gone").await;
            }
            Some(a) => {
                let to = status_of(&a.state);
                let reason = if auto_paused.contains(&c.id.as_str()) && to == Status::Paused {
                    "ttl_expired"
                } else {
                    "agent_state"
                };
                set(cp, c, to, reason).await;
            }
            // A create in flight has a row before the agent has the capsule.
            None if create_in_flight(cp, c) => {}
            None => set(cp, c, Status::Stopped, "orphaned").await,
        }
    }
    // Capsules the agent has that the database has stopped (or never
    // finished recording) are destroyed.
    for a in &listed.capsules {
        let Ok(id) = a.id.parse::<CapsuleId>() else {
            continue;
        };
        let known = rows.iter().any(|c| c.id == id);
        if !known {
            match cp.db.capsule_any(&id).await {
                Ok(Some(c)) if c.status != Status::Stopped => continue,
                Ok(_) => {}
                Err(_) => continue,
            }
            tracing::info!(capsule = %id, "destroying a capsule the database does not keep");
            if let Err(e) = host.destroy(&id).await {
                tracing::warn!(capsule = %id, error = %e, "cannot destroy orphan");
            }
        }
    }
    let templates = match host.rpc.list_templates(pb::Empty::default()).await {
        Ok(l) => l.into_owned().templates,
        Err(e) => {
            return tracing::debug!(host = %host.id, error = %e, "reconcile: no template list")
        }
    };
    // (still connected: not deleted meanwhile)
    let Some(here) = cp.hosts.get(&host.id) else {
        return;
    };
    collect_orphan_layers(cp, &here, &templates).await;
    crate::copies::prewarm(cp, &here, &templates).await;
}

/// Team snapshots' layers on `host` that no template names (deleted while
/// the host was down, or a snapshot whose recording failed), older than
/// [`CpConfig::orphan_layer_grace`](crate::config::CpConfig): deleted, once
/// no capsule uses them (the agent also refuses while another template
/// stands on them).
async fn collect_orphan_layers(cp: &Cp, host: &Arc<HostConn>, listed: &[pb::Template]) {
    let before = now_ms() / 1000 - cp.config.orphan_layer_grace.as_secs() as i64;
    for t in listed {
        if !t.name.starts_with("s-") || t.created_at > before || cp.snapshotting.is_claimed(&t.name)
        {
            continue;
        }
        // (on this host only: the same layer elsewhere may be younger, a
        // copy arriving under a template not copied yet)
        if let Ok(false) = cp.db.template_named_on_host(&t.name).await {
            tracing::info!(host = %host.id, template = %t.name, "collecting the layers of a deleted snapshot");
            crate::api::snapshots::collect_layers_on(cp, &t.name, std::slice::from_ref(host)).await;
        }
    }
}

/// Reconcile every host now, all at once (a host that hangs holds up no
/// other).
pub async fn reconcile_all(cp: &Cp) {
    let hosts = cp.hosts.all();
    futures::future::join_all(hosts.iter().map(|h| reconcile_host(cp, h))).await;
}

/// `host.up` or `host.down` for the admin team (hosts are the platform's).
async fn host_event(cp: &Cp, kind: Kind, host: &HostId) {
    if let Ok(Some(admin)) = cp.db.admin_team().await {
        let resource = Resource {
            id: host.to_string(),
            kind: "host",
        };
        let ev =
            Event::new(kind, &admin.id, Actor::system(), resource).meta("host_id", host.as_str());
        cp.events.publish(ev);
    }
}

/// A host heard from for the first time over its connection (it has just
/// registered, or its agent restarted on another address), or whose agent
/// says it restarted (on the same address): reconciled at
/// once, not at the next round, so that what changed while the agent was
/// down is shown and the templates of every host are copied to a new one.
pub async fn host_joined(cp: Arc<Cp>, id: HostId) {
    if let Some(host) = cp.hosts.get(&id) {
        tracing::info!(host = %id, address = %host.address, "reconciling a host that joined, moved or restarted");
        reconcile_host(&cp, &host).await;
    }
}

/// A heartbeat came from a host the monitor had marked unreachable: bring
/// its capsules back in line now rather than at the next round.
pub async fn host_revived(cp: Arc<Cp>, id: HostId) {
    tracing::info!(host = %id, "host is back");
    host_event(&cp, Kind::HostUp, &id).await;
    if let Some(host) = cp.hosts.get(&id) {
        reconcile_host(&cp, &host).await;
    }
}

/// Host `host`'s reaper paused `id` for its inactivity timeout: a running
/// capsule of that host is `paused` now (`capsule.pause`, reason
/// `ttl_expired`), unless its agent says it runs (a report can come late,
/// after the capsule was resumed; an agent that does not answer is taken
/// at its report). Anything else (another host's capsule, one already
/// paused or stopped) is left as it is.
pub async fn auto_paused(cp: &Cp, host: &HostId, id: &CapsuleId) {
    let c = match cp.db.capsule_any(id).await {
        Ok(Some(c)) if c.host_id.as_ref() == Some(host) && c.status == Status::Running => c,
        Ok(_) => return,
        Err(e) => return tracing::warn!(capsule = %id, error = %e, "cannot record an auto-pause"),
    };
    if let Some(conn) = cp.hosts.get(host) {
        let asked = conn.rpc.get_capsule(cref(id));
        if let Ok(Ok(info)) = tokio::time::timeout(CONFIRM_TIMEOUT, asked).await {
            if status_of(&info.into_owned().state) != Status::Paused {
                return; // resumed since
            }
        }
    }
    set(cp, &c, Status::Paused, "ttl_expired").await
}

/// `wrenn up`: what its own agent's reaper pauses, recorded as it happens
/// (a remote agent posts it: [`auto_paused`]).
pub async fn follow_auto_pauses(
    cp: Arc<Cp>,
    host: HostId,
    mut paused: tokio::sync::broadcast::Receiver<CapsuleId>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let next = tokio::select! {
            r = paused.recv() => r,
            () = cp.stop.cancelled() => return,
        };
        match next {
            Ok(id) => auto_paused(&cp, &host, &id).await,
            Err(RecvError::Lagged(_)) => {} // (the next reconciliation has them)
            Err(RecvError::Closed) => return,
        }
    }
}

/// The heartbeat of an agent that sends none of its own (`wrenn up`'s, in
/// the same process): every `every`, a call over its RPC; an answer is a
/// sign of life, as an agent's heartbeat is.
pub async fn heartbeat_for(cp: Arc<Cp>, id: HostId, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cp.stop.cancelled() => return,
        }
        let Some(host) = cp.hosts.get(&id) else {
            continue;
        };
        match list(&host).await {
            // (the list drains the agent's auto-pauses: a report lost is here)
            Ok(listed) => {
                for paused in &listed.auto_paused_ids {
                    if let Ok(c) = paused.parse::<CapsuleId>() {
                        auto_paused(&cp, &id, &c).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(host = %id, error = %e, "own agent: no answer");
                continue;
            }
        }
        match cp.db.heartbeat(&id).await {
            Ok(true) => host_revived(cp.clone(), id.clone()).await,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot record a heartbeat"),
        }
    }
}

/// One round of the host monitor: hosts silent since `timeout` ago become
/// `unreachable`, and their live capsules `missing` (those whose create is
/// still in flight are left to it: its answer settles them). Nobody is
/// judged before the monitor has watched for `timeout` (`watching_since`,
/// ms): a control plane that was down heard no heartbeats either.
pub async fn mark_silent_hosts(cp: &Cp, watching_since: i64) {
    let before = now_ms() - cp.config.host_heartbeat_timeout.as_millis() as i64;
    if before <= watching_since {
        return;
    }
    let silent = match cp.db.mark_silent_hosts(before).await {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "host monitor: database"),
    };
    for id in silent {
        tracing::warn!(host = %id, "host unreachable: no heartbeat within {:?}", cp.config.host_heartbeat_timeout);
        host_event(cp, Kind::HostDown, &id).await;
        let rows = match cp.db.capsules_on(&id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "host monitor: database");
                continue;
            }
        };
        let live = [Status::Running, Status::Starting, Status::Pending];
        for c in rows.iter().filter(|c| live.contains(&c.status)) {
            if !create_in_flight(cp, c) {
                set(cp, c, Status::Missing, "host_failure").await;
            }
        }
    }
}

/// The host monitor loop, until shutdown.
pub async fn monitor(cp: Arc<Cp>) {
    let since = now_ms();
    let mut tick = tokio::time::interval(cp.config.host_monitor_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => mark_silent_hosts(&cp, since).await,
            () = cp.stop.cancelled() => return,
        }
    }
}

/// The reconciler loop: now, then every interval until shutdown. Each
/// round first takes up the certificates other control planes revoked.
pub async fn run(cp: Arc<Cp>) {
    let mut tick = tokio::time::interval(cp.config.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = cp.reload_revocations().await {
                    tracing::warn!(error = %e, "cannot reload the revoked certificates");
                }
                reconcile_all(&cp).await
            }
            () = cp.stop.cancelled() => return,
        }
    }
}
