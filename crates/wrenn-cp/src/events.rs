//! Events: what happened to capsules and templates, published to the
//! team's SSE subscribers (`GET /v1/events/stream`).
//!
//! One broadcast channel carries every team's events; each subscriber
//! filters by team. Slow subscribers lose events (the channel keeps the
//! last [`BUFFER`]; a lagging receiver skips ahead) — the stream never
//! blocks publishers. Only the event names the SDK's enum knows are ever
//! sent; the first frame is `connected`, then `: keepalive` every 30 s.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Serialize;
use tokio::sync::broadcast;
use wrenn_types::ids::TeamId;

use crate::auth::Caller;
use crate::db::now_ms;
use crate::model::{rfc3339, CapsuleJson};
use crate::server::Cp;

pub const BUFFER: usize = 256;

/// The event names of the SDK's enum (nothing else may be sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    CapsuleCreate,
    CapsulePause,
    CapsuleResume,
    CapsuleDestroy,
    CapsuleStateChanged,
    SnapshotCreate,
    SnapshotDelete,
    HostUp,
    HostDown,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CapsuleCreate => "capsule.create",
            Kind::CapsulePause => "capsule.pause",
            Kind::CapsuleResume => "capsule.resume",
            Kind::CapsuleDestroy => "capsule.destroy",
            Kind::CapsuleStateChanged => "capsule.state.changed",
            Kind::SnapshotCreate => "template.snapshot.create",
            Kind::SnapshotDelete => "template.snapshot.delete",
            Kind::HostUp => "host.up",
            Kind::HostDown => "host.down",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Actor {
    pub fn system() -> Actor {
        Actor {
            kind: "system",
            id: None,
            name: None,
        }
    }

    pub fn key(caller: &Caller) -> Actor {
        Actor {
            kind: "api_key",
            id: Some(caller.key.id.to_string()),
            name: Some(caller.key.name.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    pub timestamp: String,
    pub team_id: String,
    pub actor: Actor,
    pub resource: Resource,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sandbox: Option<CapsuleJson>,
}

impl Event {
    pub fn new(kind: Kind, team: &TeamId, actor: Actor, resource: Resource) -> Event {
        Event {
            event: kind.as_str(),
            outcome: None,
            timestamp: rfc3339(now_ms()),
            team_id: team.to_string(),
            actor,
            resource,
            metadata: BTreeMap::new(),
            error: None,
            sandbox: None,
        }
    }

    /// An action's result: success, or error with its message.
    pub fn outcome(mut self, result: Result<(), String>) -> Event {
        match result {
            Ok(()) => self.outcome = Some("success"),
            Err(e) => {
                self.outcome = Some("error");
                self.error = Some(e);
            }
        }
        self
    }

    pub fn meta(mut self, k: &str, v: impl Into<String>) -> Event {
        self.metadata.insert(k.to_owned(), v.into());
        self
    }

    pub fn capsule(mut self, c: CapsuleJson) -> Event {
        self.sandbox = Some(c);
        self
    }
}

#[derive(Debug)]
pub struct Broker {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            tx: broadcast::channel(BUFFER).0,
        }
    }
}

impl Broker {
    pub fn publish(&self, e: Event) {
        // No subscriber is not an error.
        let _ = self.tx.send(Arc::new(e));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

/// `GET /v1/events/stream`
pub async fn stream(
    State(cp): State<Arc<Cp>>,
    caller: Caller,
) -> impl axum::response::IntoResponse {
    let team = caller.team.id.to_string();
    let rx = cp.events.subscribe();
    let first = SseEvent::default()
        .event("connected")
        .data(r#"{"event":"connected","message":"connected"}"#);
    let events = futures::stream::unfold((rx, team), |(mut rx, team)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if e.team_id == team => {
                    let data = serde_json::to_string(&*e).unwrap_or_default();
                    let ev = SseEvent::default().event(e.event).data(data);
                    return Some((Ok(ev), (rx, team)));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let all = futures::StreamExt::chain(
        futures::stream::once(async { Ok::<_, Infallible>(first) }),
        events,
    );
    let sse: Sse<_> = Sse::new(all).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(30))
            .text("keepalive"),
    );
    // proxies in front (nginx) must not buffer the stream
    ([("x-accel-buffering", "no")], sse)
}
