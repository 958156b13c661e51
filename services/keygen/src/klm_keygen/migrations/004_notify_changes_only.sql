-- keygen usage: a new key's first version no longer notifies klm_key_changed. The usage
-- cache holds only keys it read, and a key and its first version are inserted in one
-- statement, so no cache can hold a key before that insert: the notification forgot nothing,
-- yet every generated key cost one in Postgres and, in every keygen, an HSM-thread call to
-- evict handles that could not exist. New versions (rotation) and every update still notify;
-- a restore notifies for the keys it writes (adapters/backup_keystore.py).

DROP TRIGGER key_versions_notify_usage ON key_versions;
CREATE TRIGGER key_versions_notify_usage AFTER UPDATE ON key_versions
    FOR EACH ROW EXECUTE FUNCTION notify_key_changed();
CREATE TRIGGER key_versions_notify_usage_new AFTER INSERT ON key_versions
    FOR EACH ROW WHEN (NEW.version > 1) EXECUTE FUNCTION notify_key_changed();
