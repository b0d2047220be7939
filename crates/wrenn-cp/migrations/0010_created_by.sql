-- Wrenn control plane schema, version 10: which control plane's create
-- made a capsule's row (its identity; NULL for rows from before). A create
-- can take minutes when its host first gets a copy of the template, and
-- control planes sharing the database leave each other's creates that
-- have not started yet alone for a while.

ALTER TABLE capsules ADD COLUMN created_by TEXT;
