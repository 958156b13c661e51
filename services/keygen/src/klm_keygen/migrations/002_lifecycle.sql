-- keygen lifecycle: find a version by its HSM object id (the start-up orphan sweep) and
-- the keys whose destruction is scheduled. Destruction clears key_versions.wrapped and
-- destroys HSM objects; rows are never deleted (the role has no DELETE on keys/versions).

CREATE INDEX key_versions_hsm_object_idx ON key_versions (hsm_object_id)
    WHERE hsm_object_id IS NOT NULL;
CREATE INDEX keys_destroy_after_idx ON keys (destroy_after)
    WHERE destroy_after IS NOT NULL;
