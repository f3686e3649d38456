"""
The commands of qvd-admin, one function each.

    result = vm_start(ctx, cursor, args)      # inside one serializable transaction

Every command takes the L{Context} (configuration, tenant scope, audit), a
psycopg2 dict cursor inside a serializable transaction and the parsed
arguments; it returns a L{Result} or raises L{AdminError} (refused, exit 1) or
L{UsageError} (bad input, exit 2) with a message for people. A command that
changes something writes one row to the audit table C{log} through
L{Context.audit}. Effects outside the database (image files) are registered
with L{Context.on_rollback} and L{Context.after_commit} so that a failed
command leaves nothing behind.
"""

import datetime
import json
import os
import re
import shutil

import attrs

from qvd import config as qconfig
from qvd.admin.addresses import AddressError, VMRange, mac_for_ip

VM_STATES = ("stopped", "starting", "running", "stopping", "zombie", "debugging")
OBJECTS_WITH_PROPERTIES = ("user", "vm", "host", "osf", "di")
_DIGITS = re.compile(r"^\d+$")


class AdminError(Exception):
    """A refused operation: exit status 1."""
    status = 1


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


def _one(cur, sql, args=()):
    cur.execute(sql, args)
    return cur.fetchone()


def _notify(cur, channel, payload=""):
    cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))


# ---------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------

def tenant_by_name(cur, name):
    row = _one(cur, "SELECT id, name, blocked FROM tenants WHERE name = %s", (name,))
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
    row = _one(cur, "SELECT u.*, t.name AS tenant FROM users u JOIN tenants t ON t.id = u.tenant_id "
                    "WHERE u.login = %s AND u.tenant_id = %s", (login, t["id"]))
    if row is None:
        raise AdminError(f"unknown user {login!r} in tenant {tenant!r}: see 'qvd-admin user list"
                         f" --tenant {tenant}' or add it with 'qvd-admin user add'")
    return row


