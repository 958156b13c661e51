-- keygen's keystore: key metadata, versions with their wrapped material, inbox and outbox.
-- Material is only ever stored wrapped under the HSM-resident master KEK (AES-KWP).

CREATE TABLE keys (
    key_id          text PRIMARY KEY,
    owner           text NOT NULL,
    name            text NOT NULL,
    algorithm       text NOT NULL,
    size            integer NOT NULL,
    curve           text,
    usages          text[] NOT NULL,
    protection      text NOT NULL CHECK (protection IN ('hsm-wrapped', 'hsm-resident')),
    policy          text,
    profile         text,
    labels          jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL,
    primary_version integer NOT NULL,
    request_id      text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    destroy_after   timestamptz
);
CREATE INDEX keys_owner_idx ON keys (owner);

CREATE TABLE key_versions (
    key_id        text NOT NULL REFERENCES keys (key_id),
    version       integer NOT NULL CHECK (version >= 1),
    state         text NOT NULL,
    wrapped       bytea,           -- AES-KWP under the master KEK; NULL once destroyed
    kek_label     text,
    public_der    bytea,           -- SubjectPublicKeyInfo of an asymmetric key
    kcv           text,            -- key check value of a secret key
    hsm_object_id bytea,           -- CKA_ID of an hsm-resident version
    created_at    timestamptz NOT NULL,
    activated_at  timestamptz,
    deactivated_at timestamptz,
    destroyed_at  timestamptz,
    PRIMARY KEY (key_id, version)
);

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

GRANT SELECT, INSERT, UPDATE ON keys, key_versions TO klm_keygen;
GRANT SELECT, INSERT ON inbox TO klm_keygen;
GRANT SELECT, INSERT, DELETE ON outbox TO klm_keygen;
GRANT USAGE ON SEQUENCE outbox_seq_seq TO klm_keygen;
