"""
The qvd-admin command line.

    qvd-admin [--config FILE] [--tenant NAME] [--json] OBJECT VERB [ARGS]
    main(["vm", "list", "--state", "running"])        # -> exit status

Objects and verbs: tenant, admin, user, osf, di, vm, host, config, prop, db
(see C{qvd-admin OBJECT --help}). Each command runs in one serializable
transaction; any error prints exactly one line C{qvd-admin: error: ...} on
standard error, exits 2 (bad usage) or 1 (refused) and changes nothing.
Successful changes are recorded in the audit table C{log}.
"""

import argparse
import datetime
import getpass
import json
import os
import sys

from qvd.admin import commands as C
from qvd.admin.commands import AdminError, UsageError

PROG = "qvd-admin"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status=0, message=None):
        if status:
            raise UsageError((message or "").strip().removeprefix(f"{PROG}: error: "))
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status):
        self.status = status


def _global_options(parser, suppress):
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="node configuration file (default /etc/qvd/node.conf)")
    parser.add_argument("--tenant", metavar="NAME", default=default,
                        help="tenant of the objects (default 'default'; '*' for every tenant)")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="print JSON instead of a table")
    parser.add_argument("--exist-ok", action="store_true", dest="exist_ok",
                        default=argparse.SUPPRESS if suppress else False,
                        help="an add of something that already exists succeeds without "
                        "changing it (for scripts that run again)")


def _bool_pair(parser, name, yes_help, no_name=None, dest=None):
    dest = dest or name.replace("-", "_")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=yes_help)
    group.add_argument(f"--{no_name or 'no-' + name}", dest=dest, action="store_false")


