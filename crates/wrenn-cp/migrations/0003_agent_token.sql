-- Wrenn control plane schema, version 3: the agent RPC is authenticated.
--
-- agent_token: the secret the host's agent requires on every RPC and port
--   proxy request (X-Wrenn-Agent-Token). The agent makes it and tells the
--   control plane when it registers and on every heartbeat; kept in clear
--   because the control plane presents it. '' for hosts registered before.

ALTER TABLE hosts ADD COLUMN agent_token TEXT NOT NULL DEFAULT '';
