-- The append-only, hash-chained audit log (DESIGN §6, docs/audit.md).
-- Applied by the admin role (klm db migrate); klm_audit gets INSERT and SELECT only.

CREATE TABLE audit_log (
    sequence        bigint      PRIMARY KEY CHECK (sequence > 0),
    event_id        text        NOT NULL UNIQUE,
    type            text        NOT NULL,
    subject         text,
    key_version     integer,
    source          text        NOT NULL,
    tenant          text,
    correlation_id  text,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    topic           text        NOT NULL,
    kafka_partition integer,
    kafka_offset    bigint,
    -- the canonical JSON of the envelope, exactly the bytes the hash covers
    canonical       text        NOT NULL,
    prev_hash       bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            bytea       NOT NULL CHECK (octet_length(hash) = 32)
);

CREATE INDEX audit_log_subject ON audit_log (subject, sequence) WHERE subject IS NOT NULL;
CREATE INDEX audit_log_correlation ON audit_log (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX audit_log_tenant ON audit_log (tenant, sequence);
CREATE INDEX audit_log_type ON audit_log (type, sequence);
-- events arrive roughly in time order: a BRIN index serves time ranges at almost no write cost
CREATE INDEX audit_log_occurred ON audit_log USING brin (occurred_at);

-- Append-only, even for the table owner: UPDATE, DELETE and TRUNCATE raise.
-- Statement-level so an UPDATE/DELETE matching no row is refused as well; ENABLE ALWAYS so
-- session_replication_role = replica does not silence it. Only an explicit
-- ALTER TABLE ... DISABLE TRIGGER by the owner or a superuser gets past it, and
-- /v1/audit/verify detects whatever was changed then.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;

REVOKE ALL ON audit_log FROM PUBLIC;
GRANT SELECT, INSERT ON audit_log TO klm_audit;
