-- Wrenn control plane schema, version 7: a host's replaced certificates
-- are revoked (wrenn-api.md §1.2, §6).
--
-- hosts.cert_serial / cert_expires_at: the serial (hex) of the newest
--   certificate issued to the host and when it expires (Unix ms). NULL
--   for a host certified before this version: its certificate is not
--   known, so issuing it the next one revokes nothing.
-- revoked_certs: certificates the authority no longer vouches for, listed
--   in the revocation list every control plane on the database checks
--   agents against. A row goes once its certificate has expired.

ALTER TABLE hosts ADD COLUMN cert_serial TEXT;
ALTER TABLE hosts ADD COLUMN cert_expires_at BIGINT;

CREATE TABLE revoked_certs (
    serial      TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL,
    revoked_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
