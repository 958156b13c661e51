-- rotation's key inventory projection, due-work schedule, compliance findings, scan cursor
-- and the policy in force. Keys are never deleted (a destroyed key stays, state destroyed).
CREATE TABLE keys (
    key_id               text PRIMARY KEY,
    owner                text NOT NULL,
    name                 text NOT NULL,
    algorithm            text NOT NULL,
    size                 integer NOT NULL,
    curve                text,
    usages               text[] NOT NULL,
    profile              text,
    policy               text,
    origin               text NOT NULL CHECK (origin IN ('klm', 'observed')),
    location             text,
    state                text NOT NULL,
    primary_version      integer NOT NULL,
    primary_since        timestamptz NOT NULL,
    created_at           timestamptz NOT NULL,
    versions             jsonb NOT NULL,
    last_used_at         timestamptz,
    compromised_at       timestamptz,
    destroy_after        timestamptz,
    destruction_override boolean NOT NULL DEFAULT false,
    rejections           jsonb NOT NULL DEFAULT '{}',
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- due work: one row per (key, kind, version); the scheduler reads it by due_at only, so
-- its cost grows with the work due, not with the inventory
CREATE TABLE schedule (
    key_id        text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('rotate', 'deactivate', 'destroy')),
    version       integer NOT NULL,
    planned_at    timestamptz NOT NULL,
    due_at        timestamptz NOT NULL,
    reason        text NOT NULL,
    request_id    text,
    dispatched_at timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, kind, version)
);
CREATE INDEX schedule_due ON schedule (due_at);
CREATE INDEX schedule_request ON schedule (request_id) WHERE request_id IS NOT NULL;

CREATE TABLE findings (
    key_id    text NOT NULL,
    code      text NOT NULL,
    severity  text NOT NULL,
    rule      text NOT NULL,
    evidence  jsonb NOT NULL,
    raised_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, code)
);

-- where the continuous compliance scan is in the inventory (one row; the instance holding
-- its row lock scans, the others skip)
CREATE TABLE scan_cursor (
    id              smallint PRIMARY KEY CHECK (id = 1),
    after_key       text NOT NULL DEFAULT '',
    passes          bigint NOT NULL DEFAULT 0,
    pass_started_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO scan_cursor (id) VALUES (1);

CREATE TABLE policy_state (
    id        smallint PRIMARY KEY CHECK (id = 1),
    name      text NOT NULL,
    version   integer NOT NULL,
    sha256    text NOT NULL,
    document  jsonb NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON keys TO klm_rotation;
GRANT SELECT, INSERT, UPDATE, DELETE ON schedule TO klm_rotation;
GRANT SELECT, INSERT, UPDATE, DELETE ON findings TO klm_rotation;
GRANT SELECT, UPDATE ON scan_cursor TO klm_rotation;
GRANT SELECT, INSERT, UPDATE ON policy_state TO klm_rotation;
