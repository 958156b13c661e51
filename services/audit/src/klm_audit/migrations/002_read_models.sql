-- Read models rebuilt from audit_log (event sourcing): they may be dropped and replayed.

CREATE TABLE key_inventory (
    key_id        text        PRIMARY KEY,
    tenant        text        NOT NULL,
    state         text        NOT NULL,
    algorithm     text,
    view          jsonb       NOT NULL,
    last_sequence bigint      NOT NULL
);
CREATE INDEX key_inventory_tenant ON key_inventory (tenant, key_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON key_inventory TO klm_audit;
