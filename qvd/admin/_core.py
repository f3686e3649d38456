"""
What every qvd-admin command shares: errors, the result, the context
(configuration, tenant scope, audit log, effects outside the database) and
the lookups of objects by the names administrators type.
"""

import json
import re

import attrs

from qvd import config as qconfig

VM_STATES = ("stopped", "starting", "running", "stopping", "zombie", "debugging")
OBJECTS_WITH_PROPERTIES = ("user", "vm", "host", "osf", "di")
DIGITS = re.compile(r"^\d+$")


class AdminError(Exception):
    """A refused operation: exit status 1."""
    status = 1


class AlreadyExists(AdminError):
    """An add of something that exists: exit status 1, or 0 with --exist-ok."""


class UsageError(AdminError):
    """Bad input on the command line: exit status 2."""
    status = 2


@attrs.define
class Result:
    """
    What a command prints: a message, or rows as a table (C{columns} in order).
    C{data} is what C{--json} prints for a message result.
    """
    message: str | None = None
    rows: list | None = None
    columns: list | None = None
    data: object = None


@attrs.define
class Context:
    """
    What every command needs besides the cursor.

    @ivar config: the node configuration (L{qvd.config.Config}).
    @ivar tenant: the tenant named by C{--tenant}, or None when not given.
    @ivar admin: the administrator name for the audit log ($USER).
    @ivar random: the load balancer's random source.
    """
    config: object
    tenant: str | None = None
    admin: str = "unknown"
    random: object = None
    _rollbacks: list = attrs.field(factory=list)
    _commits: list = attrs.field(factory=list)

    # -- effects outside the database ---------------------------------------
    def on_rollback(self, fn):
        self._rollbacks.append(fn)

    def after_commit(self, fn):
        self._commits.append(fn)

    def rolled_back(self):
        """Undo this attempt's effects outside the database."""
        undo, self._rollbacks, self._commits = self._rollbacks, [], []
        for fn in reversed(undo):
            try:
                fn()
            except OSError:
                pass

    def committed(self):
        done, self._commits, self._rollbacks = self._commits, [], []
        for fn in done:
            try:
                fn()
            except OSError:
                pass

    # -- configuration with the database layers -----------------------------
    def db_config(self, cur):
        """The node configuration with the database's configs rows on top."""
        cur.execute("SELECT tenant_id, key, value FROM configs")
        global_values, tenants = {}, {}
        for row in cur.fetchall():
            if row["tenant_id"] == qconfig.GLOBAL_TENANT:
                global_values[row["key"]] = row["value"]
            else:
                tenants.setdefault(row["tenant_id"], {})[row["key"]] = row["value"]
        try:
            return self.config.with_database(global_values, tenants)
        except qconfig.ConfigError as e:
            raise AdminError(f"{e}; fix it with 'qvd-admin config set' or 'config del'")

    # -- tenants ------------------------------------------------------------
    def tenant_name(self):
        return self.tenant if self.tenant is not None else "default"

    def scope(self, cur):
        """The tenant id the command is limited to, or None for '*' (all)."""
        if self.tenant == "*":
            return None
        return tenant_by_name(cur, self.tenant_name())["id"]

    # -- audit --------------------------------------------------------------
    def audit(self, cur, action, type_of_action, qvd_object, object_id=None,
              object_name=None, tenant_id=None, arguments=None):
        tenant_name = None
        if tenant_id is not None:
            cur.execute("SELECT name FROM tenants WHERE id = %s", (tenant_id,))
            row = cur.fetchone()
            tenant_name = row["name"] if row else None
        cur.execute(
            "INSERT INTO log (tenant_id, tenant_name, administrator_name, action, "
            "type_of_action, qvd_object, object_id, object_name, source, arguments) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'CLI', %s)",
            (tenant_id, tenant_name, self.admin, action, type_of_action, qvd_object,
             object_id, object_name, json.dumps(arguments or {}, default=str)))


def one(cur, sql, args=()):
    cur.execute(sql, args)
    return cur.fetchone()


def tenant_by_name(cur, name):
    row = one(cur, "SELECT id, name, blocked FROM tenants WHERE name = %s", (name,))
    if row is None:
        raise AdminError(f"unknown tenant {name!r}: see 'qvd-admin tenant list' "
                         "or add it with 'qvd-admin tenant add'")
    return row


def split_login(ctx, text):
    """'alice@t2' -> ('alice', 't2'); 'alice' -> ('alice', the --tenant)."""
    if "@" in text:
        login, _, tenant = text.rpartition("@")
        if login and tenant:
            return login, tenant
    return text, ctx.tenant_name() if ctx.tenant != "*" else "default"


def normalize_login(config, login):
    if config.getbool("model.user.login.case-sensitive"):
        return login
    return login.strip().lower()


