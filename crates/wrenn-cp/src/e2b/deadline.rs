//! E2B's timeouts: a sandbox's `endAt` is absolute, and when it passes
//! the sandbox is killed (or paused, with `autoPause` / `lifecycle.
//! on_timeout = "pause"`). The control plane keeps these deadlines — the
//! agent's own TTL is an inactivity timer — checking once a second and
//! whenever a timeout is set; deadlines that passed while it was down are
//! acted on at start.

use std::sync::Arc;
use std::time::Duration;

use crate::api::capsules;
use crate::db::{now_ms, CapsuleRow, OnTimeout};
use crate::error::ApiResult;
use crate::events::Actor;
use crate::model::Status;
use crate::server::Cp;

const TICK: Duration = Duration::from_secs(1);

/// Act on every deadline that has passed.
pub async fn enforce(cp: &Cp) {
    let due = match cp.db.capsules_due(now_ms()).await {
        Ok(d) => d,
        Err(e) => return tracing::warn!(error = %e, "cannot read capsule deadlines"),
    };
    for c in due {
        if cp.creating.lock().unwrap().contains(&c.id) {
            continue;
        }
        if let Err(e) = expire(cp, &c).await {
            tracing::warn!(capsule = %c.id, error = %e.message, "timeout not applied; retrying");
        }
    }
}

/// Kill or pause `c`, if its deadline has still passed as read under its
/// lifecycle lock (a `connect` or `set_timeout` may have moved it since).
async fn expire(cp: &Cp, c: &CapsuleRow) -> ApiResult<()> {
    let _lock = cp.lifecycle.lock(&c.id).await;
    let Some(c) = capsules::reread(cp, c).await? else {
        return Ok(());
    };
    if c.status != Status::Running || c.end_at.is_none_or(|e| e > now_ms()) {
        return Ok(());
    }
    tracing::info!(capsule = %c.id, on_timeout = c.on_timeout.as_str(), "timeout reached");
    let what = match c.on_timeout {
        OnTimeout::Kill => "timeout reached: killing the sandbox",
        OnTimeout::Pause => "timeout reached: pausing the sandbox",
    };
    capsules::log(cp, &c.id, "warn", what).await;
    match c.on_timeout {
        OnTimeout::Kill => capsules::destroy_locked(cp, &c, Actor::system()).await,
        OnTimeout::Pause => {
            let host = crate::api::host_of(cp, &c)?;
            capsules::pause_locked(cp, &c, &host, Actor::system())
                .await
                .map(drop)
        }
    }
}

/// The loop (a task on `Cp::tasks`, ended by `Cp::stop`).
pub async fn run(cp: Arc<Cp>) {
    loop {
        enforce(&cp).await;
        tokio::select! {
            _ = cp.stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
            _ = cp.e2b.deadlines.notified() => {}
        }
    }
}