def find_admin(ctx, cur, text):
    name, tenant = split_login(ctx, text)
    t = tenant_by_name(cur, tenant)
    row = _one(cur, "SELECT * FROM administrators WHERE name = %s AND tenant_id = %s",
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
    if _DIGITS.match(ref):
        row = _one(cur, "SELECT d.*, o.name AS osf, o.tenant_id FROM dis d "
                        "JOIN osfs o ON o.id = d.osf_id WHERE d.id = %s", (int(ref),))
    elif ":" in ref:
        osf_name, _, version = ref.rpartition(":")
        osf = find_osf(ctx, cur, osf_name)
        row = _one(cur, "SELECT d.*, o.name AS osf, o.tenant_id FROM dis d "
                        "JOIN osfs o ON o.id = d.osf_id WHERE d.osf_id = %s AND d.version = %s",
                   (osf["id"], version))
    else:
        raise UsageError(f"{ref!r} does not name a DI: give its id or OSF:VERSION")
    scope = ctx.scope(cur)
    if row is None or (scope is not None and row["tenant_id"] not in (scope, -1)):
        raise AdminError(f"unknown DI {ref!r}: see 'qvd-admin di list'")
    return row


_VM_SELECT = """
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
    if _DIGITS.match(ref):
        where.append("v.id = %s")
        args.append(int(ref))
    else:
        where.append("v.name = %s")
        args.append(ref)
    if scope is not None:
        where.append("u.tenant_id = %s")
        args.append(scope)
    cur.execute(_VM_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY v.id", args)
    rows = cur.fetchall()
    if not rows:
        raise AdminError(f"unknown VM {ref!r} in tenant {ctx.tenant_name()!r}: "
                         "see 'qvd-admin vm list'")
    if len(rows) > 1:
        ids = ", ".join(str(r["id"]) for r in rows)
        raise AdminError(f"VM name {ref!r} is used by several VMs (ids {ids}): give the id")
    return rows[0]


def find_host(cur, name):
    row = _one(cur, "SELECT h.*, r.state, r.blocked, r.ok_ts FROM hosts h "
                    "JOIN host_runtimes r ON r.host_id = h.id WHERE h.name = %s", (name,))
    if row is None:
        raise AdminError(f"unknown host {name!r}: see 'qvd-admin host list' or add it with "
                         "'qvd-admin host add'")
    return row


# ---------------------------------------------------------------------------
# Tenants
# ---------------------------------------------------------------------------

def tenant_add(ctx, cur, args):
    if args.name in ("-", "*"):
        raise UsageError(f"tenant name {args.name!r} is reserved: choose another")
    if _one(cur, "SELECT 1 FROM tenants WHERE name = %s", (args.name,)):
        raise AdminError(f"tenant {args.name!r} already exists: choose another name")
    row = _one(cur, "INSERT INTO tenants (name, description) VALUES (%s, %s) RETURNING id",
               (args.name, args.description))
    ctx.audit(cur, "tenant_create", "create", "tenant", row["id"], args.name, row["id"],
              {"description": args.description})
    return Result(f"tenant {args.name!r} added (id {row['id']})",
                  data={"id": row["id"], "name": args.name})


def tenant_list(ctx, cur, args):
    cur.execute("SELECT t.id, t.name, t.blocked, "
                "(SELECT count(*) FROM users u WHERE u.tenant_id = t.id) AS users, "
                "t.description FROM tenants t ORDER BY t.id")
    return Result(rows=cur.fetchall(), columns=["id", "name", "blocked", "users", "description"])


def _tenant_for_change(cur, name):
    t = tenant_by_name(cur, name)
    if t["id"] in (-1, 0):
        raise AdminError(f"tenant {name!r} is built in and cannot be changed")
    return t


def tenant_del(ctx, cur, args):
    t = _tenant_for_change(cur, args.name)
    busy = _one(cur, "SELECT count(*) AS n FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id "
                     "JOIN users u ON u.id = v.user_id WHERE u.tenant_id = %s "
                     "AND (r.vm_state <> 'stopped' OR r.vm_cmd IS NOT NULL)", (t["id"],))["n"]
    if busy:
        raise AdminError(f"tenant {args.name!r} has {busy} VM(s) not stopped: stop them first "
                         "('qvd-admin vm list --tenant {0}')".format(args.name))
    cur.execute("DELETE FROM vms WHERE user_id IN (SELECT id FROM users WHERE tenant_id = %s)",
                (t["id"],))
    cur.execute("DELETE FROM tenants WHERE id = %s", (t["id"],))
    ctx.audit(cur, "tenant_delete", "delete", "tenant", t["id"], args.name)
    return Result(f"tenant {args.name!r} deleted", data={"id": t["id"], "name": args.name})


def _tenant_block(ctx, cur, args, blocked):
    t = _tenant_for_change(cur, args.name)
    cur.execute("UPDATE tenants SET blocked = %s WHERE id = %s", (blocked, t["id"]))
    verb = "blocked" if blocked else "unblocked"
    ctx.audit(cur, "tenant_update", "update", "tenant", t["id"], args.name, t["id"],
              {"blocked": blocked})
    return Result(f"tenant {args.name!r} {verb}", data={"id": t["id"], "blocked": blocked})


def tenant_block(ctx, cur, args):
    return _tenant_block(ctx, cur, args, True)


def tenant_unblock(ctx, cur, args):
    return _tenant_block(ctx, cur, args, False)


# ---------------------------------------------------------------------------
# Administrators
# ---------------------------------------------------------------------------

def _hash(password):
    from qvd.passwords import hash_password
    if not password:
        raise UsageError("the password is empty: give one with --password")
    return hash_password(password)


def admin_add(ctx, cur, args):
    name, tenant = split_login(ctx, args.name)
    t = tenant_by_name(cur, tenant)
    if _one(cur, "SELECT 1 FROM administrators WHERE name = %s AND tenant_id = %s",
            (name, t["id"])):
        raise AdminError(f"administrator {name!r} already exists in tenant {tenant!r}")
    row = _one(cur, "INSERT INTO administrators (tenant_id, name, password, description) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
               (t["id"], name, _hash(args.password), args.description))
    ctx.audit(cur, "administrator_create", "create", "administrator", row["id"], name, t["id"])
    return Result(f"administrator {name!r} added to tenant {tenant!r} (id {row['id']})",
                  data={"id": row["id"], "name": name, "tenant": tenant})


def admin_list(ctx, cur, args):
    scope = ctx.scope(cur)
    cur.execute("SELECT a.id, a.name, t.name AS tenant, a.blocked, a.description "
                "FROM administrators a JOIN tenants t ON t.id = a.tenant_id "
                "WHERE %s IS NULL OR a.tenant_id = %s ORDER BY a.id", (scope, scope))
    return Result(rows=cur.fetchall(), columns=["id", "name", "tenant", "blocked", "description"])


def admin_del(ctx, cur, args):
    a = find_admin(ctx, cur, args.name)
    cur.execute("DELETE FROM administrators WHERE id = %s", (a["id"],))
    ctx.audit(cur, "administrator_delete", "delete", "administrator", a["id"], a["name"],
              a["tenant_id"])
    return Result(f"administrator {a['name']!r} deleted", data={"id": a["id"]})


def admin_passwd(ctx, cur, args):
    a = find_admin(ctx, cur, args.name)
    cur.execute("UPDATE administrators SET password = %s WHERE id = %s",
                (_hash(args.password), a["id"]))
    ctx.audit(cur, "administrator_update", "update", "administrator", a["id"], a["name"],
              a["tenant_id"], {"password": "***"})
    return Result(f"password of administrator {a['name']!r} changed", data={"id": a["id"]})


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------

def user_add(ctx, cur, args):
    login, tenant = split_login(ctx, args.login)
    login = normalize_login(ctx.config, login)
    if not login:
        raise UsageError("the login is empty")
    t = tenant_by_name(cur, tenant)
    if t["id"] in (-1, 0):
        raise AdminError(f"users cannot belong to the built-in tenant {tenant!r}")
    if _one(cur, "SELECT 1 FROM users WHERE login = %s AND tenant_id = %s", (login, t["id"])):
        raise AdminError(f"user {login!r} already exists in tenant {tenant!r}: "
                         "choose another login")
    password = _hash(args.password) if args.password is not None else None
    row = _one(cur, "INSERT INTO users (tenant_id, login, password, description) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
               (t["id"], login, password, args.description))
    ctx.audit(cur, "user_create", "create", "user", row["id"], login, t["id"],
              {"description": args.description})
    return Result(f"user {login!r} added to tenant {tenant!r} (id {row['id']})",
                  data={"id": row["id"], "login": login, "tenant": tenant})


def user_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["true"], []
    if scope is not None:
        where.append("u.tenant_id = %s")
        params.append(scope)
    if args.blocked:
        where.append("u.blocked")
    cur.execute("SELECT u.id, u.login, t.name AS tenant, u.blocked, "
                "(SELECT count(*) FROM vms v WHERE v.user_id = u.id) AS vms, u.description "
                "FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE "
                + " AND ".join(where) + " ORDER BY u.id", params)
    return Result(rows=cur.fetchall(),
                  columns=["id", "login", "tenant", "blocked", "vms", "description"])


def user_del(ctx, cur, args):
    u = find_user(ctx, cur, args.login)
    busy = _one(cur, "SELECT string_agg(v.name, ', ') AS names FROM vms v "
                     "JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.user_id = %s "
                     "AND (r.vm_state <> 'stopped' OR r.vm_cmd IS NOT NULL)", (u["id"],))["names"]
    if busy:
        raise AdminError(f"user {u['login']!r} has VMs that are not stopped ({busy}): "
                         "stop them first with 'qvd-admin vm stop'")
    cur.execute("DELETE FROM users WHERE id = %s", (u["id"],))
    ctx.audit(cur, "user_delete", "delete", "user", u["id"], u["login"], u["tenant_id"])
    return Result(f"user {u['login']!r} deleted", data={"id": u["id"]})


def user_passwd(ctx, cur, args):
    u = find_user(ctx, cur, args.login)
    cur.execute("UPDATE users SET password = %s WHERE id = %s", (_hash(args.password), u["id"]))
    ctx.audit(cur, "user_update", "update", "user", u["id"], u["login"], u["tenant_id"],
              {"password": "***"})
    return Result(f"password of user {u['login']!r} changed", data={"id": u["id"]})


def _user_block(ctx, cur, args, blocked):
    u = find_user(ctx, cur, args.login)
    cur.execute("UPDATE users SET blocked = %s WHERE id = %s", (blocked, u["id"]))
    ctx.audit(cur, "user_update", "update", "user", u["id"], u["login"], u["tenant_id"],
              {"blocked": blocked})
    return Result(f"user {u['login']!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": u["id"], "blocked": blocked})


def user_block(ctx, cur, args):
    return _user_block(ctx, cur, args, True)


def user_unblock(ctx, cur, args):
    return _user_block(ctx, cur, args, False)


# ---------------------------------------------------------------------------
# OSFs
# ---------------------------------------------------------------------------

def _check_size(value, what):
    if value is not None and value < 0:
        raise UsageError(f"{what} must not be negative, got {value}")


def osf_add(ctx, cur, args):
    t = tenant_by_name(cur, ctx.tenant_name())
    if _one(cur, "SELECT 1 FROM osfs WHERE name = %s AND tenant_id = %s", (args.name, t["id"])):
        raise AdminError(f"OSF {args.name!r} already exists in tenant {t['name']!r}")
    cfg = ctx.db_config(cur)
    memory = args.memory if args.memory is not None else cfg.getint("osf.default.memory", t["id"])
    if memory <= 0:
        raise UsageError(f"--memory must be a positive number of MB, got {memory}")
    _check_size(args.user_storage, "--user-storage")
    overlay = args.overlay if args.overlay is not None else cfg.getbool("osf.default.overlay",
                                                                        t["id"])
    application = (args.application if args.application is not None
                   else cfg.getbool("osf.default.is_application", t["id"]))
    row = _one(cur, "INSERT INTO osfs (tenant_id, name, memory, use_overlay, is_application, "
                    "user_storage_size, description) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "RETURNING *", (t["id"], args.name, memory, overlay, application,
                                    args.user_storage, args.description))
    ctx.audit(cur, "osf_create", "create", "osf", row["id"], args.name, t["id"],
              {"memory": memory, "use_overlay": overlay, "is_application": application,
               "user_storage_size": args.user_storage})
    return Result(f"OSF {args.name!r} added (id {row['id']}, {memory} MB)", data=dict(row))


def osf_list(ctx, cur, args):
    scope = ctx.scope(cur)
    cur.execute("SELECT o.id, o.name, t.name AS tenant, o.memory, o.use_overlay AS overlay, "
                "o.user_storage_size AS user_storage, o.is_application AS application, "
                "(SELECT count(*) FROM dis d WHERE d.osf_id = o.id) AS dis, "
                "(SELECT count(*) FROM vms v WHERE v.osf_id = o.id) AS vms "
                "FROM osfs o JOIN tenants t ON t.id = o.tenant_id "
                "WHERE %s IS NULL OR o.tenant_id IN (%s, -1) ORDER BY o.id", (scope, scope))
    return Result(rows=cur.fetchall(), columns=["id", "name", "tenant", "memory", "overlay",
                                                "user_storage", "application", "dis", "vms"])


def osf_del(ctx, cur, args):
    o = find_osf(ctx, cur, args.name)
    used = _one(cur, "SELECT count(*) AS n FROM vms WHERE osf_id = %s", (o["id"],))["n"]
    if used:
        raise AdminError(f"OSF {o['name']!r} is used by {used} VM(s): delete them or move them "
                         "to another OSF first")
    cur.execute("SELECT path FROM dis WHERE osf_id = %s", (o["id"],))
    images = [r["path"] for r in cur.fetchall()]
    cur.execute("DELETE FROM osfs WHERE id = %s", (o["id"],))
    _remove_images_after_commit(ctx, images)
    ctx.audit(cur, "osf_delete", "delete", "osf", o["id"], o["name"], o["tenant_id"])
    return Result(f"OSF {o['name']!r} deleted" + (f" with {len(images)} DI(s)" if images else ""),
                  data={"id": o["id"]})


def osf_set(ctx, cur, args):
    o = find_osf(ctx, cur, args.name)
    changes = {}
    if args.new_name is not None:
        if _one(cur, "SELECT 1 FROM osfs WHERE name = %s AND tenant_id = %s AND id <> %s",
                (args.new_name, o["tenant_id"], o["id"])):
            raise AdminError(f"OSF {args.new_name!r} already exists in this tenant")
        changes["name"] = args.new_name
    if args.memory is not None:
        if args.memory <= 0:
            raise UsageError(f"--memory must be a positive number of MB, got {args.memory}")
        changes["memory"] = args.memory
    if args.user_storage is not None:
        _check_size(args.user_storage, "--user-storage")
        changes["user_storage_size"] = args.user_storage or None
    if args.overlay is not None:
        changes["use_overlay"] = args.overlay
    if args.application is not None:
        changes["is_application"] = args.application
    if args.description is not None:
        changes["description"] = args.description
    if not changes:
        raise UsageError("nothing to change: give --memory, --overlay/--no-overlay, "
                         "--user-storage, --application/--desktop, --name or --description")
    sets = ", ".join(f"{column} = %s" for column in changes)
    cur.execute(f"UPDATE osfs SET {sets} WHERE id = %s", list(changes.values()) + [o["id"]])
    ctx.audit(cur, "osf_update", "update", "osf", o["id"], o["name"], o["tenant_id"], changes)
    return Result(f"OSF {o['name']!r} changed: " + ", ".join(f"{k}={v}" for k, v in changes.items()),
                  data={"id": o["id"], **changes})


# ---------------------------------------------------------------------------
# DIs
# ---------------------------------------------------------------------------

def _images_dir(ctx):
    return ctx.config.get("path.storage.images")


def _remove_images_after_commit(ctx, names):
    images = _images_dir(ctx)
    for name in names:
        ctx.after_commit(lambda path=os.path.join(images, name): os.unlink(path))


def _default_version(cur, osf_id):
    today = datetime.date.today().isoformat()
    n = 0
    while True:
        version = f"{today}-{n:03d}"
        if not _one(cur, "SELECT 1 FROM dis WHERE osf_id = %s AND version = %s", (osf_id, version)):
            return version
        n += 1


def stage_image(ctx, path):
    """
    Copy the image C{path} next to its final place before the transaction, so
    the transaction only links it. Returns the staged path.
    """
    from qvd.loadbalancer import UnknownImageKind, di_hypervisor
    try:
        di_hypervisor(os.path.basename(path))
    except UnknownImageKind as e:
        raise UsageError(str(e))
    if not os.path.isfile(path):
        raise UsageError(f"disk image {path!r} does not exist or is not a file")
    images = _images_dir(ctx)
    try:
        os.makedirs(images, exist_ok=True)
    except OSError as e:
        raise AdminError(f"cannot create the image directory {images} ({e.strerror}): "
                         "check path.storage.images")
    staged = os.path.join(images, f".incoming-{os.getpid()}-{os.path.basename(path)}")
    try:
        shutil.copyfile(path, staged)
    except OSError as e:
        try:
            os.unlink(staged)
        except OSError:
            pass
        raise AdminError(f"cannot copy disk image {path!r} to {images}: {e.strerror}")
    return staged


def di_add(ctx, cur, args):
    o = find_osf(ctx, cur, args.osf)
    version = args.version or _default_version(cur, o["id"])
    if _one(cur, "SELECT 1 FROM dis WHERE osf_id = %s AND version = %s", (o["id"], version)):
        raise AdminError(f"OSF {o['name']!r} already has a DI of version {version!r}: "
                         "give another --version")
    if _one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = %s", (o["id"], version)):
        raise AdminError(f"version {version!r} is already a tag in OSF {o['name']!r}: "
                         "give another --version")
    row = _one(cur, "SELECT nextval(pg_get_serial_sequence('dis', 'id')) AS id")
    di_id = row["id"]
    name = f"{di_id}-{os.path.basename(args.file)}"
    final = os.path.join(_images_dir(ctx), name)
    if os.path.exists(final):
        raise AdminError(f"image file {final} already exists and belongs to no DI of this "
                         "database: move it away")
    os.link(args.staged, final)
    ctx.on_rollback(lambda: os.unlink(final))
    cur.execute("INSERT INTO dis (id, osf_id, path, version, description) "
                "VALUES (%s, %s, %s, %s, %s)", (di_id, o["id"], name, version, args.description))
    cur.execute("INSERT INTO di_runtimes (di_id, state) VALUES (%s, 'published')", (di_id,))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag, fixed) VALUES (%s, %s, %s, true)",
                (di_id, o["id"], version))
    cur.execute("DELETE FROM di_tags WHERE osf_id = %s AND tag = 'head'", (o["id"],))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'head')", (di_id, o["id"]))
    tags = [version, "head"]
    if not _one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = 'default'", (o["id"],)):
        cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                    (di_id, o["id"]))
        tags.append("default")
    ctx.audit(cur, "di_create", "create", "di", di_id, name, o["tenant_id"],
              {"osf": o["name"], "version": version, "file": args.file})
    return Result(f"DI {di_id} added to OSF {o['name']!r}: {name}, tags {', '.join(tags)}",
                  data={"id": di_id, "osf": o["name"], "path": name, "version": version,
                        "tags": tags})


def di_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["(%s IS NULL OR o.tenant_id IN (%s, -1))"], [scope, scope]
    if args.osf:
        where.append("d.osf_id = %s")
        params.append(find_osf(ctx, cur, args.osf)["id"])
    cur.execute("SELECT d.id, o.name AS osf, d.version, d.path, d.blocked, "
                "(SELECT string_agg(tag, ',' ORDER BY fixed DESC, tag) FROM di_tags g "
                " WHERE g.di_id = d.id) AS tags "
                "FROM dis d JOIN osfs o ON o.id = d.osf_id WHERE " + " AND ".join(where)
                + " ORDER BY d.id", params)
    return Result(rows=cur.fetchall(), columns=["id", "osf", "version", "path", "blocked", "tags"])


def _check_tag(tag):
    if not tag or not tag.strip() or "," in tag:
        raise UsageError(f"tag {tag!r} is not valid: use a non-empty word without commas")


def di_tag(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    _check_tag(args.tag)
    existing = _one(cur, "SELECT * FROM di_tags WHERE osf_id = %s AND tag = %s",
                    (d["osf_id"], args.tag))
    if existing is not None:
        if existing["di_id"] == d["id"]:
            return Result(f"DI {d['id']} already has tag {args.tag!r}", data={"id": d["id"]})
        if existing["fixed"]:
            raise AdminError(f"tag {args.tag!r} is the fixed version tag of DI "
                             f"{existing['di_id']} and cannot be moved")
        cur.execute("DELETE FROM di_tags WHERE id = %s", (existing["id"],))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, %s)",
                (d["id"], d["osf_id"], args.tag))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"__tags_changes__": {"create": [args.tag]}})
    moved = f" (moved from DI {existing['di_id']})" if existing else ""
    return Result(f"DI {d['id']} tagged {args.tag!r}{moved}", data={"id": d["id"], "tag": args.tag})


def di_untag(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    existing = _one(cur, "SELECT * FROM di_tags WHERE di_id = %s AND tag = %s",
                    (d["id"], args.tag))
    if existing is None:
        raise AdminError(f"DI {d['id']} has no tag {args.tag!r}: see 'qvd-admin di list'")
    if existing["fixed"]:
        raise AdminError(f"tag {args.tag!r} is the fixed version tag of DI {d['id']} "
                         "and cannot be removed")
    cur.execute("DELETE FROM di_tags WHERE id = %s", (existing["id"],))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"__tags_changes__": {"delete": [args.tag]}})
    return Result(f"tag {args.tag!r} removed from DI {d['id']}", data={"id": d["id"]})


def di_del(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    busy = _one(cur, "SELECT count(*) AS n FROM vm_runtimes WHERE current_di_id = %s "
                     "AND vm_state <> 'stopped'", (d["id"],))["n"]
    if busy:
        raise AdminError(f"DI {d['id']} is in use by {busy} VM(s) that are not stopped: "
                         "stop them first")
    cur.execute("SELECT tag FROM di_tags WHERE di_id = %s AND tag IN ('head', 'default')",
                (d["id"],))
    movable = [r["tag"] for r in cur.fetchall()]
    cur.execute("DELETE FROM dis WHERE id = %s", (d["id"],))
    newest = _one(cur, "SELECT id FROM dis WHERE osf_id = %s ORDER BY id DESC LIMIT 1",
                  (d["osf_id"],))
    if newest is not None:
        for tag in movable:
            cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, %s)",
                        (newest["id"], d["osf_id"], tag))
    _remove_images_after_commit(ctx, [d["path"]])
    ctx.audit(cur, "di_delete", "delete", "di", d["id"], d["path"], d["tenant_id"])
    return Result(f"DI {d['id']} ({d['path']}) deleted", data={"id": d["id"]})


def _di_block(ctx, cur, args, blocked):
    d = find_di(ctx, cur, args.di)
    cur.execute("UPDATE dis SET blocked = %s WHERE id = %s", (blocked, d["id"]))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"blocked": blocked})
    return Result(f"DI {d['id']} {'blocked' if blocked else 'unblocked'}",
                  data={"id": d["id"], "blocked": blocked})


def di_block(ctx, cur, args):
    return _di_block(ctx, cur, args, True)


def di_unblock(ctx, cur, args):
    return _di_block(ctx, cur, args, False)


# ---------------------------------------------------------------------------
# VMs
# ---------------------------------------------------------------------------

def vm_add(ctx, cur, args):
    if _DIGITS.match(args.name):
        raise UsageError(f"VM name {args.name!r} is only digits, which select VMs by id: "
                         "choose a name with a letter")
    user = find_user(ctx, cur, args.user)
    osf = find_osf(ctx, cur, args.osf, tenant_id=user["tenant_id"])
    if _one(cur, "SELECT 1 FROM vms WHERE name = %s AND user_id = %s", (args.name, user["id"])):
        raise AdminError(f"user {user['login']!r} already has a VM named {args.name!r}")
    tag = args.di_tag or "default"
    if not _one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = %s", (osf["id"], tag)):
        cur.execute("SELECT string_agg(tag, ', ' ORDER BY tag) AS tags FROM di_tags "
                    "WHERE osf_id = %s", (osf["id"],))
        tags = cur.fetchone()["tags"]
        raise AdminError(
            f"OSF {osf['name']!r} has no DI tagged {tag!r} "
            + (f"(its tags: {tags})" if tags else "(it has no DI yet: add one with "
               f"'qvd-admin di add --osf {osf['name']} FILE')"))
    cfg = ctx.db_config(cur)
    cur.execute("SELECT host(ip) AS ip FROM vms")
    used = [r["ip"] for r in cur.fetchall()]
    try:
        vm_range = VMRange.from_config(cfg.get("vm.network.ip.start"),
                                       cfg.get("vm.network.netmask"))
        ip = vm_range.check(args.ip, used) if args.ip else vm_range.allocate(used)
        mac = mac_for_ip(cfg.get("vm.network.mac.prefix"), ip)
    except AddressError as e:
        raise AdminError(str(e))
    row = _one(cur, "INSERT INTO vms (name, user_id, osf_id, di_tag, ip, mac, description) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
               (args.name, user["id"], osf["id"], tag, ip, mac, args.description))
    vm_id = row["id"]
    cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state) "
                "VALUES (%s, 'stopped', 'disconnected')", (vm_id,))
    cur.execute("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm_id,))
    ctx.audit(cur, "vm_create", "create", "vm", vm_id, args.name, user["tenant_id"],
              {"user": user["login"], "osf": osf["name"], "di_tag": tag, "ip": ip})
    return Result(f"VM {args.name!r} added (id {vm_id}) for user {user['login']!r}: "
                  f"ip {ip}, mac {mac}, OSF {osf['name']!r}, DI tag {tag!r}",
                  data={"id": vm_id, "name": args.name, "ip": ip, "mac": mac,
                        "user": user["login"], "osf": osf["name"], "di_tag": tag})


def vm_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["true"], []
    if scope is not None:
        where.append("u.tenant_id = %s")
        params.append(scope)
    if args.user:
        where.append("v.user_id = %s")
        params.append(find_user(ctx, cur, args.user)["id"])
    if args.state:
        if args.state not in VM_STATES:
            raise UsageError(f"--state {args.state!r} is not a VM state: use one of "
                             + ", ".join(VM_STATES))
        where.append("r.vm_state = %s")
        params.append(args.state)
    if args.host:
        where.append("r.host_id = %s")
        params.append(find_host(cur, args.host)["id"])
    if args.osf:
        where.append("v.osf_id = %s")
        params.append(find_osf(ctx, cur, args.osf)["id"])
    cur.execute(_VM_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY v.id", params)
    return Result(rows=cur.fetchall(),
                  columns=["id", "name", "login", "tenant", "osf", "di_tag", "ip", "vm_state",
                           "vm_cmd", "host", "user_state", "blocked"])


def vm_start(ctx, cur, args):
    from qvd import loadbalancer
    vm = find_vm(ctx, cur, args.vm)
    if vm["vm_state"] != "stopped":
        raise AdminError(f"VM {vm['name']!r} is {vm['vm_state']}, not stopped: nothing to start")
    if vm["vm_cmd"] == "start":
        raise AdminError(f"VM {vm['name']!r} already has a pending start (on host "
                         f"{vm['host']!r}): wait for it")
    if vm["vm_cmd"] is not None:
        raise AdminError(f"VM {vm['name']!r} has a pending {vm['vm_cmd']!r} command: "
                         "wait for its node to handle it")
    if vm["blocked"]:
        raise AdminError(f"VM {vm['name']!r} is blocked: 'qvd-admin vm unblock' it first")
    host_id, host = vm["host_id"], vm["host"]
    if host_id is None:
        cfg = ctx.db_config(cur)
        try:
            chosen = loadbalancer.select_host(
                cur, vm["id"], vm["name"], loadbalancer.weights_from_config(cfg, vm["tenant_id"]),
                ctx.random or __import__("random").random)
        except (loadbalancer.NoHostAvailable, loadbalancer.UnknownImageKind) as e:
            raise AdminError(str(e))
        host_id, host = chosen.host_id, chosen.name
    cur.execute("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = %s",
                (host_id, vm["id"]))
    _notify(cur, f"qvd_cmd_for_vm_on_host{host_id}")
    ctx.audit(cur, "vm_start", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"host": host})
    return Result(f"VM {vm['name']!r} will start on host {host!r}",
                  data={"id": vm["id"], "host": host, "host_id": host_id})


def vm_stop(ctx, cur, args):
    vm = find_vm(ctx, cur, args.vm)
    if vm["vm_state"] == "stopped":
        if vm["vm_cmd"] != "start":
            raise AdminError(f"VM {vm['name']!r} is already stopped")
        cur.execute("UPDATE vm_runtimes SET vm_cmd = NULL, host_id = NULL WHERE vm_id = %s",
                    (vm["id"],))
        _notify(cur, f"qvd_cmd_for_vm_on_host{vm['host_id']}")
        message = f"pending start of VM {vm['name']!r} cancelled"
    elif vm["vm_state"] in ("starting", "running", "debugging"):
        if vm["vm_cmd"] == "stop":
            raise AdminError(f"VM {vm['name']!r} already has a pending stop")
        cur.execute("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = %s", (vm["id"],))
        _notify(cur, f"qvd_cmd_for_vm_on_host{vm['host_id']}")
        message = f"VM {vm['name']!r} will stop (host {vm['host']!r})"
    else:
        raise AdminError(f"VM {vm['name']!r} is {vm['vm_state']}: it cannot be stopped now")
    ctx.audit(cur, "vm_stop", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(message, data={"id": vm["id"]})


def vm_disconnect(ctx, cur, args):
    vm = find_vm(ctx, cur, args.vm)
    if vm["user_state"] not in ("connecting", "connected"):
        raise AdminError(f"no user is connected to VM {vm['name']!r} "
                         f"(user state {vm['user_state']})")
    cur.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_id = %s", (vm["id"],))
    if vm["l7r_host_id"] is not None:
        _notify(cur, f"qvd_cmd_for_user_on_host{vm['l7r_host_id']}")
    ctx.audit(cur, "vm_user_disconnect", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(f"user of VM {vm['name']!r} will be disconnected", data={"id": vm["id"]})


def _vm_block(ctx, cur, args, blocked):
    vm = find_vm(ctx, cur, args.vm)
    cur.execute("UPDATE vm_runtimes SET blocked = %s WHERE vm_id = %s", (blocked, vm["id"]))
    ctx.audit(cur, "vm_update", "update", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"blocked": blocked})
    return Result(f"VM {vm['name']!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": vm["id"], "blocked": blocked})


def vm_block(ctx, cur, args):
    return _vm_block(ctx, cur, args, True)


def vm_unblock(ctx, cur, args):
    return _vm_block(ctx, cur, args, False)


_RELATIVE = re.compile(r"^\+(\d+)([smhd])$")


def parse_time(text, option, now=None):
    """
    An expiration time: ISO 8601 (local time when no zone), C{+N[smhd]}
    from now, or C{none} to clear.
    """
    if text.lower() == "none":
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    match = _RELATIVE.match(text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now + datetime.timedelta(**{unit: int(match.group(1))})
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a time: give ISO 8601 like "
                         "2026-12-31T18:00, a delay like +2h, or none")
    if value.tzinfo is None:
        value = value.astimezone()
    return value


def vm_expire(ctx, cur, args):
    if args.soft is None and args.hard is None:
        raise UsageError("give --soft and/or --hard (a time, +N[smhd] or none)")
    vm = find_vm(ctx, cur, args.vm)
    soft = parse_time(args.soft, "--soft") if args.soft is not None else vm["vm_expiration_soft"]
    hard = parse_time(args.hard, "--hard") if args.hard is not None else vm["vm_expiration_hard"]
    if soft is not None and hard is not None and soft > hard:
        raise UsageError(f"the soft expiration {soft.isoformat()} is after the hard one "
                         f"{hard.isoformat()}: the soft one must come first")
    cur.execute("UPDATE vm_runtimes SET vm_expiration_soft = %s, vm_expiration_hard = %s "
                "WHERE vm_id = %s", (soft, hard, vm["id"]))
    ctx.audit(cur, "vm_update", "update", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"expiration_soft": soft, "expiration_hard": hard})
    fmt = lambda t: t.isoformat(timespec="seconds") if t else "none"  # noqa: E731
    return Result(f"VM {vm['name']!r} expires softly at {fmt(soft)}, hard at {fmt(hard)}",
                  data={"id": vm["id"], "soft": soft, "hard": hard})


def vm_del(ctx, cur, args):
    vm = find_vm(ctx, cur, args.vm)
    if vm["vm_state"] != "stopped" or vm["vm_cmd"] is not None:
        what = vm["vm_state"] if vm["vm_state"] != "stopped" else f"stopped with a pending {vm['vm_cmd']}"
        raise AdminError(f"VM {vm['name']!r} is {what}: stop it first with 'qvd-admin vm stop'")
    cur.execute("DELETE FROM vms WHERE id = %s", (vm["id"],))
    ctx.audit(cur, "vm_delete", "delete", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(f"VM {vm['name']!r} deleted", data={"id": vm["id"]})


# ---------------------------------------------------------------------------
# Hosts
# ---------------------------------------------------------------------------

def host_add(ctx, cur, args):
    import ipaddress
    try:
        ipaddress.ip_address(args.address)
    except ValueError:
        raise UsageError(f"host address {args.address!r} is not an IP address")
    if _one(cur, "SELECT 1 FROM hosts WHERE name = %s", (args.name,)):
        raise AdminError(f"host {args.name!r} already exists")
    other = _one(cur, "SELECT name FROM hosts WHERE address = %s", (args.address,))
    if other:
        raise AdminError(f"address {args.address} is already used by host {other['name']!r}")
    row = _one(cur, "INSERT INTO hosts (name, address, frontend, backend, description) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id",
               (args.name, args.address, args.frontend, args.backend, args.description))
    cur.execute("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'stopped')", (row["id"],))
    cur.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (row["id"],))
    ctx.audit(cur, "host_create", "create", "host", row["id"], args.name, None,
              {"address": args.address, "frontend": args.frontend, "backend": args.backend})
    return Result(f"host {args.name!r} added (id {row['id']}, {args.address})",
                  data={"id": row["id"], "name": args.name, "address": args.address})


def host_list(ctx, cur, args):
    cur.execute("SELECT h.id, h.name, h.address, h.frontend, h.backend, r.state, r.blocked, "
                "r.hypervisor, r.ok_ts, "
                "(SELECT count(*) FROM vm_runtimes v WHERE v.host_id = h.id) AS vms "
                "FROM hosts h JOIN host_runtimes r ON r.host_id = h.id ORDER BY h.id")
    return Result(rows=cur.fetchall(), columns=["id", "name", "address", "frontend", "backend",
                                                "state", "blocked", "hypervisor", "ok_ts", "vms"])


def host_del(ctx, cur, args):
    h = find_host(cur, args.name)
    busy = _one(cur, "SELECT count(*) AS n FROM vm_runtimes WHERE host_id = %s",
                (h["id"],))["n"]
    if busy:
        raise AdminError(f"host {args.name!r} has {busy} VM(s) bound to it: stop them first")
    cur.execute("DELETE FROM hosts WHERE id = %s", (h["id"],))
    ctx.audit(cur, "host_delete", "delete", "host", h["id"], args.name)
    return Result(f"host {args.name!r} deleted", data={"id": h["id"]})


def _host_block(ctx, cur, args, blocked):
    h = find_host(cur, args.name)
    cur.execute("UPDATE host_runtimes SET blocked = %s WHERE host_id = %s", (blocked, h["id"]))
    ctx.audit(cur, "host_update", "update", "host", h["id"], args.name, None, {"blocked": blocked})
    return Result(f"host {args.name!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": h["id"], "blocked": blocked})


def host_block(ctx, cur, args):
    return _host_block(ctx, cur, args, True)


def host_unblock(ctx, cur, args):
    return _host_block(ctx, cur, args, False)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

_NOT_IN_DB = ("database.", "path.db", "nodename")


def _config_tenant(ctx, cur):
    if ctx.tenant is None:
        return qconfig.GLOBAL_TENANT, "global"
    t = tenant_by_name(cur, ctx.tenant)
    if t["id"] in (-1, 0):
        return qconfig.GLOBAL_TENANT, "global"
    return t["id"], f"tenant {t['name']!r}"


def _declared(ctx, key):
    if ctx.config._declaration(key) is None:
        raise UsageError(f"unknown configuration key {key!r}: see docs/config.md "
                         "('python -m qvd.config.docs') for every key")


def config_get(ctx, cur, args):
    tenant_id, _ = _config_tenant(ctx, cur)
    cfg = ctx.db_config(cur)
    tenant = None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id
    if args.key:
        _declared(ctx, args.key)
        try:
            value = cfg.get(args.key, tenant)
        except qconfig.ConfigError as e:
            raise AdminError(str(e))
        source = _source(cfg, args.key, tenant)
        return Result(rows=[{"key": args.key, "value": value, "source": source}],
                      columns=["key", "value", "source"])
    cur.execute("SELECT t.name AS tenant, c.key, c.value FROM configs c "
                "JOIN tenants t ON t.id = c.tenant_id "
                "WHERE c.tenant_id = -1 OR c.tenant_id = %s ORDER BY c.tenant_id, c.key",
                (tenant_id,))
    return Result(rows=cur.fetchall(), columns=["tenant", "key", "value"])


def _source(cfg, key, tenant):
    if tenant is not None and key in cfg.tenants.get(tenant, {}):
        return "database (tenant)"
    if key in cfg.database:
        return "database (global)"
    if key in cfg.node:
        return "node file"
    return "default"


def config_set(ctx, cur, args):
    key, value = args.key, args.value
    _declared(ctx, key)
    if key.startswith(_NOT_IN_DB) or key.startswith("l7r.ssl."):
        where = "'qvd-admin config ssl'" if key.startswith("l7r.ssl.") else "the node file"
        raise UsageError(f"configuration key {key!r} cannot be set in the database: set it "
                         f"in {where}")
    tenant_id, where = _config_tenant(ctx, cur)
    cfg = ctx.db_config(cur)
    globals_ = dict(cfg.database)
    tenants = {t: dict(v) for t, v in cfg.tenants.items()}
    if tenant_id == qconfig.GLOBAL_TENANT:
        globals_[key] = value
    else:
        tenants.setdefault(tenant_id, {})[key] = value
    try:
        new = ctx.config.with_database(globals_, tenants)
        new.typed(key, None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id)
    except qconfig.ConfigError as e:
        raise UsageError(f"{e}; nothing was changed")
    cur.execute("INSERT INTO configs (tenant_id, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value",
                (tenant_id, key, value))
    ctx.audit(cur, "config_set", "update", "config", None, key,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id, {"value": value})
    return Result(f"{key} = {value} ({where})", data={"key": key, "value": value})


def config_del(ctx, cur, args):
    _declared(ctx, args.key)
    tenant_id, where = _config_tenant(ctx, cur)
    cur.execute("DELETE FROM configs WHERE tenant_id = %s AND key = %s RETURNING value",
                (tenant_id, args.key))
    if cur.fetchone() is None:
        raise AdminError(f"configuration key {args.key!r} is not set in the database ({where})")
    ctx.audit(cur, "config_delete", "delete", "config", None, args.key,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id)
    return Result(f"{args.key} removed from the database ({where})", data={"key": args.key})


def read_ssl_files(args):
    """Read and check the PEM files of 'config ssl' (before the transaction)."""
    texts = {}
    for key, path in (("l7r.ssl.cert", args.cert), ("l7r.ssl.key", args.key),
                      ("l7r.ssl.ca", args.ca), ("l7r.ssl.crl", args.crl)):
        if path is None:
            continue
        try:
            with open(path, encoding="ascii") as f:
                texts[key] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {path!r} for {key}: {getattr(e, 'strerror', e)}")
        if "-----BEGIN " not in texts[key]:
            raise UsageError(f"{path!r} is not a PEM file (no '-----BEGIN' line)")
    from OpenSSL import SSL, crypto
    try:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, texts["l7r.ssl.cert"].encode())
    except crypto.Error:
        raise UsageError(f"{args.cert!r} holds no PEM certificate")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, texts["l7r.ssl.key"].encode())
    except crypto.Error:
        raise UsageError(f"{args.key!r} holds no PEM private key (encrypted keys are not supported)")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(cert)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise UsageError(f"the key {args.key!r} does not belong to the certificate {args.cert!r}")
    return texts


def config_ssl(ctx, cur, args):
    for key, value in args.ssl_texts.items():
        cur.execute("INSERT INTO ssl_configs (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, value))
    ctx.audit(cur, "config_ssl", "update", "config", None, "l7r.ssl",
              None, {"keys": sorted(args.ssl_texts)})
    return Result("SSL certificate and key stored: " + ", ".join(sorted(args.ssl_texts)),
                  data={"keys": sorted(args.ssl_texts)})


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

def _property_target(ctx, cur, obj, ref):
    """(object id, tenant id, name) of the object a property belongs to."""
    if obj == "user":
        u = find_user(ctx, cur, ref)
        return u["id"], u["tenant_id"], u["login"]
    if obj == "vm":
        v = find_vm(ctx, cur, ref)
        return v["id"], v["tenant_id"], v["name"]
    if obj == "host":
        h = find_host(cur, ref)
        return h["id"], qconfig.GLOBAL_TENANT, h["name"]
    if obj == "osf":
        o = find_osf(ctx, cur, ref)
        return o["id"], o["tenant_id"], o["name"]
    d = find_di(ctx, cur, ref)
    return d["id"], d["tenant_id"], d["path"]


def prop_set(ctx, cur, args):
    obj_id, tenant_id, name = _property_target(ctx, cur, args.object, args.ref)
    row = _one(cur, "SELECT id FROM properties_list WHERE key = %s AND tenant_id = %s "
                    "AND qvd_object = %s", (args.key, tenant_id, args.object))
    if row is None:
        row = _one(cur, "INSERT INTO properties_list (key, tenant_id, qvd_object) "
                        "VALUES (%s, %s, %s) RETURNING id", (args.key, tenant_id, args.object))
    table, column = f"{args.object}_properties", f"{args.object}_id"
    cur.execute(f"INSERT INTO {table} ({column}, property_id, value) VALUES (%s, %s, %s) "
                f"ON CONFLICT ({column}, property_id) DO UPDATE SET value = EXCLUDED.value",
                (obj_id, row["id"], args.value))
    ctx.audit(cur, f"{args.object}_update", "update", args.object, obj_id, name,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id,
              {"__properties_changes__": {"set": {args.key: args.value}}})
    return Result(f"{args.object} {name!r}: {args.key} = {args.value}",
                  data={"id": obj_id, "key": args.key, "value": args.value})


def prop_del(ctx, cur, args):
    obj_id, tenant_id, name = _property_target(ctx, cur, args.object, args.ref)
    table, column = f"{args.object}_properties", f"{args.object}_id"
    cur.execute(f"DELETE FROM {table} p USING properties_list l WHERE l.id = p.property_id "
                f"AND p.{column} = %s AND l.key = %s RETURNING p.value", (obj_id, args.key))
    if cur.fetchone() is None:
        raise AdminError(f"{args.object} {name!r} has no property {args.key!r}")
    ctx.audit(cur, f"{args.object}_update", "update", args.object, obj_id, name,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id,
              {"__properties_changes__": {"delete": [args.key]}})
    return Result(f"{args.object} {name!r}: property {args.key} removed", data={"id": obj_id})


def prop_list(ctx, cur, args):
    table, column = f"{args.object}_properties", f"{args.object}_id"
    where, params = "true", []
    if args.ref:
        obj_id, _, _ = _property_target(ctx, cur, args.object, args.ref)
        where, params = f"p.{column} = %s", [obj_id]
    elif args.object != "host":
        scope = ctx.scope(cur)
        if scope is not None:
            where, params = "l.tenant_id IN (%s, -1)", [scope]
    cur.execute(f"SELECT p.{column} AS id, l.key, p.value FROM {table} p "
                f"JOIN properties_list l ON l.id = p.property_id WHERE {where} "
                f"ORDER BY p.{column}, l.key", params)
    return Result(rows=cur.fetchall(), columns=["id", "key", "value"])
