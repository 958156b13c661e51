-- The backup store: wrapped blobs (AES-KWP under the backup KEK, never clear material),
-- their metadata and an integrity tag; what backup knows of each key; crypto-shredding
-- evidence; restore drills and recoveries.

CREATE TABLE backup_keys (
    key_id          text PRIMARY KEY,
    owner           text NOT NULL,
    state           text NOT NULL,
    primary_version integer NOT NULL DEFAULT 1,
    generated       text,            -- the klm.key.generated payload (metadata, public key)
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE backups (
    backup_id      text PRIMARY KEY,
    key_id         text NOT NULL,
    version        integer NOT NULL CHECK (version >= 1),
    metadata       text NOT NULL,    -- canonical JSON of the version's BackupMaterial, no blob
    blob           bytea,            -- AES-KWP under the backup KEK; NULL = public-only (skipped)
    blob_sha256    text,
    skip_reason    text,
    backup_kek_kcv text,
    tag            bytea NOT NULL,   -- HMAC-SHA256 over metadata and blob (see integrity.py)
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (key_id, version)
);

-- destroyed keys: their backups are shredded and nothing of them is ever stored again
CREATE TABLE destroyed_keys (
    key_id             text PRIMARY KEY,
    destroyed_event_id text NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);

-- evidence of crypto-shredding (the digest of each deleted blob, never the blob)
CREATE TABLE shred_log (
    backup_id   text PRIMARY KEY,
    key_id      text NOT NULL,
    version     integer NOT NULL,
    blob_sha256 text,
    shredded_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE drills (
    drill_id     text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    sampled      integer NOT NULL,
    pending      integer NOT NULL,  -- check commands not answered yet
    passed       integer NOT NULL DEFAULT 0,
    failures     jsonb NOT NULL DEFAULT '[]'
);

CREATE TABLE recoveries (
    recovery_id text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    keys        integer NOT NULL,
    versions    integer NOT NULL,
    refused     jsonb NOT NULL DEFAULT '[]'
);

GRANT SELECT, INSERT, UPDATE ON backup_keys TO klm_backup;
-- no UPDATE on blobs: a backup is written once; DELETE only to crypto-shred
GRANT SELECT, INSERT, DELETE ON backups TO klm_backup;
GRANT SELECT, INSERT ON destroyed_keys, shred_log, recoveries TO klm_backup;
GRANT SELECT, INSERT, UPDATE ON drills TO klm_backup;
