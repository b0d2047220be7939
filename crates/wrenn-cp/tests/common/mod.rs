//! What the control plane's test binaries share.

use std::collections::BTreeMap;

use wrenn_cp::db::{CapsuleRow, OnTimeout};
use wrenn_cp::model::Status;
use wrenn_types::ids::{CapsuleId, HostId, TeamId};

/// A 1-vCPU `minimal` capsule row of `team` in `status`, created (and last
/// updated) at `now`, with no metadata, token or deadline.
pub fn capsule_row(team: &TeamId, host: Option<&HostId>, status: Status, now: i64) -> CapsuleRow {
    CapsuleRow {
        id: CapsuleId::random(),
        team_id: team.clone(),
        host_id: host.cloned(),
        template: "minimal".into(),
        agent_template: "minimal".into(),
        status,
        vcpus: 1,
        memory_mb: 512,
        timeout_sec: 0,
        disk_size_mb: 5120,
        metadata: BTreeMap::new(),
        created_at: now,
        started_at: None,
        last_active_at: None,
        last_updated: now,
        access_token: String::new(),
        end_at: None,
        on_timeout: OnTimeout::Kill,
        allow_internet: None,
        created_by: None,
    }
}
