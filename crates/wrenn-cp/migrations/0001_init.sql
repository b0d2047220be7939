-- Wrenn control plane schema, version 1.
--
-- One file for SQLite and PostgreSQL: it keeps to the types both share
-- (TEXT, BIGINT, DOUBLE PRECISION) and stores times as Unix milliseconds
-- and flags as 0/1, so every query runs unchanged on both. CI migrates
-- and tests both databases.

CREATE TABLE teams (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    slug        TEXT NOT NULL UNIQUE,
    is_admin    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    team_id     TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- 'wrenn' (wrn_ + 32 hex) or 'e2b' (e2b_ + 40 hex)
    kind        TEXT NOT NULL,
    -- SHA-256 of the whole key, lowercase hex; the key itself is never stored
    key_hash    TEXT NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    last_used   BIGINT
);
CREATE INDEX api_keys_team ON api_keys(team_id);

CREATE TABLE hosts (
    id                 TEXT PRIMARY KEY,
    -- pending (registration token issued), online, unreachable
    status             TEXT NOT NULL,
    address            TEXT NOT NULL DEFAULT '',
    registration_hash  TEXT,
    token_hash         TEXT,
    arch               TEXT NOT NULL DEFAULT '',
    cpu_cores          BIGINT NOT NULL DEFAULT 0,
    memory_mb          BIGINT NOT NULL DEFAULT 0,
    disk_gb            BIGINT NOT NULL DEFAULT 0,
    created_at         BIGINT NOT NULL,
    last_heartbeat     BIGINT
);

CREATE TABLE capsules (
    id              TEXT PRIMARY KEY,
    team_id         TEXT NOT NULL,
    host_id         TEXT,
    -- the template as the caller named it, and its name on the host
    template        TEXT NOT NULL,
    agent_template  TEXT NOT NULL,
    status          TEXT NOT NULL,
    vcpus           BIGINT NOT NULL,
    memory_mb       BIGINT NOT NULL,
    timeout_sec     BIGINT NOT NULL,
    disk_size_mb    BIGINT NOT NULL,
    metadata        TEXT NOT NULL DEFAULT '{}',
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    last_active_at  BIGINT,
    last_updated    BIGINT NOT NULL
);
CREATE INDEX capsules_team ON capsules(team_id, created_at);
CREATE INDEX capsules_host ON capsules(host_id, status);

-- Templates callers can name. team_id is the owner; platform templates
-- belong to the all-zero team. agent_name is the directory on the host.
CREATE TABLE templates (
    team_id       TEXT NOT NULL,
    name          TEXT NOT NULL,
    agent_name    TEXT NOT NULL,
    type          TEXT NOT NULL,
    host_id       TEXT,
    vcpus         BIGINT,
    memory_mb     BIGINT,
    size_bytes    BIGINT NOT NULL DEFAULT 0,
    default_user  TEXT NOT NULL DEFAULT '',
    protected     BIGINT NOT NULL DEFAULT 0,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (team_id, name)
);

-- One row per stretch of time a capsule was running: stats and usage.
CREATE TABLE capsule_runs (
    capsule_id  TEXT NOT NULL,
    team_id     TEXT NOT NULL,
    vcpus       BIGINT NOT NULL,
    memory_mb   BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    ended_at    BIGINT
);
CREATE INDEX capsule_runs_team ON capsule_runs(team_id, started_at);
CREATE INDEX capsule_runs_capsule ON capsule_runs(capsule_id);

-- Metrics kept when a capsule pauses (the agent's sampler stops).
CREATE TABLE capsule_metrics (
    capsule_id  TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    cpu_pct     DOUBLE PRECISION NOT NULL,
    mem_bytes   BIGINT NOT NULL,
    disk_bytes  BIGINT NOT NULL
);
CREATE INDEX capsule_metrics_capsule ON capsule_metrics(capsule_id, at_ms);
