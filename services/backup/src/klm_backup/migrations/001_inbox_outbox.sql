-- backup's idempotent inbox and transactional outbox (see klm_common.inbox / klm_common.outbox)
CREATE TABLE inbox (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea,
    value      bytea NOT NULL,
    headers    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT ON inbox TO klm_backup;
GRANT SELECT, INSERT, DELETE ON outbox TO klm_backup;
GRANT USAGE ON SEQUENCE outbox_seq_seq TO klm_backup;
