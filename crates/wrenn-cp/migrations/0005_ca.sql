-- Wrenn control plane schema, version 5: the control plane is a
-- certificate authority for mutual TLS with its agents.
--
-- authority: one row (id 1), the CA's certificate and private key, PEM.
--   Every control plane on the same database signs with it, so an agent's
--   certificate is good for all of them. The first to start makes it.

CREATE TABLE authority (
    id          INTEGER PRIMARY KEY,
    cert_pem    TEXT NOT NULL,
    key_pem     TEXT NOT NULL
);
