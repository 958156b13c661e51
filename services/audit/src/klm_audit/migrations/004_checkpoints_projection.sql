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

-- Indexes trimmed to what the queries need (each one costs every append):
-- * no query looks rows up by correlation_id (history joins the other way, on event_id);
-- * a type filter (GET /v1/events?type=) walks the primary key in sequence order, which is
--   the order it returns anyway; tenant-scoped reads keep (tenant, sequence).
DROP INDEX audit_log_correlation;
DROP INDEX audit_log_type;
