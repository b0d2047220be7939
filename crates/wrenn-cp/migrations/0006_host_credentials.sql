-- Wrenn control plane schema, version 6: host credentials expire and rotate
-- (wrenn-api.md §1.2, §5).
--
-- host_signing_key: one row (id 1), the HS256 key host tokens (JWTs, 7
--   days) are signed with, hex. Shared by every control plane on the
--   database, as the authority is; the first to start makes it.
-- hosts.refresh_hash / refresh_expires_at: the SHA-256 of the host's
--   refresh token (64 hex, 60 days) and when it expires (Unix ms). Each
--   use replaces it. hosts.token_hash (host tokens before JWTs) is no
--   longer read.

CREATE TABLE host_signing_key (
    id       INTEGER PRIMARY KEY,
    key_hex  TEXT NOT NULL
);

ALTER TABLE hosts ADD COLUMN refresh_hash TEXT;
ALTER TABLE hosts ADD COLUMN refresh_expires_at BIGINT;
