-- An operator can abort a projection rebuild (the console's Projections page). The runner of
-- a rebuild sees `aborting` at its next batch or at the switch, drops the new version's
-- tables and clears the rebuild; the active version never stopped serving.
ALTER TABLE projections DROP CONSTRAINT projections_rebuild_state_check;
ALTER TABLE projections ADD CONSTRAINT projections_rebuild_state_check
    CHECK (rebuild_state IN ('running', 'failed', 'aborting'));