def build_parser():
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    parser = _Parser(prog=PROG, description="Administer qvd: tenants, users, OSFs, DIs, VMs, "
                     "hosts and configuration, directly in the database.")
    _global_options(parser, suppress=False)
    objects = parser.add_subparsers(dest="object", metavar="OBJECT", required=True)

    def obj(name, help):
        p = objects.add_parser(name, help=help)
        return p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(verbs, name, func, help, txn=True):
        p = verbs.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func, txn=txn)
        return p

    # tenants
    v = obj("tenant", "tenants")
    p = verb(v, "add", C.tenant_add, "add a tenant")
    p.add_argument("name")
    p.add_argument("--description")
    verb(v, "list", C.tenant_list, "list tenants")
    for name, func in (("del", C.tenant_del), ("block", C.tenant_block),
                       ("unblock", C.tenant_unblock)):
        verb(v, name, func, f"{name} a tenant").add_argument("name")

    # administrators
    v = obj("admin", "administrators")
    p = verb(v, "add", C.admin_add, "add an administrator (NAME or NAME@TENANT)")
    p.add_argument("name")
    p.add_argument("--password", required=True)
    p.add_argument("--description")
    verb(v, "list", C.admin_list, "list administrators")
    verb(v, "del", C.admin_del, "delete an administrator").add_argument("name")
    p = verb(v, "passwd", C.admin_passwd, "change an administrator's password")
    p.add_argument("name")
    p.add_argument("--password", required=True)

    # users
    v = obj("user", "users")
    p = verb(v, "add", C.user_add, "add a user (LOGIN or LOGIN@TENANT)")
    p.add_argument("login")
    p.add_argument("--password", help="password (none: the user logs in through another "
                   "authentication plugin only)")
    p.add_argument("--description")
    p = verb(v, "list", C.user_list, "list users")
    p.add_argument("--blocked", action="store_true", help="only blocked users")
    for name, func in (("del", C.user_del), ("block", C.user_block),
                       ("unblock", C.user_unblock)):
        verb(v, name, func, f"{name} a user").add_argument("login")
    p = verb(v, "passwd", C.user_passwd, "change a user's password")
    p.add_argument("login")
    p.add_argument("--password", required=True)

    # OSFs
    v = obj("osf", "OS flavours")

    def osf_options(p, adding):
        p.add_argument("--memory", type=int, metavar="MB")
        _bool_pair(p, "overlay", "a copy-on-write overlay over the DI")
        p.add_argument("--user-storage", type=int, metavar="MB", dest="user_storage",
                       help="persistent home of this size (0: none)")
        _bool_pair(p, "application", "an application rather than a desktop",
                   no_name="desktop")
        p.add_argument("--description")
    p = verb(v, "add", C.osf_add, "add an OSF")
    p.add_argument("name")
    osf_options(p, True)
    verb(v, "list", C.osf_list, "list OSFs")
    verb(v, "del", C.osf_del, "delete an OSF and its DIs").add_argument("name")
    p = verb(v, "set", C.osf_set, "change an OSF")
    p.add_argument("name")
    p.add_argument("--name", dest="new_name", metavar="NEW")
    osf_options(p, False)

    # DIs
    v = obj("di", "disk images (DI: id or OSF:VERSION)")
    p = verb(v, "add", C.di_add, "register a disk image file")
    p.add_argument("file")
    p.add_argument("--osf", required=True)
    p.add_argument("--version", help="version (default DATE-NNN)")
    p.add_argument("--description")
    p = verb(v, "list", C.di_list, "list DIs")
    p.add_argument("--osf")
    for name, func in (("tag", C.di_tag), ("untag", C.di_untag)):
        p = verb(v, name, func, f"{name} a DI")
        p.add_argument("di")
        p.add_argument("tag")
    for name, func in (("del", C.di_del), ("block", C.di_block), ("unblock", C.di_unblock)):
        verb(v, name, func, f"{name} a DI").add_argument("di")

    # VMs
    v = obj("vm", "virtual machines (VM: name or id)")
    p = verb(v, "add", C.vm_add, "add a VM")
    p.add_argument("name")
    p.add_argument("--user", required=True, help="LOGIN or LOGIN@TENANT")
    p.add_argument("--osf", required=True)
    p.add_argument("--di-tag", dest="di_tag", help="tag of the DI to boot (default 'default')")
    p.add_argument("--ip", help="address (default: the highest free one of the range)")
    p.add_argument("--description")
    p = verb(v, "list", C.vm_list, "list VMs")
    p.add_argument("--user")
    p.add_argument("--state")
    p.add_argument("--host")
    p.add_argument("--osf")
    for name, func, help in (("start", C.vm_start, "start a VM"),
                             ("stop", C.vm_stop, "stop a VM"),
                             ("disconnect", C.vm_disconnect, "disconnect the user of a VM"),
                             ("block", C.vm_block, "block a VM"),
                             ("unblock", C.vm_unblock, "unblock a VM"),
                             ("del", C.vm_del, "delete a stopped VM")):
        verb(v, name, func, help).add_argument("vm")
    p = verb(v, "expire", C.vm_expire, "set a VM's expiration times")
    p.add_argument("vm")
    p.add_argument("--soft", metavar="TIME", help="ISO 8601, +N[smhd] or none")
    p.add_argument("--hard", metavar="TIME", help="ISO 8601, +N[smhd] or none")

    # hosts
    v = obj("host", "nodes")
    p = verb(v, "add", C.host_add, "add a node")
    p.add_argument("name")
    p.add_argument("address")
    p.add_argument("--no-frontend", dest="frontend", action="store_false",
                   help="runs no L7R")
    p.add_argument("--no-backend", dest="backend", action="store_false",
                   help="runs no VMs")
    p.add_argument("--description")
    verb(v, "list", C.host_list, "list nodes")
    for name, func in (("del", C.host_del), ("block", C.host_block),
                       ("unblock", C.host_unblock)):
        verb(v, name, func, f"{name} a node").add_argument("name")

    # configuration
    v = obj("config", "configuration in the database (global, or per tenant with --tenant)")
    verb(v, "get", C.config_get, "show a key's value, or every key set in the "
         "database").add_argument("key", nargs="?")
    p = verb(v, "set", C.config_set, "set a key")
    p.add_argument("key")
    p.add_argument("value")
    verb(v, "del", C.config_del, "remove a key from the database").add_argument("key")
    p = verb(v, "ssl", C.config_ssl, "store the L7R's TLS certificate and key")
    p.add_argument("--cert", required=True, metavar="FILE")
    p.add_argument("--key", required=True, metavar="FILE")
    p.add_argument("--ca", metavar="FILE")
    p.add_argument("--crl", metavar="FILE")

    # properties
    v = obj("prop", "custom properties of users, VMs, hosts, OSFs and DIs")
    p = verb(v, "set", C.prop_set, "set a property")
    p.add_argument("object", choices=C.OBJECTS_WITH_PROPERTIES)
    p.add_argument("ref")
    p.add_argument("key")
    p.add_argument("value")
    p = verb(v, "del", C.prop_del, "remove a property")
    p.add_argument("object", choices=C.OBJECTS_WITH_PROPERTIES)
    p.add_argument("ref")
    p.add_argument("key")
    p = verb(v, "list", C.prop_list, "list properties")
    p.add_argument("object", choices=C.OBJECTS_WITH_PROPERTIES)
    p.add_argument("ref", nargs="?")

    # shared storage
    v = obj("storage", "the shared storage (path.storage.root) and its identity")
    p = verb(v, "init", C.storage_init, "write the storage id into the database and the "
             "marker file at path.storage.root")
    p.add_argument("--force", action="store_true",
                   help="adopt a volume that holds another storage's marker")
    verb(v, "show", C.storage_show, "the storage id, the mount and the HKD's verdict")

    # database
    v = obj("db", "the database itself")
    verb(v, "init", db_init, "create the database if missing and migrate it", txn=False)
    verb(v, "upgrade", db_upgrade, "apply pending migrations", txn=False)
    return parser


