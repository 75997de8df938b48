-- A rebuild can wait for an operator's switch (the console's Projections page starts them so):
-- once it has replayed the store it is `ready`, keeps following the feed, and switches in only
-- when `rebuild_hold` is cleared (read_side::rebuild::switch). The active version serves, and
-- is kept, until then.
ALTER TABLE projections ADD COLUMN rebuild_hold boolean NOT NULL DEFAULT false;
ALTER TABLE projections DROP CONSTRAINT projections_rebuild_state_check;
ALTER TABLE projections ADD CONSTRAINT projections_rebuild_state_check
    CHECK (rebuild_state IN ('running', 'ready', 'failed', 'aborting'));
