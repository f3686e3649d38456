-- qvd data model, after the original QVD 4.3 schema (reference section 5).
-- Every state column has a CHECK constraint; uniqueness as in the original
-- (login per tenant, VM IP, DI version per OSF, a tag once per OSF).

CREATE TABLE versions (
    component   text PRIMARY KEY,
    version     text NOT NULL
);

CREATE TABLE tenants (
    id          serial PRIMARY KEY,
    name        varchar(80) NOT NULL UNIQUE CHECK (name <> ''),
    description text,
    blocked     boolean NOT NULL DEFAULT false
);

CREATE TABLE administrators (
    id          serial PRIMARY KEY,
    tenant_id   integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        varchar(64) NOT NULL CHECK (name <> ''),
    password    text,
    description text,
    language    text NOT NULL DEFAULT 'auto'
                CHECK (language IN ('es', 'en', 'auto', 'default')),
    blocked     boolean NOT NULL DEFAULT false,
    UNIQUE (name, tenant_id)
);

CREATE TABLE roles (
    id          serial PRIMARY KEY,
    name        varchar(64) NOT NULL UNIQUE,
    fixed       boolean NOT NULL DEFAULT false,
    description text
);

CREATE TABLE acls (
    id          serial PRIMARY KEY,
    name        varchar(64) NOT NULL UNIQUE,
    description text
);

CREATE TABLE acl_role_relations (
    role_id     integer NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    acl_id      integer NOT NULL REFERENCES acls(id) ON DELETE CASCADE,
    positive    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (role_id, acl_id)
);

CREATE TABLE role_role_relations (
    inheritor_id integer NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    inherited_id integer NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    PRIMARY KEY (inheritor_id, inherited_id),
    CHECK (inheritor_id <> inherited_id)
);

CREATE TABLE role_administrator_relations (
    role_id          integer NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    administrator_id integer NOT NULL REFERENCES administrators(id) ON DELETE CASCADE,
    PRIMARY KEY (role_id, administrator_id)
);

CREATE TABLE users (
    id          serial PRIMARY KEY,
    tenant_id   integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    login       varchar(64) NOT NULL CHECK (login <> ''),
    password    text,
    blocked     boolean NOT NULL DEFAULT false,
    description text,
    language    text NOT NULL DEFAULT 'default'
                CHECK (language IN ('es', 'en', 'auto', 'default')),
    UNIQUE (login, tenant_id)
);

CREATE TABLE osfs (
    id                serial PRIMARY KEY,
    tenant_id         integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name              varchar(64) NOT NULL CHECK (name <> ''),
    memory            integer NOT NULL DEFAULT 256 CHECK (memory > 0),
    use_overlay       boolean NOT NULL DEFAULT true,
    is_application    boolean NOT NULL DEFAULT false,
    user_storage_size integer CHECK (user_storage_size IS NULL OR user_storage_size >= 0),
    description       text,
    UNIQUE (name, tenant_id)
);

CREATE TABLE dis (
    id          serial PRIMARY KEY,
    osf_id      integer NOT NULL REFERENCES osfs(id) ON DELETE CASCADE,
    path        text NOT NULL CHECK (path <> '' AND position('/' in path) = 0),
    version     varchar(64) NOT NULL CHECK (version <> ''),
    blocked     boolean NOT NULL DEFAULT false,
    description text,
    UNIQUE (osf_id, version),
    UNIQUE (id, osf_id)
);

-- osf_id repeats the DI's OSF so that a tag can be unique per OSF.
CREATE TABLE di_tags (
    id          serial PRIMARY KEY,
    di_id       integer NOT NULL,
    osf_id      integer NOT NULL,
    tag         varchar(1024) NOT NULL CHECK (tag <> ''),
    fixed       boolean NOT NULL DEFAULT false,
    FOREIGN KEY (di_id, osf_id) REFERENCES dis(id, osf_id) ON DELETE CASCADE,
    UNIQUE (osf_id, tag)
);

