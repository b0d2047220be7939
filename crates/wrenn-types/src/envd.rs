//! envd's plain-HTTP contract (`shared/specs/e2b-compat.md` §4,
//! `shared/specs/wrenn-api.md` §7.1).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The port envd listens on inside every capsule.
pub const ENVD_PORT: u16 = 49983;

/// The E2B envd protocol level this envd implements; SDKs gate features on it
/// (`e2b-compat.md` §5.6), so control planes report it as `envdVersion`.
pub const ENVD_PROTOCOL_VERSION: &str = "0.6.13";

/// How much lower envd's nice value is than its workloads': the capsule's
/// own processes can then keep its CPUs busy without queueing envd's
/// answers (a terminal's echo, an exec's events) behind them. The agent
/// lowers it from outside (a container has no `CAP_SYS_NICE`), envd itself
/// where it may (in a VM); envd starts its children at its original value.
pub const ENVD_PRIORITY_BOOST: i32 = 5;

/// Header carrying the access token once `/init` set one.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// `GET /health` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
}

/// `POST /init` body. Every field is optional; unknown fields are ignored so
/// newer control planes can talk to older envds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    /// Set when non-empty, cleared when empty, left alone when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// Capsule metadata; each entry becomes an env var and a file under
    /// `/run/wrenn/` (`sandboxId` → `WRENN_SANDBOX_ID`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// RFC 3339 or unix seconds; an `/init` older than the last applied one
    /// is ignored (idempotency guard against reordered retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// `GET /metrics` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Unix seconds.
    pub ts: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// One written file in the `POST /files` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenEntry {
    pub path: String,
    pub name: String,
    /// Always `"file"`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The error body of every envd plain-HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    pub code: u16,
    pub message: String,
}

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    Read,
    Write,
}

impl FileOp {
    pub fn as_str(self) -> &'static str {
        match self {
            FileOp::Read => "read",
            FileOp::Write => "write",
        }
    }
}

/// The signature of a `/files` URL: `v1_` + unpadded standard base64 of
/// SHA-256 over `path:op:username:token[:expiration]`. `path` is the raw query
/// value (not resolved) and `username` is empty when absent.
pub fn file_signature(
    path: &str,
    op: FileOp,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut material = format!("{path}:{}:{username}:{token}", op.as_str());
    if let Some(exp) = expiration {
        material.push(':');
        material.push_str(&exp.to_string());
    }
    let digest = Sha256::digest(material.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_sdk_scheme() {
        // Computed independently: printf 'a.txt:read::tok' | sha256sum | xxd -r -p | base64
        let sig = file_signature("a.txt", FileOp::Read, "", "tok", None);
        assert_eq!(sig, "v1_gDv73H8R9a10OdCSX0/JNMqMYLPpmCQAYJY+U68oQjM");
        assert_ne!(sig, file_signature("a.txt", FileOp::Write, "", "tok", None));
        assert_ne!(
            sig,
            file_signature("a.txt", FileOp::Read, "", "tok", Some(1))
        );
    }

    #[test]
    fn init_request_accepts_partial_and_unknown_fields() {
        let r: InitRequest =
            serde_json::from_str(r#"{"envVars":{"A":"1"},"hyperloopIP":"x"}"#).unwrap();
        assert_eq!(r.env_vars.unwrap()["A"], "1");
        assert!(r.access_token.is_none());
    }
}
