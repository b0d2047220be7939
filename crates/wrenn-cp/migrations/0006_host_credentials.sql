-- Wrenn control plane schema, version 6: host credentials expire and rotate
-- (wrenn-api.md §1.2, §5).
--
-- host_signing_key: one row (id 1), the HS256 key host tokens (JWTs, 7
--   days) are signed with, hex. Shared by every control plane on the
--   database, as the authority is; the first to start makes it.
-- hosts.refresh_hash / refresh_expires_at: the SHA-256 of the host's
--   refresh token (64 hex, 60 days) and when it expires (Unix ms). Each
--   use replaces it.
-- hosts.prev_refresh_hash / prev_refresh_until: the one it replaced, still
--   taken until then (a few minutes), for an agent that never got the
--   answer to its refresh.
--
-- A host registered before this keeps working: its old host token (64
-- hex, stored as the same kind of hash) becomes its refresh token, good
-- until its first use (the agent sends it when it has no refresh token).
-- hosts.token_hash is no longer read after that.

CREATE TABLE host_signing_key (
    id       INTEGER PRIMARY KEY,
    key_hex  TEXT NOT NULL
);

ALTER TABLE hosts ADD COLUMN refresh_hash TEXT;
ALTER TABLE hosts ADD COLUMN refresh_expires_at BIGINT;
ALTER TABLE hosts ADD COLUMN prev_refresh_hash TEXT;
ALTER TABLE hosts ADD COLUMN prev_refresh_until BIGINT;

-- (9999-12-31: until first used)
UPDATE hosts SET refresh_hash = token_hash, refresh_expires_at = 253402300799000
    WHERE token_hash IS NOT NULL;
