-- An email recorded dead can be settled by an operator (the console's dead letters): sent
-- again (`sent`, or `no_address` if the customer is gone) or given up (`discarded`).
ALTER TABLE email_inbox DROP CONSTRAINT email_inbox_outcome_check;
ALTER TABLE email_inbox ADD CONSTRAINT email_inbox_outcome_check
    CHECK (outcome IN ('sent', 'no_address', 'dead', 'discarded'));
