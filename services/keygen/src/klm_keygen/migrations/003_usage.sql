-- keygen usage: when each key was last used and how often (fed by the usage summaries;
-- one row per key, updated once per summary interval, never per operation).

CREATE TABLE key_usage (
    key_id        text PRIMARY KEY REFERENCES keys (key_id),
    last_used_at  timestamptz NOT NULL,
    use_count     bigint NOT NULL DEFAULT 0 CHECK (use_count >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON key_usage TO klm_keygen;
