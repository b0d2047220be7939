-- Wrenn control plane schema, version 4: usage has a daily rollup.
--
-- usage_daily: a team's CPU and memory minutes for one finished UTC day
--   (`day` is YYYY-MM-DD), summed from capsule_runs once the day is over.
--   A team with no running time that day has no row.
-- usage_rollups: the days already rolled up (for every team at once), so
--   a day without any usage is not summed again.

CREATE TABLE usage_daily (
    team_id         TEXT NOT NULL,
    day             TEXT NOT NULL,
    cpu_minutes     DOUBLE PRECISION NOT NULL,
    ram_mb_minutes  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (team_id, day)
);

CREATE TABLE usage_rollups (
    day             TEXT PRIMARY KEY,
    rolled_at       BIGINT NOT NULL
);
