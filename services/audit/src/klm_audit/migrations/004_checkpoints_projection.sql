-- Signed checkpoints, and the read models' own position in the log (docs/audit.md).

-- Every klm.audit.checkpoint recorded in the chain, also kept here: verification checks
-- each signature and that the chain still holds head_hash at sequence. Append-only like
-- audit_log, so rolling back the log means rolling back this table too, by hand.
CREATE TABLE checkpoints (
    log_sequence   bigint      PRIMARY KEY,  -- where the checkpoint event sits in audit_log
    event_id       text        NOT NULL UNIQUE,
    sequence       bigint      NOT NULL CHECK (sequence > 0),  -- the head it signs
    head_hash      bytea       NOT NULL CHECK (octet_length(head_hash) = 32),
    signed_at      timestamptz NOT NULL,
    algorithm      text        NOT NULL,
    signature      bytea       NOT NULL,
    public_key     bytea       NOT NULL,
    signing_key_id text        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION append_only_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION append_only_refuse_change();
ALTER TABLE checkpoints ENABLE ALWAYS TRIGGER checkpoints_append_only;

REVOKE ALL ON checkpoints FROM PUBLIC;
GRANT SELECT, INSERT ON checkpoints TO klm_audit;

-- The key inventory is no longer written in the append transaction: it follows the log
-- from its own position (event-sourcing tracking row), updated in the same transaction as
-- the views. Existing inventories were projected up to the head.
CREATE TABLE projection_position (
    name     text   PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);
INSERT INTO projection_position (name, position)
SELECT 'key_inventory', COALESCE(max(sequence), 0) FROM audit_log;
GRANT SELECT, UPDATE ON projection_position TO klm_audit;

-- The append path keeps only what appending needs: the primary key (sequence), the unique
-- event id (dedupe; byte order, "C", is all an id needs and compares fastest) and a BRIN on
-- occurred_at (next to free). The query indexes move to a projection, event_keys, filled
-- by the projector from the same position as the inventory: history by subject and
-- tenant-scoped reads go through it (reads bring it up to the head first); a type filter
-- walks the primary key in sequence order, the order it returns anyway.
ALTER TABLE audit_log ALTER COLUMN event_id TYPE text COLLATE "C";
DROP INDEX audit_log_correlation;
DROP INDEX audit_log_type;
DROP INDEX audit_log_subject;
DROP INDEX audit_log_tenant;

CREATE TABLE event_keys (
    sequence bigint NOT NULL,
    subject  text COLLATE "C",
    tenant   text COLLATE "C"
);
INSERT INTO event_keys (sequence, subject, tenant)
SELECT sequence, subject, tenant FROM audit_log
 WHERE subject IS NOT NULL OR tenant IS NOT NULL;
CREATE INDEX event_keys_subject ON event_keys (subject, sequence) WHERE subject IS NOT NULL;
CREATE INDEX event_keys_tenant ON event_keys (tenant, sequence) WHERE tenant IS NOT NULL;
GRANT SELECT, INSERT, DELETE ON event_keys TO klm_audit;
