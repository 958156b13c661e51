-- keygen usage: every change of a key or of one of its versions notifies the usage side
-- (channel klm_key_changed, payload = key_id) at commit, so that its cache of key records
-- forgets the key at once (every keygen instance listens; the cache also has a TTL).

CREATE FUNCTION notify_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('klm_key_changed', NEW.key_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_notify_usage AFTER UPDATE ON keys
    FOR EACH ROW EXECUTE FUNCTION notify_key_changed();
CREATE TRIGGER key_versions_notify_usage AFTER INSERT OR UPDATE ON key_versions
    FOR EACH ROW EXECUTE FUNCTION notify_key_changed();
