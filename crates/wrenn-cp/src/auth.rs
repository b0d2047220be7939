//! API keys: `wrn_` + 32 lowercase hex (16 random bytes) for the wrenn
//! API, `e2b_` + 40 hex for E2B clients. Only the SHA-256 of a key is
//! stored; a presented key is hashed, looked up by its hash and compared
//! to the stored hash in constant time. The [`Caller`] extractor makes
//! every handler that takes it authenticated and team-scoped.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wrenn_types::ids::{KeyId, TeamId};

use crate::db::{now_ms, ApiKey, Db, Team};
use crate::error::ApiError;
use crate::server::Cp;

/// Lowercase hex of SHA-256.
pub fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS random source works");
    hex(&b)
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The bytes lowercase or uppercase hex `s` spells; None if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    // (from_str_radix alone would take a sign: "+1")
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Wrenn,
    E2b,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Wrenn => "wrenn",
            KeyKind::E2b => "e2b",
        }
    }
}

/// Whether `key` has the shape of a key of `kind` (checked before any
/// lookup, so junk never reaches the database).
pub fn well_formed(key: &str, kind: KeyKind) -> bool {
    let (prefix, len) = match kind {
        KeyKind::Wrenn => ("wrn_", 32),
        KeyKind::E2b => ("e2b_", 40),
    };
    key.strip_prefix(prefix).is_some_and(|h| {
        h.len() == len
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Create a key for a team; returns the record and the secret (shown once).
pub async fn create_key(
    db: &Db,
    team: &TeamId,
    name: &str,
    kind: KeyKind,
) -> Result<(ApiKey, String), crate::db::DbError> {
    let secret = match kind {
        KeyKind::Wrenn => format!("wrn_{}", random_hex(16)),
        KeyKind::E2b => format!("e2b_{}", random_hex(20)),
    };
    let key = ApiKey {
        id: KeyId::random(),
        team_id: team.clone(),
        name: name.to_owned(),
        kind: kind.as_str().to_owned(),
        key_prefix: secret[..10].to_owned(),
        created_at: now_ms(),
        last_used: None,
    };
    db.insert_key(&key, &sha256_hex(&secret)).await?;
    Ok((key, secret))
}

/// Resolve a presented key to its team.
pub async fn authenticate(db: &Db, presented: &str) -> Result<(ApiKey, Team), ApiError> {
    let kind = if well_formed(presented, KeyKind::Wrenn) {
        KeyKind::Wrenn
    } else if well_formed(presented, KeyKind::E2b) {
        KeyKind::E2b
    } else {
        return Err(ApiError::unauthorized("invalid API key"));
    };
    let hash = sha256_hex(presented);
    let Some((key, stored, team)) = db.key_by_hash(&hash).await? else {
        return Err(ApiError::unauthorized("invalid API key"));
    };
    if !bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) || key.kind != kind.as_str() {
        return Err(ApiError::unauthorized("invalid API key"));
    }
    // last_used at most once a minute per key: no write on every request.
    let now = now_ms();
    if key.last_used.is_none_or(|t| now - t > 60_000) {
        db.touch_key(&key.id, now).await?;
    }
    Ok((key, team))
}

/// An authenticated caller: the team every query is scoped to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub team: Team,
    pub key: ApiKey,
}

impl Caller {
    pub fn team_id(&self) -> &TeamId {
        &self.team.id
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.team.is_admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs the admin team's key"))
        }
    }
}

impl FromRequestParts<Arc<Cp>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, cp: &Arc<Cp>) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(&wrenn_http::relay::X_API_KEY) else {
            return Err(ApiError::unauthorized("missing X-API-Key header"));
        };
        let presented = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("invalid API key"))?;
        let (key, team) = authenticate(&cp.db, presented.trim()).await?;
        Ok(Caller { team, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let bytes = [0x00, 0x7f, 0x80, 0xff, 0x0a];
        assert_eq!(hex(&bytes), "007f80ff0a");
        assert_eq!(unhex("007f80ff0a").as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("007F80FF0A").as_deref(), Some(&bytes[..]));
        for bad in ["", "0", "0g", "+1", "é0", "0é"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn key_shapes() {
        assert!(well_formed(
            &format!("wrn_{}", "a1".repeat(16)),
            KeyKind::Wrenn
        ));
        assert!(!well_formed(
            &format!("wrn_{}", "A1".repeat(16)),
            KeyKind::Wrenn
        ));
        assert!(!well_formed(
            &format!("wrn_{}", "a1".repeat(15)),
            KeyKind::Wrenn
        ));
        assert!(well_formed(
            &format!("e2b_{}", "0f".repeat(20)),
            KeyKind::E2b
        ));
        assert!(!well_formed("", KeyKind::Wrenn));
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
