-- Wrenn control plane schema, version 8: whether a capsule's creator set
-- its internet access (E2B's allowInternetAccess, which E2B's API shows
-- only when it was given): NULL when not set (access is on), else 0 or 1.

ALTER TABLE capsules ADD COLUMN allow_internet BIGINT;
