-- How each key is protected, for the klm.keys gauge (state x algorithm x protection):
-- klm.key.generated's `protection` (hsm-wrapped, hsm-resident), 'observed' for imported
-- metadata. KLM keys projected before this column existed stay NULL (reported 'unknown'):
-- the facts that carried it were applied without it. The table-level grants of 002 cover
-- the new column.
ALTER TABLE keys ADD COLUMN protection text;
UPDATE keys SET protection = 'observed' WHERE origin = 'observed';
