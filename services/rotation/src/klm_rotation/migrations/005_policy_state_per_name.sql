-- Several policies in force (the default one and the named ones of KLM_POLICY_DIR): one row
-- per policy, keyed by its name, with the file it came from. The single row recorded so far
-- stays, keyed by its name (its id column, primary key and check go with the column).
-- A policy that leaves the directory loses its row (its klm.policy.changed says removed).
ALTER TABLE policy_state DROP COLUMN id;
ALTER TABLE policy_state ADD PRIMARY KEY (name);
ALTER TABLE policy_state ADD COLUMN path text;
GRANT DELETE ON policy_state TO klm_rotation;