# ---------------------------------------------------------------------------
# Database commands (outside the one-transaction rule: they create the schema)
# ---------------------------------------------------------------------------

def db_init(ctx, args):
    """
    As the superuser: the roles of qvd's programs and the database, owned by
    the admin role (objects an older qvd made as the superuser change hands);
    then, as the admin role, the migrations and the daemons' grants.
    """
    from qvd.db import roles, settings, sync
    config = ctx.config
    name = config.get("database.name")
    names = roles.names(config)
    try:
        with sync.connect(settings.database_dsn(config, "superuser", dbname="postgres")) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                made = roles.ensure(cur, names)
                created = _ensure_owned_database(cur, name, names["admin"])
        adopted = 0
        if not created:
            with sync.connect(settings.database_dsn(config, "superuser")) as conn:
                with conn.cursor() as cur:
                    adopted = roles.adopt(cur, names["admin"])
                conn.commit()
    except roles.SuperuserRefused as e:
        raise AdminError(str(e)) from None
    applied = _migrate_and_grant(config, names)
    parts = [f"database {name!r} " + ("created" if created else "exists")]
    if made:
        parts.append("role(s) " + ", ".join(made) + " created")
    if adopted:
        parts.append(f"{adopted} object(s) given to {names['admin']!r}")
    parts.append(f"{len(applied)} migration(s) applied" if applied else "schema up to date")
    return C.Result(", ".join(parts), data={"created": created, "applied": applied,
                                            "roles_created": made, "adopted": adopted})


def _ensure_owned_database(cur, name, owner):
    """Create database C{name} owned by C{owner}, or make C{owner} its owner."""
    from psycopg2 import sql
    cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
    row = cur.fetchone()
    if row is None:
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(owner)))
        return True
    if row[0] != owner:
        cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(name), sql.Identifier(owner)))
    return False


def _migrate_and_grant(config, names):
    from qvd.db import migrate, roles, settings, sync
    with sync.connect(settings.database_dsn(config)) as conn:
        with conn.cursor() as cur:
            roles.refuse_superuser(cur, f"{PROG} (database.user)")
        conn.rollback()
        applied = migrate.upgrade(conn)
        with conn.cursor() as cur:
            roles.grant(cur, names)
        conn.commit()
    return applied


def db_upgrade(ctx, args):
    from qvd.db import roles
    try:
        applied = _migrate_and_grant(ctx.config, roles.names(ctx.config))
    except roles.SuperuserRefused as e:
        raise AdminError(str(e)) from None
    return C.Result(("applied " + ", ".join(applied)) if applied else "schema up to date",
                    data={"applied": applied})


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _text(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime.datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _jsonable(value):
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)


def format_table(rows, columns):
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for r in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines) + "\n"