def find_user(ctx, cur, text):
    login, tenant = split_login(ctx, text)
    login = normalize_login(ctx.config, login)
    t = tenant_by_name(cur, tenant)
    row = one(cur, "SELECT u.*, t.name AS tenant FROM users u JOIN tenants t ON t.id = u.tenant_id "
                   "WHERE u.login = %s AND u.tenant_id = %s", (login, t["id"]))
    if row is None:
        raise AdminError(f"unknown user {login!r} in tenant {tenant!r}: see 'qvd-admin user list"
                         f" --tenant {tenant}' or add it with 'qvd-admin user add'")
    return row


def find_admin(ctx, cur, text):
    name, tenant = split_login(ctx, text)
    t = tenant_by_name(cur, tenant)
    row = one(cur, "SELECT * FROM administrators WHERE name = %s AND tenant_id = %s",
              (name, t["id"]))
    if row is None:
        raise AdminError(f"unknown administrator {name!r} in tenant {tenant!r}: "
                         "see 'qvd-admin admin list'")
    return row


def find_osf(ctx, cur, name, tenant_id=None):
    """An OSF of the tenant (or of the common tenant -1)."""
    if tenant_id is None:
        tenant_id = ctx.scope(cur)
    if tenant_id is None:
        cur.execute("SELECT * FROM osfs WHERE name = %s ORDER BY id", (name,))
    else:
        cur.execute("SELECT * FROM osfs WHERE name = %s AND tenant_id IN (%s, -1) "
                    "ORDER BY tenant_id DESC", (name, tenant_id))
    rows = cur.fetchall()
    if not rows:
        raise AdminError(f"unknown OSF {name!r}: see 'qvd-admin osf list' or add it with "
                         "'qvd-admin osf add'")
    if tenant_id is None and len(rows) > 1:
        raise AdminError(f"OSF name {name!r} exists in several tenants: choose one with --tenant")
    return rows[0]


def find_di(ctx, cur, ref):
    """A DI by id, or by C{OSF:VERSION}."""
    if DIGITS.match(ref):
        row = one(cur, "SELECT d.*, o.name AS osf, o.tenant_id FROM dis d "
                       "JOIN osfs o ON o.id = d.osf_id WHERE d.id = %s", (int(ref),))
    elif ":" in ref:
        osf_name, _, version = ref.rpartition(":")
        osf = find_osf(ctx, cur, osf_name)
        row = one(cur, "SELECT d.*, o.name AS osf, o.tenant_id FROM dis d "
                       "JOIN osfs o ON o.id = d.osf_id WHERE d.osf_id = %s AND d.version = %s",
                  (osf["id"], version))
    else:
        raise UsageError(f"{ref!r} does not name a DI: give its id or OSF:VERSION")
    scope = ctx.scope(cur)
    if row is None or (scope is not None and row["tenant_id"] not in (scope, -1)):
        raise AdminError(f"unknown DI {ref!r}: see 'qvd-admin di list'")
    return row


VM_SELECT = """
    SELECT v.id, v.name, v.user_id, u.login, u.tenant_id, t.name AS tenant, v.osf_id,
           o.name AS osf, v.di_tag, host(v.ip) AS ip, v.mac::text AS mac, v.description,
           r.host_id, h.name AS host, r.vm_state, r.vm_cmd, r.user_state, r.user_cmd,
           r.l7r_host_id, r.blocked, r.vm_expiration_soft, r.vm_expiration_hard
      FROM vms v JOIN users u ON u.id = v.user_id
                 JOIN tenants t ON t.id = u.tenant_id
                 JOIN osfs o ON o.id = v.osf_id
                 JOIN vm_runtimes r ON r.vm_id = v.id
                 LEFT JOIN hosts h ON h.id = r.host_id
"""


def find_vm(ctx, cur, ref):
    """A VM of the tenant by id or by name (names are unique per user only)."""
    scope = ctx.scope(cur)
    where, args = [], []
    if DIGITS.match(ref):
        where.append("v.id = %s")
        args.append(int(ref))
    else:
        where.append("v.name = %s")
        args.append(ref)
    if scope is not None:
        where.append("u.tenant_id = %s")
        args.append(scope)
    cur.execute(VM_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY v.id", args)
    rows = cur.fetchall()
    if not rows:
        raise AdminError(f"unknown VM {ref!r} in tenant {ctx.tenant_name()!r}: "
                         "see 'qvd-admin vm list'")
    if len(rows) > 1:
        ids = ", ".join(str(r["id"]) for r in rows)
        raise AdminError(f"VM name {ref!r} is used by several VMs (ids {ids}): give the id")
    return rows[0]


def find_host(cur, name):
    row = one(cur, "SELECT h.*, r.state, r.blocked, r.ok_ts FROM hosts h "
                   "JOIN host_runtimes r ON r.host_id = h.id WHERE h.name = %s", (name,))
    if row is None:
        raise AdminError(f"unknown host {name!r}: see 'qvd-admin host list' or add it with "
                         "'qvd-admin host add'")
    return row


def hash_password(password):
    from qvd.passwords import hash_password
    if not password:
        raise UsageError("the password is empty: give one with --password")
    return hash_password(password)