CREATE TABLE di_runtimes (
    di_id           integer PRIMARY KEY REFERENCES dis(id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'new'
                    CHECK (state IN ('new', 'generating', 'generated', 'uploading',
                                     'uploaded', 'verifying', 'verified', 'publishing',
                                     'published', 'failed', 'cancelled', 'retired')),
    state_ts        timestamptz NOT NULL DEFAULT now(),
    elapsed_time    integer,
    percentage      integer CHECK (percentage BETWEEN 0 AND 100),
    error_code      integer,
    status_message  text
);

CREATE TABLE hosts (
    id          serial PRIMARY KEY,
    name        varchar(127) NOT NULL UNIQUE CHECK (name <> ''),
    address     varchar(127) NOT NULL UNIQUE CHECK (address <> ''),
    frontend    boolean NOT NULL DEFAULT true,
    backend     boolean NOT NULL DEFAULT true,
    description text
);

CREATE TABLE host_runtimes (
    host_id     integer PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
    pid         integer,
    ok_ts       timestamptz,
    usable_ram  double precision,
    usable_cpu  double precision,
    hypervisor  text CHECK (hypervisor IN ('lxc', 'kvm', 'nothing')),
    state       text NOT NULL DEFAULT 'stopped'
                CHECK (state IN ('stopped', 'starting', 'running', 'stopping', 'lost')),
    state_ts    timestamptz NOT NULL DEFAULT now(),
    blocked     boolean NOT NULL DEFAULT false,
    cmd         text CHECK (cmd IN ('stop'))
);

CREATE TABLE host_counters (
    host_id         integer PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
    http_requests   bigint NOT NULL DEFAULT 0,
    auth_attempts   bigint NOT NULL DEFAULT 0,
    auth_ok         bigint NOT NULL DEFAULT 0,
    nx_attempts     bigint NOT NULL DEFAULT 0,
    nx_ok           bigint NOT NULL DEFAULT 0,
    short_sessions  bigint NOT NULL DEFAULT 0
);

CREATE TABLE vms (
    id          serial PRIMARY KEY,
    name        varchar(64) NOT NULL CHECK (name <> ''),
    user_id     integer NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    osf_id      integer NOT NULL REFERENCES osfs(id) ON DELETE RESTRICT,
    di_tag      varchar(1024) NOT NULL DEFAULT 'default',
    ip          inet NOT NULL UNIQUE,
    mac         macaddr NOT NULL UNIQUE,
    storage     text,
    description text,
    UNIQUE (name, user_id)
);

CREATE TABLE vm_runtimes (
    vm_id               integer PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    host_id             integer REFERENCES hosts(id) ON DELETE SET NULL,
    current_osf_id      integer REFERENCES osfs(id) ON DELETE SET NULL,
    current_di_id       integer REFERENCES dis(id) ON DELETE SET NULL,
    user_ip             text,
    real_user_id        integer REFERENCES users(id) ON DELETE SET NULL,
    vm_state            text NOT NULL DEFAULT 'stopped'
                        CHECK (vm_state IN ('stopped', 'starting', 'running', 'stopping',
                                            'zombie', 'debugging')),
    vm_state_ts         timestamptz NOT NULL DEFAULT now(),
    vm_state_reason     text,
    vm_cmd              text CHECK (vm_cmd IN ('start', 'stop', 'busy')),
    vm_pid              integer,
    user_state          text NOT NULL DEFAULT 'disconnected'
                        CHECK (user_state IN ('disconnected', 'connecting', 'connected')),
    user_state_ts       timestamptz NOT NULL DEFAULT now(),
    user_cmd            text CHECK (user_cmd IN ('abort')),
    vma_ok_ts           timestamptz,
    l7r_host_id         integer REFERENCES hosts(id) ON DELETE SET NULL,
    l7r_pid             integer,
    l7r_session         text,
    vm_address          text,
    vm_vma_port         integer,
    vm_x_port           integer,
    vm_ssh_port         integer,
    vm_vnc_port         integer,
    vm_mon_port         integer,
    vm_serial_port      integer,
    blocked             boolean NOT NULL DEFAULT false,
    vm_expiration_soft  timestamptz,
    vm_expiration_hard  timestamptz,
    -- a running VM is on a node; a command is only pending for a node
    CHECK (vm_state = 'stopped' OR host_id IS NOT NULL),
    CHECK (vm_cmd IS NULL OR host_id IS NOT NULL)
);
CREATE INDEX vm_runtimes_host_id ON vm_runtimes (host_id);
CREATE INDEX vm_runtimes_l7r_host_id ON vm_runtimes (l7r_host_id);

CREATE TABLE vm_counters (
    vm_id        integer PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    run_attempts bigint NOT NULL DEFAULT 0,
    run_ok       bigint NOT NULL DEFAULT 0
);

-- Configuration: tenant_id -1 is the global layer (reference section 6).
CREATE TABLE configs (
    tenant_id   integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    key         varchar(1024) NOT NULL CHECK (key <> ''),
    value       varchar(4096) NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE ssl_configs (
    key         varchar(64) PRIMARY KEY
                CHECK (key IN ('l7r.ssl.key', 'l7r.ssl.cert', 'l7r.ssl.ca', 'l7r.ssl.crl')),
    value       text NOT NULL
);

CREATE FUNCTION qvd_notify_config_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('qvd_config_changed', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER configs_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON configs
    FOR EACH STATEMENT EXECUTE FUNCTION qvd_notify_config_changed();
CREATE TRIGGER ssl_configs_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ssl_configs
    FOR EACH STATEMENT EXECUTE FUNCTION qvd_notify_config_changed();

-- Custom properties: a catalogue of keys per tenant and object type, and values.
CREATE TABLE properties_list (
    id          serial PRIMARY KEY,
    key         varchar(1024) NOT NULL CHECK (key <> ''),
    tenant_id   integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    qvd_object  text NOT NULL CHECK (qvd_object IN ('user', 'vm', 'host', 'osf', 'di')),
    description text,
    UNIQUE (key, tenant_id, qvd_object)
);

CREATE TABLE user_properties (
    user_id     integer NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    value       text NOT NULL,
    PRIMARY KEY (user_id, property_id)
);
CREATE TABLE vm_properties (
    vm_id       integer NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    value       text NOT NULL,
    PRIMARY KEY (vm_id, property_id)
);
CREATE TABLE host_properties (
    host_id     integer NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    value       text NOT NULL,
    PRIMARY KEY (host_id, property_id)
);
CREATE TABLE osf_properties (
    osf_id      integer NOT NULL REFERENCES osfs(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    value       text NOT NULL,
    PRIMARY KEY (osf_id, property_id)
);
CREATE TABLE di_properties (
    di_id       integer NOT NULL REFERENCES dis(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    value       text NOT NULL,
    PRIMARY KEY (di_id, property_id)
);

CREATE TABLE user_auth_parameters (
    id          serial PRIMARY KEY,
    parameters  jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE user_tokens (
    token          varchar(256) PRIMARY KEY,
    user_id        integer NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    vm_id          integer REFERENCES vms(id) ON DELETE CASCADE,
    expiration     bigint NOT NULL,
    auth_params_id integer REFERENCES user_auth_parameters(id) ON DELETE SET NULL,
    multi_use      boolean NOT NULL DEFAULT false
);

-- Audit log of every administrative action.
CREATE TABLE log (
    id                  bigserial PRIMARY KEY,
    time                timestamptz NOT NULL DEFAULT now(),
    tenant_id           integer,
    tenant_name         text,
    administrator_id    integer,
    administrator_name  text,
    action              text NOT NULL,
    type_of_action      text NOT NULL
                        CHECK (type_of_action IN ('create', 'update', 'delete', 'see', 'exec',
                                                  'login', 'other')),
    qvd_object          text NOT NULL,
    object_id           integer,
    object_name         text,
    status              integer NOT NULL DEFAULT 0,
    source              text NOT NULL DEFAULT 'CLI',
    ip                  text,
    arguments           jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX log_time ON log (time);

INSERT INTO versions (component, version) VALUES ('schema', '4.3.0');

-- Seed tenants: -1 common/invalid, 0 supertenant, 1 default (reference 5).
INSERT INTO tenants (id, name, description) VALUES
    (-1, '-', 'Objects common to all tenants'),
    (0, '*', 'Supertenant'),
    (1, 'default', 'Default tenant');
SELECT setval('tenants_id_seq', 1);
