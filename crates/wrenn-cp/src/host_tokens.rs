//! Host credentials (wrenn-api.md §1.2, §5): what an agent proves itself
//! with when it calls the control plane.
//!
//! - The host token: a JWT (HS256) naming the host (`sub`), good for
//!   [`TOKEN_TTL`]. It is checked by signature, so a heartbeat costs no
//!   token lookup; the key is kept in the database (`host_signing_key`),
//!   shared by every control plane on it.
//! - The refresh token: 64 hex characters, good for [`REFRESH_TTL`], kept
//!   as a SHA-256. `POST /v1/hosts/auth/refresh` takes it once and answers
//!   with a new pair and a new certificate; the old one is then refused,
//!   but for one more use within [`REFRESH_GRACE`] (an agent that never got
//!   the answer tries again with it).
//!
//! An agent whose host token is refused (401, or 403) refreshes; one
//! whose refresh token is refused must be registered again.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use wrenn_types::ids::HostId;

use crate::auth::{random_hex, sha256_hex};
use crate::db::{now_ms, Db, DbError};

/// How long a host token is good for (wrenn's: 7 days).
pub const TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a refresh token is good for (wrenn's: 60 days).
pub const REFRESH_TTL: Duration = Duration::from_secs(60 * 24 * 3600);
/// How long a used refresh token is still taken, once: for an agent whose
/// refresh answer was lost on the way (it retries with the old token).
pub const REFRESH_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// A host token of ours: the host it names, and whether its time is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub host: String,
    pub expired: bool,
}

/// Not a token of ours: malformed, or signed with another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// Signs and checks host tokens; makes refresh tokens.
pub struct HostTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    token_ttl: Duration,
    refresh_ttl: Duration,
}

impl std::fmt::Debug for HostTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTokens")
            .field("token_ttl", &self.token_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish_non_exhaustive()
    }
}

/// A new refresh token and what is stored of it (hash, expiry in Unix ms).
#[derive(Debug)]
pub struct Refresh {
    pub token: String,
    pub hash: String,
    pub expires_at: i64,
}

impl HostTokens {
    /// The database's signing key (made now if it has none).
    pub async fn load(
        db: &Db,
        token_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<HostTokens, DbError> {
        let key_hex = db.host_signing_key(|| random_hex(32)).await?;
        let key = key_hex.as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Expiry is judged in `verify`: an expired token still says which
        // host it names (a deleted host is told so even then).
        validation.validate_exp = false;
        Ok(HostTokens {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            token_ttl,
            refresh_ttl,
        })
    }

    /// A host token for host `id`.
    pub fn sign(&self, id: &HostId) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_ms() as u64 / 1000;
        let claims = Claims {
            sub: id.to_string(),
            iat: now,
            exp: now + self.token_ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// A new refresh token.
    pub fn refresh(&self) -> Refresh {
        let token = random_hex(32);
        Refresh {
            hash: sha256_hex(&token),
            token,
            expires_at: now_ms() + self.refresh_ttl.as_millis() as i64,
        }
    }

    /// The host a token names, if it is ours, and whether it has expired
    /// (at its `exp` second, with no leeway: both ends read the same
    /// clock's seconds).
    pub fn verify(&self, token: &str) -> Result<Verified, Invalid> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| Invalid)?;
        let now = now_ms() as u64 / 1000;
        Ok(Verified {
            host: data.claims.sub,
            expired: data.claims.exp <= now,
        })
    }
}
