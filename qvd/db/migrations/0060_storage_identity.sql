-- The identity of the cluster's shared storage (issue 11): a random id that
-- qvd-admin storage init writes here and into the marker file .qvd-storage-id
-- at the root of the shared volume. With path.storage.shared = 1 an HKD runs
-- VMs only from a path.storage.root whose marker holds this id.
CREATE TABLE storage_identity (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    storage_id  text NOT NULL,
    created     timestamptz NOT NULL DEFAULT now()
);

-- What was deleted and may have left files behind: every deleted DI (its file
-- name, whose unpacked trees each node removes) and VM (its home and
-- overlays), whatever deleted it (qvd-admin, a cascade from its OSF, tenant
-- or user, the WAT). The HKDs' storage sweep reads it (docs/storage.md).
CREATE TABLE deleted_storage (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('di', 'vm')),
    object_id   integer NOT NULL,
    name        text,
    deleted     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION deleted_storage_di() RETURNS trigger AS $$
BEGIN
    INSERT INTO deleted_storage (kind, object_id, name) VALUES ('di', OLD.id, OLD.path);
    RETURN OLD;
END $$ LANGUAGE plpgsql SECURITY DEFINER;

CREATE FUNCTION deleted_storage_vm() RETURNS trigger AS $$
BEGIN
    INSERT INTO deleted_storage (kind, object_id, name) VALUES ('vm', OLD.id, OLD.name);
    RETURN OLD;
END $$ LANGUAGE plpgsql SECURITY DEFINER;

CREATE TRIGGER dis_deleted_storage AFTER DELETE ON dis
    FOR EACH ROW EXECUTE FUNCTION deleted_storage_di();
CREATE TRIGGER vms_deleted_storage AFTER DELETE ON vms
    FOR EACH ROW EXECUTE FUNCTION deleted_storage_vm();
