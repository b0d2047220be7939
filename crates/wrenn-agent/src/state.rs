//! The capsule state machine: which operation is legal in which state, and
//! what state it leads to. Every front end asks here; handlers never
//! compare states themselves.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapsuleState {
    Pending,
    Starting,
    Running,
    Paused,
    Hibernated,
    Stopped,
    Error,
}

impl CapsuleState {
    pub fn as_str(self) -> &'static str {
        match self {
            CapsuleState::Pending => "pending",
            CapsuleState::Starting => "starting",
            CapsuleState::Running => "running",
            CapsuleState::Paused => "paused",
            CapsuleState::Hibernated => "hibernated",
            CapsuleState::Stopped => "stopped",
            CapsuleState::Error => "error",
        }
    }
}

impl std::fmt::Display for CapsuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can be asked of a capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Boot a new capsule.
    Start,
    /// Exec, files, PTY, ping, metrics: anything that talks to envd.
    Use,
    Pause,
    Resume,
    Hibernate,
    Snapshot,
    Destroy,
}

impl Op {
    pub fn verb(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Use => "use",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Hibernate => "hibernate",
            Op::Snapshot => "snapshot",
            Op::Destroy => "destroy",
        }
    }
}

/// Refusal: `op` is not allowed in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Illegal {
    pub op: Op,
    pub state: CapsuleState,
}

/// The state `op` leaves a capsule in, if it is allowed from `from`.
pub fn transition(from: CapsuleState, op: Op) -> Result<CapsuleState, Illegal> {
    use CapsuleState::*;
    let to = match (op, from) {
        (Op::Start, Pending) => Running,
        (Op::Use, Running) => Running,
        (Op::Pause, Running) => Paused,
        (Op::Resume, Paused | Hibernated) => Running,
        (Op::Hibernate, Running | Paused) => Hibernated,
        (Op::Snapshot, Running | Paused) => Paused,
        (Op::Destroy, _) => Stopped,
        _ => return Err(Illegal { op, state: from }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CapsuleState::*;

    const ALL: [CapsuleState; 7] = [
        Pending, Starting, Running, Paused, Hibernated, Stopped, Error,
    ];
    const OPS: [Op; 7] = [
        Op::Start,
        Op::Use,
        Op::Pause,
        Op::Resume,
        Op::Hibernate,
        Op::Snapshot,
        Op::Destroy,
    ];

    #[test]
    fn the_whole_table() {
        let legal: Vec<(Op, CapsuleState, CapsuleState)> = OPS
            .iter()
            .flat_map(|op| {
                ALL.iter()
                    .filter_map(move |s| transition(*s, *op).ok().map(|t| (*op, *s, t)))
            })
            .collect();
        let expected = vec![
            (Op::Start, Pending, Running),
            (Op::Use, Running, Running),
            (Op::Pause, Running, Paused),
            (Op::Resume, Paused, Running),
            (Op::Resume, Hibernated, Running),
            (Op::Hibernate, Running, Hibernated),
            (Op::Hibernate, Paused, Hibernated),
            (Op::Snapshot, Running, Paused),
            (Op::Snapshot, Paused, Paused),
        ]
        .into_iter()
        .chain(ALL.iter().map(|s| (Op::Destroy, *s, Stopped)))
        .collect::<Vec<_>>();
        assert_eq!(legal, expected);
        assert_eq!(
            transition(Paused, Op::Use),
            Err(Illegal {
                op: Op::Use,
                state: Paused
            })
        );
        assert_eq!(
            serde_json::to_string(&Hibernated).unwrap(),
            "\"hibernated\""
        );
    }
}
