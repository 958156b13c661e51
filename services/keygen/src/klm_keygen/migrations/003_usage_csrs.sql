-- keygen usage: the PKCS#10 CSR of each version of a certificate-profile key (public data).
-- A rotation reads the previous CSR as the template (subject, SANs, extensions) of the next
-- one. Rows are written just before the key's own transaction (idempotent upsert), so a row
-- without a key is a harmless leftover of a batch that did not commit.

CREATE TABLE key_csrs (
    key_id      text NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    profile     text NOT NULL,
    csr_der     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, version)
);

GRANT SELECT, INSERT, UPDATE ON key_csrs TO klm_keygen;
