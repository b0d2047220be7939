-- Wrenn control plane schema, version 9: copies of templates on hosts other
-- than the one that made them (a template's row names that host). A copy
-- is made when a capsule is placed on a host without the template's files;
-- its row says the host's copy of that host-side template is current.

CREATE TABLE template_copies (
    agent_name  TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (agent_name, host_id)
);
