-- Tell listeners when a VM's state or its user's state changes, whoever wrote it,
-- so the L7R waits for 'running' by LISTEN instead of polling (reference 2.3).
-- Channel qvd_vm_state, payload '<vm_id>:<vm_state>:<user_state>'.

CREATE FUNCTION qvd_notify_vm_state() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.vm_state IS DISTINCT FROM OLD.vm_state
       OR NEW.user_state IS DISTINCT FROM OLD.user_state THEN
        PERFORM pg_notify('qvd_vm_state',
                          NEW.vm_id || ':' || NEW.vm_state || ':' || NEW.user_state);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.vm_state IS DISTINCT FROM OLD.vm_state THEN
        NEW.vm_state_ts := now();
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.user_state IS DISTINCT FROM OLD.user_state THEN
        NEW.user_state_ts := now();
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER vm_runtimes_state BEFORE INSERT OR UPDATE ON vm_runtimes
    FOR EACH ROW EXECUTE FUNCTION qvd_notify_vm_state();
