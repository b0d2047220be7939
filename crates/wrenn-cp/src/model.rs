//! What the API speaks: the capsule status enum and the JSON shapes the
//! wrenn SDK parses (`specs/wrenn-api.md` §2), built from database rows.
//! Enums are closed sets (the SDK's pydantic models reject anything
//! else); times are RFC 3339 UTC with `Z`, never empty strings.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::db::{CapsuleRow, TemplateRow};

/// A capsule's status, exactly the SDK's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    Starting,
    Running,
    Pausing,
    Paused,
    Snapshotting,
    Resuming,
    Stopping,
    Hibernated,
    Stopped,
    Missing,
    Error,
}

impl Status {
    pub const ALL: [Status; 12] = [
        Status::Pending,
        Status::Starting,
        Status::Running,
        Status::Pausing,
        Status::Paused,
        Status::Snapshotting,
        Status::Resuming,
        Status::Stopping,
        Status::Hibernated,
        Status::Stopped,
        Status::Missing,
        Status::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Pausing => "pausing",
            Status::Paused => "paused",
            Status::Snapshotting => "snapshotting",
            Status::Resuming => "resuming",
            Status::Stopping => "stopping",
            Status::Hibernated => "hibernated",
            Status::Stopped => "stopped",
            Status::Missing => "missing",
            Status::Error => "error",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

/// Unix milliseconds as RFC 3339 UTC to the second (`2026-11-30T01:02:03Z`).
pub fn rfc3339(ms: i64) -> String {
    format_ms(ms, false)
}

/// The same with milliseconds (`2026-11-30T01:02:03.456Z`), for log lines.
pub fn rfc3339_millis(ms: i64) -> String {
    format_ms(ms, true)
}

fn format_ms(ms: i64, millis: bool) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let t = if millis {
        t
    } else {
        t.replace_nanosecond(0).unwrap_or(t)
    };
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The capsule object (create, get, list, pause, resume, SSE events).
#[derive(Debug, Clone, Serialize)]
pub struct CapsuleJson {
    pub id: String,
    pub status: &'static str,
    pub template: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub timeout_sec: i64,
    pub disk_size_mb: i64,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<String>,
    pub last_updated: String,
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_used_mb: Option<i64>,
}

impl From<&CapsuleRow> for CapsuleJson {
    fn from(c: &CapsuleRow) -> Self {
        CapsuleJson {
            id: c.id.to_string(),
            status: c.status.as_str(),
            template: c.template.clone(),
            vcpus: c.vcpus,
            memory_mb: c.memory_mb,
            timeout_sec: c.timeout_sec,
            disk_size_mb: c.disk_size_mb,
            created_at: rfc3339(c.created_at),
            started_at: c.started_at.map(rfc3339),
            last_active_at: c.last_active_at.map(rfc3339),
            last_updated: rfc3339(c.last_updated),
            metadata: Some(c.metadata.clone()),
            disk_used_mb: None,
        }
    }
}

/// The template object (`/v1/snapshots`).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateJson {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub size_bytes: i64,
    pub created_at: String,
    pub platform: bool,
    pub protected: bool,
    pub metadata: BTreeMap<String, String>,
}

impl From<&TemplateRow> for TemplateJson {
    fn from(t: &TemplateRow) -> Self {
        TemplateJson {
            name: t.name.clone(),
            kind: t.kind.clone(),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            size_bytes: t.size_bytes,
            created_at: rfc3339(t.created_at),
            platform: t.team_id == crate::db::platform_team(),
            protected: t.protected,
            metadata: t.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_nothing_else_parses() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert!("unknown".parse::<Status>().is_err());
        assert!("Running".parse::<Status>().is_err());
    }

    #[test]
    fn times_are_rfc3339_utc_with_z() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000_123), "2026-11-30T00:53:20Z");
        assert_eq!(
            rfc3339_millis(1_796_000_000_123),
            "2026-11-30T00:53:20.123Z"
        );
    }
}
