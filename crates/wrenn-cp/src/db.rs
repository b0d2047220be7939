//! The database: SQLite (embedded, WAL) or PostgreSQL behind one
//! `sqlx::AnyPool`, with the same SQL for both (`$n` parameters, which
//! SQLite also accepts; only types both share — see the migration).
//!
//! Every query a handler needs is a method here, so the SQL lives in one
//! file and every caller passes typed IDs. Rows that reach the API are
//! team-scoped by the `team_id` argument of the method that loads them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, Row};
use wrenn_types::ids::{CapsuleId, HostId, KeyId, TeamId};

use crate::model::Status;

/// The platform team (owner of built-in templates): all zeros.
pub fn platform_team() -> TeamId {
    TeamId::from_u128(0)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {0:?} is not supported (use sqlite:PATH or postgres://…)")]
    Scheme(String),
    #[error("cannot open the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("query failed")]
    Query(#[from] sqlx::Error),
    #[error("stored value {0:?} is corrupt")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    pub kind: DbKind,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// [`Db::placing`]'s advisory lock key on PostgreSQL ("wrnnplac").
const PLACING_KEY: i64 = 0x7772_6e6e_706c_6163;

/// Held while a control plane places a capsule ([`Db::placing`]).
#[derive(Debug)]
pub struct PlacingLock {
    _held: Option<sqlx::Transaction<'static, sqlx::Any>>,
}

/// Lock host `$1`'s row until the transaction ends (a write that changes
/// nothing; SQLite locks the whole database for it).
const LOCK_HOST: &str = "UPDATE hosts SET cert_serial = cert_serial WHERE id = $1";

/// Revoke host `$1`'s newest certificate (if one is known) at time `$2`.
/// (The `WHERE` keeps SQLite from reading `ON CONFLICT` as a join.)
const REVOKE_CURRENT: &str = "INSERT INTO revoked_certs (serial, host_id, revoked_at, expires_at) \
     SELECT cert_serial, id, $2, cert_expires_at FROM hosts \
     WHERE id = $1 AND cert_serial IS NOT NULL AND cert_expires_at IS NOT NULL \
     ON CONFLICT (serial) DO NOTHING";

/// In `tx`: host `id`'s newest certificate becomes `cert` (serial hex,
/// expiry) and the one before is revoked. The row is locked first, so two
/// swaps take turns and each revokes what the other recorded. False if
/// there is no such host.
async fn swap_cert(
    tx: &mut sqlx::AnyConnection,
    id: &HostId,
    cert: (&str, i64),
) -> Result<bool, DbError> {
    let locked = sqlx::query(LOCK_HOST)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
    if locked.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(REVOKE_CURRENT)
        .bind(id.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE hosts SET cert_serial = $1, cert_expires_at = $2 WHERE id = $3")
        .bind(cert.0)
        .bind(cert.1)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
    Ok(true)
}

/// A host row whose refresh token hashes to `$1` at time `$2`.
const REFRESHABLE: &str = "(refresh_hash = $1 AND refresh_expires_at > $2) \
     OR (prev_refresh_hash = $1 AND prev_refresh_until > $2)";

fn migrator() -> Migrator {
    let migrations = [
        (1, "init", include_str!("../migrations/0001_init.sql")),
        (2, "e2b", include_str!("../migrations/0002_e2b.sql")),
        (
            3,
            "agent_token",
            include_str!("../migrations/0003_agent_token.sql"),
        ),
        (
            4,
            "usage_daily",
            include_str!("../migrations/0004_usage_daily.sql"),
        ),
        (5, "ca", include_str!("../migrations/0005_ca.sql")),
        (
            6,
            "host_credentials",
            include_str!("../migrations/0006_host_credentials.sql"),
        ),
        (
            7,
            "revocation",
            include_str!("../migrations/0007_revocation.sql"),
        ),
        (
            8,
            "internet",
            include_str!("../migrations/0008_internet.sql"),
        ),
        (
            9,
            "template_copies",
            include_str!("../migrations/0009_template_copies.sql"),
        ),
        (
            10,
            "created_by",
            include_str!("../migrations/0010_created_by.sql"),
        ),
    ]
    .into_iter()
    .map(|(version, name, sql)| {
        Migration::new(
            version,
            Cow::Borrowed(name),
            MigrationType::Simple,
            Cow::Borrowed(sql),
            false,
        )
    })
    .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

impl Db {
    /// Open (creating a SQLite file if needed) and migrate.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            let url = if path.contains('?') {
                format!("sqlite://{path}")
            } else {
                format!("sqlite://{path}?mode=rwc")
            };
            (DbKind::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (DbKind::Postgres, url.to_owned())
        } else {
            return Err(DbError::Scheme(url.to_owned()));
        };
        let mut opts = AnyPoolOptions::new().max_connections(16);
        if kind == DbKind::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(&url).await.map_err(DbError::Connect)?;
        migrator().run(&pool).await.map_err(DbError::Migrate)?;
        Ok(Db { pool, kind })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Placement's lock among the control planes sharing this database:
    /// while one holds it, no other places or resumes a capsule, so two
    /// of them cannot both take a host's last room. On PostgreSQL a
    /// transaction-scoped advisory lock on a connection of its own, let
    /// go when the guard drops (its transaction is rolled back, also when
    /// the holding task is cancelled) or the connection ends (its process
    /// died). On SQLite nothing: the file is one machine's, served by one
    /// `wrenn up`, and the caller's own lock is enough.
    pub async fn placing(&self) -> Result<PlacingLock, DbError> {
        match self.kind {
            DbKind::Sqlite => Ok(PlacingLock { _held: None }),
            DbKind::Postgres => {
                let mut tx = self.pool.begin().await?;
                // (from FROM: the function's `void` result is no column
                // the Any driver can carry)
                sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
                    .bind(PLACING_KEY)
                    .execute(&mut *tx)
                    .await?;
                Ok(PlacingLock { _held: Some(tx) })
            }
        }
    }

    // ---- teams and keys -------------------------------------------------

    pub async fn insert_team(&self, t: &Team) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO teams (id, name, slug, is_admin, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(t.id.as_str())
        .bind(&t.name)
        .bind(&t.slug)
        .bind(t.is_admin as i64)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn team(&self, id: &TeamId) -> Result<Option<Team>, DbError> {
        let row =
            sqlx::query("SELECT id, name, slug, is_admin, created_at FROM teams WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| team_row(&r)).transpose()
    }

    pub async fn teams(&self) -> Result<Vec<Team>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, slug, is_admin, created_at FROM teams ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(team_row).collect()
    }

    pub async fn admin_team(&self) -> Result<Option<Team>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, slug, is_admin, created_at FROM teams WHERE is_admin = 1 \
             ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| team_row(&r)).transpose()
    }

    pub async fn insert_key(&self, k: &ApiKey, hash: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, kind, key_hash, key_prefix, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(k.id.as_str())
        .bind(k.team_id.as_str())
        .bind(&k.name)
        .bind(&k.kind)
        .bind(hash)
        .bind(&k.key_prefix)
        .bind(k.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The key whose SHA-256 is `hash`, with its stored hash (for a
    /// constant-time comparison) and its team.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<(ApiKey, String, Team)>, DbError> {
        let row = sqlx::query(
            "SELECT k.id, k.team_id, k.name, k.kind, k.key_prefix, k.created_at, k.last_used, \
                    k.key_hash, t.id AS t_id, t.name AS t_name, t.slug, t.is_admin, \
                    t.created_at AS t_created \
             FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let key = key_row(&r)?;
        let stored: String = r.try_get("key_hash")?;
        let team = Team {
            id: parse(r.try_get::<String, _>("t_id")?)?,
            name: r.try_get("t_name")?,
            slug: r.try_get("slug")?,
            is_admin: r.try_get::<i64, _>("is_admin")? != 0,
            created_at: r.try_get("t_created")?,
        };
        Ok(Some((key, stored, team)))
    }

    pub async fn touch_key(&self, id: &KeyId, at: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE api_keys SET last_used = $1 WHERE id = $2")
            .bind(at)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn keys(&self, team: &TeamId) -> Result<Vec<ApiKey>, DbError> {
        let rows = sqlx::query(
            "SELECT id, team_id, name, kind, key_prefix, created_at, last_used FROM api_keys \
             WHERE team_id = $1 ORDER BY created_at",
        )
        .bind(team.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_row).collect()
    }

    /// Delete a team's key; false when the team has no such key.
    pub async fn delete_key(&self, team: &TeamId, id: &KeyId) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND team_id = $2")
            .bind(id.as_str())
            .bind(team.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- hosts ------------------------------------------------------------

    pub async fn insert_host(&self, h: &Host, registration_hash: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO hosts (id, status, address, registration_hash, created_at) \
             VALUES ($1, $2, '', $3, $4)",
        )
        .bind(h.id.as_str())
        .bind(&h.status)
        .bind(registration_hash)
        .bind(h.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The pending host a registration token belongs to.
    pub async fn pending_host(&self, registration_hash: &str) -> Result<Option<HostId>, DbError> {
        let row = sqlx::query("SELECT id FROM hosts WHERE registration_hash = $1")
            .bind(registration_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.try_get::<String, _>("id")?))
            .transpose()
    }

    /// Consume a registration token: the pending host it belongs to
    /// becomes `online` at `address`, with a refresh token (`refresh`: its
    /// hash and expiry). None when no pending host has that token.
    pub async fn register_host(
        &self,
        registration_hash: &str,
        reg: &HostRegistration,
        refresh: (&str, i64),
        cert: (&str, i64),
    ) -> Result<Option<Host>, DbError> {
        let row = sqlx::query(
            "UPDATE hosts SET status = 'online', address = $1, refresh_hash = $2, arch = $3, \
                    cpu_cores = $4, memory_mb = $5, disk_gb = $6, last_heartbeat = $7, \
                    registration_hash = NULL, agent_token = $9, refresh_expires_at = $10, \
                    cert_serial = $11, cert_expires_at = $12 \
             WHERE registration_hash = $8 RETURNING id",
        )
        .bind(&reg.address)
        .bind(refresh.0)
        .bind(&reg.arch)
        .bind(reg.cpu_cores)
        .bind(reg.memory_mb)
        .bind(reg.disk_gb)
        .bind(now_ms())
        .bind(registration_hash)
        .bind(&reg.agent_token)
        .bind(refresh.1)
        .bind(cert.0)
        .bind(cert.1)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let id: HostId = parse(r.try_get::<String, _>("id")?)?;
        self.host(&id).await
    }

    /// A known host's new address and size (an agent that restarted), and
    /// its agent token unless `reg` has none.
    pub async fn update_host(
        &self,
        id: &HostId,
        reg: &HostRegistration,
    ) -> Result<Option<Host>, DbError> {
        sqlx::query(
            "UPDATE hosts SET status = 'online', address = $1, arch = $2, cpu_cores = $3, \
                    memory_mb = $4, disk_gb = $5, last_heartbeat = $6, \
                    agent_token = COALESCE(NULLIF($8, ''), agent_token) WHERE id = $7",
        )
        .bind(&reg.address)
        .bind(&reg.arch)
        .bind(reg.cpu_cores)
        .bind(reg.memory_mb)
        .bind(reg.disk_gb)
        .bind(now_ms())
        .bind(id.as_str())
        .bind(&reg.agent_token)
        .execute(&self.pool)
        .await?;
        self.host(id).await
    }

    pub async fn host(&self, id: &HostId) -> Result<Option<Host>, DbError> {
        let row = sqlx::query(&format!("{HOST_COLS} WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| host_row(&r)).transpose()
    }

    pub async fn hosts(&self) -> Result<Vec<Host>, DbError> {
        let rows = sqlx::query(&format!("{HOST_COLS} ORDER BY created_at"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(host_row).collect()
    }

    /// The host whose refresh token hashes to `hash`: its current one, not
    /// expired, or the one it replaced, within its grace.
    pub async fn refreshable_host(&self, hash: &str) -> Result<Option<HostId>, DbError> {
        let row = sqlx::query(&format!("SELECT id FROM hosts WHERE {REFRESHABLE}"))
            .bind(hash)
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.try_get::<String, _>("id")?))
            .transpose()
    }

    /// Use refresh token `old` (its hash) of host `id`: replaced by `new`
    /// (hash, expiry), and the host's certificate by `cert` (serial,
    /// expiry), the one before revoked, in one transaction. A current token
    /// becomes the previous one, taken until `grace_until`; a previous one
    /// is used up with no further grace. The host, or None when `old` is no
    /// longer good (and then nothing changed).
    pub async fn rotate_refresh(
        &self,
        id: &HostId,
        old: &str,
        new: (&str, i64),
        grace_until: i64,
        cert: (&str, i64),
    ) -> Result<Option<Host>, DbError> {
        let mut tx = self.pool.begin().await?;
        // (SET expressions read the row as it was. The row stays locked:
        // a second refresh of the host waits, then sees this one's token.)
        let r = sqlx::query(&format!(
            "UPDATE hosts SET \
               prev_refresh_hash = CASE WHEN refresh_hash = $1 THEN refresh_hash END, \
               prev_refresh_until = CASE WHEN refresh_hash = $1 THEN CAST($5 AS BIGINT) END, \
               refresh_hash = $3, refresh_expires_at = $4 \
             WHERE id = $6 AND ({REFRESHABLE})"
        ))
        .bind(old)
        .bind(now_ms())
        .bind(new.0)
        .bind(new.1)
        .bind(grace_until)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        swap_cert(&mut tx, id, cert).await?;
        tx.commit().await?;
        self.host(id).await
    }

    /// The key host tokens are signed with (hex), made by `make` and
    /// stored if the database has none yet; the stored one either way.
    pub async fn host_signing_key(&self, make: impl FnOnce() -> String) -> Result<String, DbError> {
        let read = || sqlx::query("SELECT key_hex FROM host_signing_key WHERE id = 1");
        if let Some(r) = read().fetch_optional(&self.pool).await? {
            return Ok(r.try_get("key_hex")?);
        }
        sqlx::query(
            "INSERT INTO host_signing_key (id, key_hex) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(make())
        .execute(&self.pool)
        .await?;
        Ok(read().fetch_one(&self.pool).await?.try_get("key_hex")?)
    }

    /// The certificate authority (cert, key PEM), once one was made.
    pub async fn authority(&self) -> Result<Option<(String, String)>, DbError> {
        let row = sqlx::query("SELECT cert_pem, key_pem FROM authority WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some((r.try_get("cert_pem")?, r.try_get("key_pem")?))),
            None => Ok(None),
        }
    }

    /// Store `made` as the certificate authority unless another control
    /// plane got there first; the one stored either way.
    pub async fn set_authority(&self, made: (String, String)) -> Result<(String, String), DbError> {
        sqlx::query(
            "INSERT INTO authority (id, cert_pem, key_pem) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&made.0)
        .bind(&made.1)
        .execute(&self.pool)
        .await?;
        Ok(self.authority().await?.ok_or(sqlx::Error::RowNotFound)?)
    }

    /// Record a sign of life: the host is `online` as of now. True when it
    /// was `unreachable` until now (its capsules want reconciling).
    pub async fn heartbeat(&self, id: &HostId) -> Result<bool, DbError> {
        let now = now_ms();
        let revived = sqlx::query(
            "UPDATE hosts SET status = 'online', last_heartbeat = $1 \
             WHERE id = $2 AND status = 'unreachable'",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if !revived {
            sqlx::query("UPDATE hosts SET status = 'online', last_heartbeat = $1 WHERE id = $2")
                .bind(now)
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(revived)
    }

    /// Mark `unreachable` the online hosts with no sign of life since
    /// `before` (ms); returns them.
    pub async fn mark_silent_hosts(&self, before: i64) -> Result<Vec<HostId>, DbError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE hosts SET status = 'unreachable' \
             WHERE status = 'online' AND COALESCE(last_heartbeat, created_at) < $1 RETURNING id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    /// Forget host `id`, revoking its newest certificate.
    pub async fn delete_host(&self, id: &HostId) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        // (locked first, as in `swap_cert`: a certificate recorded by a
        // refresh that got there first is the one revoked)
        sqlx::query(LOCK_HOST)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(REVOKE_CURRENT)
            .bind(id.as_str())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        for forget in [
            "DELETE FROM template_copies WHERE host_id = $1",
            "DELETE FROM hosts WHERE id = $1",
        ] {
            sqlx::query(forget)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Host `id`'s newest certificate is now `cert` (serial hex, expiry);
    /// the one it had before is revoked. False if there is no such host.
    pub async fn replace_host_cert(&self, id: &HostId, cert: (&str, i64)) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let found = swap_cert(&mut tx, id, cert).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// The revoked certificates that have not expired at `now`: (serial
    /// hex, revoked at), oldest revocation first. Expired ones are dropped.
    pub async fn revoked_certs(&self, now: i64) -> Result<Vec<(String, i64)>, DbError> {
        sqlx::query("DELETE FROM revoked_certs WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let rows =
            sqlx::query("SELECT serial, revoked_at FROM revoked_certs ORDER BY revoked_at, serial")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("serial")?, r.try_get("revoked_at")?)))
            .collect()
    }

    /// Resources reserved on a host: (running vCPUs, running MiB, paused
    /// vCPUs, paused MiB).
    pub async fn host_load(&self, id: &HostId) -> Result<(i64, i64, i64, i64), DbError> {
        let row = sqlx::query(
            // SUM of BIGINT is NUMERIC on PostgreSQL: cast back.
            "SELECT \
               CAST(COALESCE(SUM(CASE WHEN status = 'paused' THEN 0 ELSE vcpus END), 0) AS BIGINT) AS rv, \
               CAST(COALESCE(SUM(CASE WHEN status = 'paused' THEN 0 ELSE memory_mb END), 0) AS BIGINT) AS rm, \
               CAST(COALESCE(SUM(CASE WHEN status = 'paused' THEN vcpus ELSE 0 END), 0) AS BIGINT) AS pv, \
               CAST(COALESCE(SUM(CASE WHEN status = 'paused' THEN memory_mb ELSE 0 END), 0) AS BIGINT) AS pm \
             FROM capsules WHERE host_id = $1 AND status NOT IN ('stopped', 'error', 'missing')",
        )
        .bind(id.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok((
            row.try_get("rv")?,
            row.try_get("rm")?,
            row.try_get("pv")?,
            row.try_get("pm")?,
        ))
    }

    // ---- capsules -----------------------------------------------------------

    pub async fn insert_capsule(&self, c: &CapsuleRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO capsules (id, team_id, host_id, template, agent_template, status, vcpus, \
                 memory_mb, timeout_sec, disk_size_mb, metadata, created_at, started_at, \
                 last_active_at, last_updated, access_token, end_at, on_timeout, \
                 allow_internet, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                     $17, $18, $19, $20)",
        )
        .bind(c.id.as_str())
        .bind(c.team_id.as_str())
        .bind(c.host_id.as_ref().map(|h| h.as_str().to_owned()))
        .bind(&c.template)
        .bind(&c.agent_template)
        .bind(c.status.as_str())
        .bind(c.vcpus)
        .bind(c.memory_mb)
        .bind(c.timeout_sec)
        .bind(c.disk_size_mb)
        .bind(serde_json::to_string(&c.metadata).unwrap_or_else(|_| "{}".into()))
        .bind(c.created_at)
        .bind(c.started_at)
        .bind(c.last_active_at)
        .bind(c.last_updated)
        .bind(&c.access_token)
        .bind(c.end_at)
        .bind(c.on_timeout.as_str())
        .bind(c.allow_internet.map(i64::from))
        .bind(c.created_by.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Set (or clear) a capsule's absolute deadline.
    pub async fn set_deadline(
        &self,
        id: &CapsuleId,
        end_at: Option<i64>,
        on_timeout: OnTimeout,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE capsules SET end_at = $1, on_timeout = $2 WHERE id = $3")
            .bind(end_at)
            .bind(on_timeout.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running capsules whose deadline has passed.
    pub async fn capsules_due(&self, now: i64) -> Result<Vec<CapsuleRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{CAPSULE_COLS} WHERE status = 'running' AND end_at IS NOT NULL AND end_at <= $1"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(capsule_row).collect()
    }

    /// Add a line to a capsule's log.
    pub async fn add_log(&self, id: &CapsuleId, level: &str, message: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO capsule_logs (capsule_id, at_ms, level, message) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(now_ms())
        .bind(level)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A capsule's log lines at or after `since` (ms), oldest first.
    pub async fn logs(&self, id: &CapsuleId, since: i64) -> Result<Vec<LogLine>, DbError> {
        let rows = sqlx::query(
            "SELECT at_ms, level, message FROM capsule_logs \
             WHERE capsule_id = $1 AND at_ms >= $2 ORDER BY at_ms",
        )
        .bind(id.as_str())
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogLine {
                    at_ms: r.try_get("at_ms")?,
                    level: r.try_get("level")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    /// Every running capsule, of all teams (signed-URL routing).
    pub async fn running_capsules(&self) -> Result<Vec<CapsuleRow>, DbError> {
        let rows = sqlx::query(&format!("{CAPSULE_COLS} WHERE status = 'running'"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(capsule_row).collect()
    }

    /// A team's capsule (None also when another team owns it).
    pub async fn capsule(
        &self,
        team: &TeamId,
        id: &CapsuleId,
    ) -> Result<Option<CapsuleRow>, DbError> {
        let row = sqlx::query(&format!("{CAPSULE_COLS} WHERE id = $1 AND team_id = $2"))
            .bind(id.as_str())
            .bind(team.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| capsule_row(&r)).transpose()
    }

    /// Any team's capsule (proxy routing, reconciler, system events).
    pub async fn capsule_any(&self, id: &CapsuleId) -> Result<Option<CapsuleRow>, DbError> {
        let row = sqlx::query(&format!("{CAPSULE_COLS} WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| capsule_row(&r)).transpose()
    }

    /// A team's live capsules, newest first.
    pub async fn capsules(&self, team: &TeamId) -> Result<Vec<CapsuleRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{CAPSULE_COLS} WHERE team_id = $1 AND status NOT IN ('stopped', 'error') \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(team.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(capsule_row).collect()
    }

    /// Capsules placed on a host that are not stopped.
    pub async fn capsules_on(&self, host: &HostId) -> Result<Vec<CapsuleRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{CAPSULE_COLS} WHERE host_id = $1 AND status NOT IN ('stopped')"
        ))
        .bind(host.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(capsule_row).collect()
    }

    /// Move a capsule to `to` if it is in one of `from` (all states when
    /// empty). Keeps the running-time ledger (`capsule_runs`) in step.
    /// Returns the updated row, or None when the capsule was not in `from`.
    pub async fn transition(
        &self,
        id: &CapsuleId,
        from: &[Status],
        to: Status,
    ) -> Result<Option<CapsuleRow>, DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Write first: this takes SQLite's write lock (waiting for it like
        // any write) and PostgreSQL's row lock, so the state read next is
        // the one this update replaces. A SQLite transaction that read
        // first fails at once with "database is locked" (no busy wait) when
        // another writer commits in between.
        sqlx::query("UPDATE capsules SET last_updated = last_updated WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!("{CAPSULE_COLS} WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut c = capsule_row(&row)?;
        if !from.is_empty() && !from.contains(&c.status) {
            return Ok(None);
        }
        let was_running = c.status == Status::Running;
        c.status = to;
        c.last_updated = now;
        if to == Status::Running && !was_running {
            c.started_at = Some(now);
            c.last_active_at = Some(now);
            sqlx::query(
                "INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(c.id.as_str())
            .bind(c.team_id.as_str())
            .bind(c.vcpus)
            .bind(c.memory_mb)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if was_running && to != Status::Running {
            sqlx::query(
                "UPDATE capsule_runs SET ended_at = $1 WHERE capsule_id = $2 AND ended_at IS NULL",
            )
            .bind(now)
            .bind(c.id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE capsules SET status = $1, last_updated = $2, started_at = $3, \
                    last_active_at = $4 WHERE id = $5",
        )
        .bind(c.status.as_str())
        .bind(now)
        .bind(c.started_at)
        .bind(c.last_active_at)
        .bind(c.id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(c))
    }

    /// Move a capsule still `starting` (its create placing it again) to
    /// `host`; false when it is not `starting` (destroyed meanwhile).
    pub async fn set_capsule_host(&self, id: &CapsuleId, host: &HostId) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE capsules SET host_id = $1, last_updated = $2 \
             WHERE id = $3 AND status = 'starting'",
        )
        .bind(host.as_str())
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn set_capsule_metadata(
        &self,
        id: &CapsuleId,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE capsules SET metadata = $1 WHERE id = $2")
            .bind(serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into()))
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Set a capsule's inactivity TTL (0: none), as its agent keeps it.
    pub async fn set_ttl(&self, id: &CapsuleId, timeout_sec: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE capsules SET timeout_sec = $1 WHERE id = $2")
            .bind(timeout_sec)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn touch_capsule(&self, id: &CapsuleId) -> Result<(), DbError> {
        sqlx::query("UPDATE capsules SET last_active_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running-time stretches of a team overlapping `[from, to)`.
    pub async fn runs(&self, team: &TeamId, from: i64, to: i64) -> Result<Vec<Run>, DbError> {
        let rows = sqlx::query(
            "SELECT vcpus, memory_mb, started_at, ended_at FROM capsule_runs \
             WHERE team_id = $1 AND started_at < $2 AND (ended_at IS NULL OR ended_at > $3)",
        )
        .bind(team.as_str())
        .bind(to)
        .bind(from)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Run {
                    vcpus: r.try_get("vcpus")?,
                    memory_mb: r.try_get("memory_mb")?,
                    started_at: r.try_get("started_at")?,
                    ended_at: r.try_get("ended_at")?,
                })
            })
            .collect()
    }

    /// Record a finished running-time stretch (imports, tests); live
    /// capsules get theirs from [`Db::transition`].
    pub async fn insert_run(
        &self,
        capsule: &CapsuleId,
        team: &TeamId,
        run: &Run,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO capsule_runs (capsule_id, team_id, vcpus, memory_mb, started_at, ended_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(capsule.as_str())
        .bind(team.as_str())
        .bind(run.vcpus)
        .bind(run.memory_mb)
        .bind(run.started_at)
        .bind(run.ended_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The latest day rolled up, and the start of the earliest run.
    pub async fn rollup_bounds(&self) -> Result<(Option<String>, Option<i64>), DbError> {
        let last = sqlx::query("SELECT MAX(day) AS d FROM usage_rollups")
            .fetch_one(&self.pool)
            .await?
            .try_get::<Option<String>, _>("d")?;
        let first = sqlx::query("SELECT MIN(started_at) AS s FROM capsule_runs")
            .fetch_one(&self.pool)
            .await?
            .try_get::<Option<i64>, _>("s")?;
        Ok((last, first))
    }

    /// Sum every team's usage of the finished day `day`, which spans
    /// `[start, end)` ms, into `usage_daily`, and mark the day rolled up:
    /// one transaction, and a day already rolled up is left as it is.
    pub async fn roll_up_day(&self, day: &str, start: i64, end: i64) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        // Claim the day first: this takes the write lock (SQLite) and
        // leaves a day another control plane rolls up concurrently alone.
        let claimed = sqlx::query(
            "INSERT INTO usage_rollups (day, rolled_at) VALUES ($1, $2) ON CONFLICT (day) DO NOTHING",
        )
        .bind(day)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(());
        }
        let rows = sqlx::query(
            "SELECT team_id, vcpus, memory_mb, started_at, ended_at FROM capsule_runs \
             WHERE started_at < $1 AND (ended_at IS NULL OR ended_at > $2)",
        )
        .bind(end)
        .bind(start)
        .fetch_all(&mut *tx)
        .await?;
        let mut teams: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for r in &rows {
            let run = Run {
                vcpus: r.try_get("vcpus")?,
                memory_mb: r.try_get("memory_mb")?,
                started_at: r.try_get("started_at")?,
                ended_at: r.try_get("ended_at")?,
            };
            let (cpu, ram) = run.usage_within(start, end, end);
            let t = teams.entry(r.try_get("team_id")?).or_default();
            t.0 += cpu;
            t.1 += ram;
        }
        for (team, (cpu, ram)) in teams {
            sqlx::query(
                "INSERT INTO usage_daily (team_id, day, cpu_minutes, ram_mb_minutes) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(team)
            .bind(day)
            .bind(cpu)
            .bind(ram)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Of the days in `[from, to]` (YYYY-MM-DD), those rolled up, with
    /// `team`'s (cpu, ram) minutes for each (zero when it used nothing).
    pub async fn rolled_usage(
        &self,
        team: &TeamId,
        from: &str,
        to: &str,
    ) -> Result<BTreeMap<String, (f64, f64)>, DbError> {
        let days = sqlx::query("SELECT day FROM usage_rollups WHERE day >= $1 AND day <= $2")
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?;
        let mut out = BTreeMap::new();
        for d in &days {
            out.insert(d.try_get::<String, _>("day")?, (0.0, 0.0));
        }
        let rows = sqlx::query(
            "SELECT day, cpu_minutes, ram_mb_minutes FROM usage_daily \
             WHERE team_id = $1 AND day >= $2 AND day <= $3",
        )
        .bind(team.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            out.insert(
                r.try_get("day")?,
                (r.try_get("cpu_minutes")?, r.try_get("ram_mb_minutes")?),
            );
        }
        Ok(out)
    }

    pub async fn save_metrics(&self, id: &CapsuleId, points: &[MetricRow]) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM capsule_metrics WHERE capsule_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        // A day of history is several hundred rows: 100 per statement.
        for chunk in points.chunks(100) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let b = i * 5;
                    format!(
                        "(${}, ${}, ${}, ${}, ${})",
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO capsule_metrics (capsule_id, at_ms, cpu_pct, mem_bytes, disk_bytes) \
                 VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q
                    .bind(id.as_str())
                    .bind(p.at_ms)
                    .bind(p.cpu_pct)
                    .bind(p.mem_bytes)
                    .bind(p.disk_bytes);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn saved_metrics(
        &self,
        id: &CapsuleId,
        since_ms: i64,
    ) -> Result<Vec<MetricRow>, DbError> {
        let rows = sqlx::query(
            "SELECT at_ms, cpu_pct, mem_bytes, disk_bytes FROM capsule_metrics \
             WHERE capsule_id = $1 AND at_ms >= $2 ORDER BY at_ms",
        )
        .bind(id.as_str())
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MetricRow {
                    at_ms: r.try_get("at_ms")?,
                    cpu_pct: r.try_get("cpu_pct")?,
                    mem_bytes: r.try_get("mem_bytes")?,
                    disk_bytes: r.try_get("disk_bytes")?,
                })
            })
            .collect()
    }

    // ---- templates ------------------------------------------------------------

    /// Insert or replace a template row.
    pub async fn put_template(&self, t: &TemplateRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO templates (team_id, name, agent_name, type, host_id, vcpus, memory_mb, \
                 size_bytes, default_user, protected, metadata, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (team_id, name) DO UPDATE SET agent_name = $3, type = $4, host_id = $5, \
                 vcpus = $6, memory_mb = $7, size_bytes = $8, default_user = $9, protected = $10, \
                 metadata = $11, created_at = $12",
        )
        .bind(t.team_id.as_str())
        .bind(&t.name)
        .bind(&t.agent_name)
        .bind(&t.kind)
        .bind(t.host_id.as_ref().map(|h| h.as_str().to_owned()))
        .bind(t.vcpus)
        .bind(t.memory_mb)
        .bind(t.size_bytes)
        .bind(&t.default_user)
        .bind(t.protected as i64)
        .bind(serde_json::to_string(&t.metadata).unwrap_or_else(|_| "{}".into()))
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A template by name as a team sees it: its own first, then the
    /// platform's.
    pub async fn resolve_template(
        &self,
        team: &TeamId,
        name: &str,
    ) -> Result<Option<TemplateRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{TEMPLATE_COLS} WHERE name = $1 AND (team_id = $2 OR team_id = $3)"
        ))
        .bind(name)
        .bind(team.as_str())
        .bind(platform_team().as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<TemplateRow> =
            rows.iter().map(template_row).collect::<Result<_, _>>()?;
        found.sort_by_key(|t| t.team_id == platform_team());
        Ok(found.into_iter().next())
    }

    /// A team's own template (not the platform's).
    pub async fn own_template(
        &self,
        team: &TeamId,
        name: &str,
    ) -> Result<Option<TemplateRow>, DbError> {
        let row = sqlx::query(&format!("{TEMPLATE_COLS} WHERE name = $1 AND team_id = $2"))
            .bind(name)
            .bind(team.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| template_row(&r)).transpose()
    }

    /// The team's templates and the platform's, newest first.
    pub async fn templates(&self, team: &TeamId) -> Result<Vec<TemplateRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{TEMPLATE_COLS} WHERE team_id = $1 OR team_id = $2 ORDER BY created_at DESC, name"
        ))
        .bind(team.as_str())
        .bind(platform_team().as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_row).collect()
    }

    /// The templates every host makes or should have (rows naming no
    /// host: `minimal`, `busybox`), oldest first.
    pub async fn everywhere_templates(&self) -> Result<Vec<TemplateRow>, DbError> {
        let rows = sqlx::query(&format!(
            "{TEMPLATE_COLS} WHERE host_id IS NULL ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_row).collect()
    }

    pub async fn delete_template(&self, team: &TeamId, name: &str) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM templates WHERE team_id = $1 AND name = $2")
            .bind(team.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The hosts with a current copy of host-side template `agent_name`
    /// (not counting the one that made it).
    pub async fn template_copies(&self, agent_name: &str) -> Result<Vec<HostId>, DbError> {
        let rows = sqlx::query(
            "SELECT host_id FROM template_copies WHERE agent_name = $1 ORDER BY created_at",
        )
        .bind(agent_name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse(r.try_get::<String, _>("host_id")?))
            .collect()
    }

    /// Host `host` has a current copy of host-side template `agent_name`.
    pub async fn add_template_copy(&self, agent_name: &str, host: &HostId) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO template_copies (agent_name, host_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_name, host_id) DO NOTHING",
        )
        .bind(agent_name)
        .bind(host.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Host `host`'s copy of `agent_name` is gone (or no longer current);
    /// every host's when `host` is None.
    pub async fn drop_template_copy(
        &self,
        agent_name: &str,
        host: Option<&HostId>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "DELETE FROM template_copies WHERE agent_name = $1 AND ($2 IS NULL OR host_id = $2)",
        )
        .bind(agent_name)
        .bind(host.map(|h| h.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The hosts named by the template rows of host-side template
    /// `agent_name` (None: a row whose template every host makes).
    pub async fn template_homes(&self, agent_name: &str) -> Result<Vec<Option<HostId>>, DbError> {
        let rows = sqlx::query("SELECT host_id FROM templates WHERE agent_name = $1")
            .bind(agent_name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let id: Option<String> = r.try_get("host_id")?;
                id.map(parse).transpose()
            })
            .collect()
    }

    /// Whether a template row names this host-side template.
    pub async fn template_named_on_host(&self, agent_name: &str) -> Result<bool, DbError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM templates WHERE agent_name = $1")
            .bind(agent_name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Capsules (not stopped) created from a host-side template.
    pub async fn template_users(&self, agent_name: &str) -> Result<i64, DbError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM capsules WHERE agent_template = $1 AND status NOT IN ('stopped', 'error')",
        )
        .bind(agent_name)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }
}

// ---- rows -------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    pub slug: String,
    pub is_admin: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: KeyId,
    pub team_id: TeamId,
    pub name: String,
    pub kind: String,
    pub key_prefix: String,
    pub created_at: i64,
    pub last_used: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub id: HostId,
    pub status: String,
    pub address: String,
    pub arch: String,
    pub cpu_cores: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
    pub created_at: i64,
    pub last_heartbeat: Option<i64>,
    /// What the agent requires on its RPC and proxy ('' if unknown).
    pub agent_token: String,
}

/// What an agent says about itself when it registers (and heartbeats).
pub use wrenn_types::hosts::HostFacts as HostRegistration;

#[derive(Debug, Clone)]
pub struct CapsuleRow {
    pub id: CapsuleId,
    pub team_id: TeamId,
    pub host_id: Option<HostId>,
    pub template: String,
    pub agent_template: String,
    pub status: Status,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub timeout_sec: i64,
    pub disk_size_mb: i64,
    pub metadata: BTreeMap<String, String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub last_active_at: Option<i64>,
    pub last_updated: i64,
    /// envd's access token ('' for capsules created before tokens).
    pub access_token: String,
    /// Absolute deadline (Unix ms), if any; see [`OnTimeout`].
    pub end_at: Option<i64>,
    pub on_timeout: OnTimeout,
    /// Internet access as its creator set it; `None`: not set (on).
    pub allow_internet: Option<bool>,
    /// The control plane whose create made the row ([`Cp::identity`]);
    /// `None` for rows from before migration 10.
    ///
    /// [`Cp::identity`]: crate::server::Cp::identity
    pub created_by: Option<String>,
}

/// One line of a capsule's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub at_ms: i64,
    /// debug, info, warn or error
    pub level: String,
    pub message: String,
}

/// What a capsule's absolute deadline does when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTimeout {
    #[default]
    Kill,
    Pause,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => "kill",
            OnTimeout::Pause => "pause",
        }
    }
}

impl FromStr for OnTimeout {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "kill" => Ok(OnTimeout::Kill),
            "pause" => Ok(OnTimeout::Pause),
            _ => Err(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub team_id: TeamId,
    pub name: String,
    pub agent_name: String,
    /// `base` or `snapshot`
    pub kind: String,
    pub host_id: Option<HostId>,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub size_bytes: i64,
    pub default_user: String,
    pub protected: bool,
    pub metadata: BTreeMap<String, String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub started_at: i64,
    pub ended_at: Option<i64>,
}

impl Run {
    /// (vCPU minutes, MB minutes) of this run inside `[from, to)`, a run
    /// still going counted up to `now`.
    pub fn usage_within(&self, from: i64, to: i64, now: i64) -> (f64, f64) {
        let s = self.started_at.max(from);
        let e = self.ended_at.unwrap_or(now).min(to).min(now);
        if e <= s {
            return (0.0, 0.0);
        }
        let minutes = (e - s) as f64 / 60_000.0;
        (minutes * self.vcpus as f64, minutes * self.memory_mb as f64)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MetricRow {
    pub at_ms: i64,
    pub cpu_pct: f64,
    pub mem_bytes: i64,
    pub disk_bytes: i64,
}

const HOST_COLS: &str = "SELECT id, status, address, arch, cpu_cores, memory_mb, disk_gb, \
                         created_at, last_heartbeat, agent_token FROM hosts";
const CAPSULE_COLS: &str = "SELECT id, team_id, host_id, template, agent_template, status, vcpus, \
                            memory_mb, timeout_sec, disk_size_mb, metadata, created_at, \
                            started_at, last_active_at, last_updated, access_token, end_at, \
                            on_timeout, allow_internet, created_by FROM capsules";
const TEMPLATE_COLS: &str = "SELECT team_id, name, agent_name, type, host_id, vcpus, memory_mb, \
                             size_bytes, default_user, protected, metadata, created_at \
                             FROM templates";

fn parse<T: FromStr>(s: String) -> Result<T, DbError> {
    s.parse().map_err(|_| DbError::Corrupt(s))
}

fn parse_opt<T: FromStr>(s: Option<String>) -> Result<Option<T>, DbError> {
    s.filter(|s| !s.is_empty()).map(parse).transpose()
}

fn json_map(s: String) -> Result<BTreeMap<String, String>, DbError> {
    serde_json::from_str(&s).map_err(|_| DbError::Corrupt(s))
}

fn team_row(r: &AnyRow) -> Result<Team, DbError> {
    Ok(Team {
        id: parse(r.try_get::<String, _>("id")?)?,
        name: r.try_get("name")?,
        slug: r.try_get("slug")?,
        is_admin: r.try_get::<i64, _>("is_admin")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

fn key_row(r: &AnyRow) -> Result<ApiKey, DbError> {
    Ok(ApiKey {
        id: parse(r.try_get::<String, _>("id")?)?,
        team_id: parse(r.try_get::<String, _>("team_id")?)?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        key_prefix: r.try_get("key_prefix")?,
        created_at: r.try_get("created_at")?,
        last_used: r.try_get("last_used")?,
    })
}

fn host_row(r: &AnyRow) -> Result<Host, DbError> {
    Ok(Host {
        id: parse(r.try_get::<String, _>("id")?)?,
        status: r.try_get("status")?,
        address: r.try_get("address")?,
        arch: r.try_get("arch")?,
        cpu_cores: r.try_get("cpu_cores")?,
        memory_mb: r.try_get("memory_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        created_at: r.try_get("created_at")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        agent_token: r.try_get("agent_token")?,
    })
}

fn capsule_row(r: &AnyRow) -> Result<CapsuleRow, DbError> {
    Ok(CapsuleRow {
        id: parse(r.try_get::<String, _>("id")?)?,
        team_id: parse(r.try_get::<String, _>("team_id")?)?,
        host_id: parse_opt(r.try_get("host_id")?)?,
        template: r.try_get("template")?,
        agent_template: r.try_get("agent_template")?,
        status: parse(r.try_get::<String, _>("status")?)?,
        vcpus: r.try_get("vcpus")?,
        memory_mb: r.try_get("memory_mb")?,
        timeout_sec: r.try_get("timeout_sec")?,
        disk_size_mb: r.try_get("disk_size_mb")?,
        metadata: json_map(r.try_get("metadata")?)?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        last_active_at: r.try_get("last_active_at")?,
        last_updated: r.try_get("last_updated")?,
        access_token: r.try_get("access_token")?,
        end_at: r.try_get("end_at")?,
        on_timeout: parse(r.try_get::<String, _>("on_timeout")?)?,
        allow_internet: r
            .try_get::<Option<i64>, _>("allow_internet")?
            .map(|v| v != 0),
        created_by: r.try_get("created_by")?,
    })
}

fn template_row(r: &AnyRow) -> Result<TemplateRow, DbError> {
    Ok(TemplateRow {
        team_id: parse(r.try_get::<String, _>("team_id")?)?,
        name: r.try_get("name")?,
        agent_name: r.try_get("agent_name")?,
        kind: r.try_get("type")?,
        host_id: parse_opt(r.try_get("host_id")?)?,
        vcpus: r.try_get("vcpus")?,
        memory_mb: r.try_get("memory_mb")?,
        size_bytes: r.try_get("size_bytes")?,
        default_user: r.try_get("default_user")?,
        protected: r.try_get::<i64, _>("protected")? != 0,
        metadata: json_map(r.try_get("metadata")?)?,
        created_at: r.try_get("created_at")?,
    })
}