def render(result, as_json):
    if as_json:
        if result.rows is not None:
            data = [{c: r.get(c) for c in result.columns} for r in result.rows]
        else:
            data = result.data if result.data is not None else {"message": result.message}
        return json.dumps(data, default=_jsonable, indent=2, sort_keys=False) + "\n"
    if result.rows is not None:
        return format_table(result.rows, result.columns)
    return result.message + "\n"


# ---------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------

def _load_config(path):
    from qvd.config import Config
    return Config.load(path or os.environ.get("QVD_CONFIG") or None)


def _admin_name():
    name = os.environ.get("USER")
    if not name:
        try:
            name = getpass.getuser()
        except Exception:
            name = "unknown"
    return name


def _database_error(e):
    """The AdminError for database error C{e}, without any password in it."""
    import psycopg2

    from qvd._redact import redact
    if isinstance(e, psycopg2.Error):
        code = e.pgcode or ""
        text = redact((e.diag.message_primary if e.diag and e.diag.message_primary
                       else str(e)).strip())
        if code in ("40001", "40P01"):
            return AdminError("the database kept reporting conflicting concurrent changes; "
                              "nothing was changed: run the command again")
        if code.startswith("23"):
            return AdminError(f"the database refused the change ({text}); nothing was changed")
        if code == "42P01":
            return AdminError(f"the database has no qvd schema ({text}): run "
                              f"'{PROG} db init'")
        return AdminError(f"database error: {text}")
    text = redact(str(e))
    if text.startswith("cannot connect"):
        text += ("; check database.* in the node file (--config), or create the database "
                 f"with '{PROG} db init'")
    return AdminError(text)


def run(args, ctx):
    """Run the parsed command; return its L{Result}."""
    from qvd.db import migrate, settings, sync
    if not args.txn:
        return args.func(ctx, args)
    if args.func is C.di_add:
        args.staged = C.stage_image(ctx, args.file)
        staged_cleanup = args.staged
    else:
        staged_cleanup = None
    if args.func is C.config_ssl:
        args.ssl_texts = C.read_ssl_files(args)
    try:
        dsn = settings.database_dsn(ctx.config)
        with sync.connect(dsn) as conn:
            pending = migrate.pending(conn)
            conn.rollback()
            if pending:
                raise AdminError(
                    f"the database schema is not up to date (pending: {', '.join(pending)}): "
                    f"run '{PROG} db upgrade'" if len(pending) < len(migrate.available())
                    else f"the database {ctx.config.get('database.name')!r} has no qvd "
                    f"schema: run '{PROG} db init'")
            retries = ctx.config.getint("admin.retry.max")

            def attempt(cur):
                ctx.rolled_back()       # effects of an attempt that conflicted
                return args.func(ctx, cur, args)
            try:
                result = sync.transaction(conn, attempt, retries=retries)
            except BaseException:
                ctx.rolled_back()
                raise
        ctx.committed()
        return result
    finally:
        if staged_cleanup and os.path.exists(staged_cleanup):
            try:
                os.unlink(staged_cleanup)
            except OSError:
                pass


def main(argv=None, stdout=None, stderr=None, random=None):
    """
    Run qvd-admin with C{argv} (default C{sys.argv[1:]}); return the exit status.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except _Exit as e:
            return e.status
        except UsageError:
            raise
        from qvd.config import ConfigError
        try:
            config = _load_config(args.config)
        except ConfigError as e:
            raise UsageError(str(e))
        ctx = C.Context(config=config, tenant=args.tenant, admin=_admin_name(), random=random)
        try:
            result = run(args, ctx)
        except AdminError:
            raise
        except Exception as e:
            import psycopg2
            from qvd.db import DatabaseError
            if isinstance(e, (psycopg2.Error, DatabaseError, ConfigError)):
                raise _database_error(e)
            raise
        stdout.write(render(result, args.json))
        return 0
    except C.AlreadyExists as e:
        if getattr(args, "exist_ok", False):
            stdout.write(" ".join(str(e).split()) + "; nothing changed\n")
            return 0
        stderr.write(f"{PROG}: error: {' '.join(str(e).split())}\n")
        return e.status
    except AdminError as e:
        message = " ".join(str(e).split())
        stderr.write(f"{PROG}: error: {message}\n")
        return e.status


if __name__ == "__main__":
    sys.exit(main())
