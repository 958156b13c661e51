-- The dispatcher claims and re-arms due rows in one statement and no longer records the
-- request id it sent: command ids are derived from the work itself
-- (klm_rotation.domain.schedule.command_id), so a refusal is matched by recomputing them.
DROP INDEX schedule_request;
ALTER TABLE schedule DROP COLUMN request_id;
