-- Wrenn control plane schema, version 2: what E2B's API needs of a capsule.
--
-- access_token: envd's X-Access-Token for the capsule (E2B's envdAccessToken;
--   every capsule has one, so its envd is never open to whoever knows its ID).
-- end_at: an absolute deadline in Unix ms (E2B's timeout), NULL when the
--   capsule only has wrenn's inactivity TTL (timeout_sec, kept by the agent).
-- on_timeout: what reaching end_at does: 'kill' or 'pause'.

ALTER TABLE capsules ADD COLUMN access_token TEXT NOT NULL DEFAULT '';
ALTER TABLE capsules ADD COLUMN end_at BIGINT;
ALTER TABLE capsules ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'kill';
CREATE INDEX capsules_end_at ON capsules(status, end_at);

-- What happened to a capsule, line by line (E2B's sandbox logs): created,
-- paused, resumed, timed out, destroyed, reconciled.
CREATE TABLE capsule_logs (
    capsule_id  TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX capsule_logs_capsule ON capsule_logs(capsule_id, at_ms);
