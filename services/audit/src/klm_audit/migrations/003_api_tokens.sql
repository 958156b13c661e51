-- Bearer tokens of the auditor API. Written by the provisioning CLI (klm-audit tokens ...)
-- as the admin role; the service only reads them. Only a SHA-256 of each secret is stored.

CREATE TABLE api_tokens (
    token_id     text        PRIMARY KEY,
    secret_sha256 bytea      NOT NULL CHECK (octet_length(secret_sha256) = 32),
    role         text        NOT NULL CHECK (role IN ('auditor', 'admin')),
    tenant       text,
    name         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

REVOKE ALL ON api_tokens FROM PUBLIC;
GRANT SELECT ON api_tokens TO klm_audit;
