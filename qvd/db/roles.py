"""
The database roles of qvd: one per kind of program, none a superuser.

    roles.ensure(superuser_conn, names)        # CREATE ROLE ... when missing
    roles.grant(owner_conn, names)             # the grants of GRANTS, again
    roles.refuse_superuser(cursor, "the HKD")  # SuperuserRefused when it is one

C{names} maps a kind to its role name (L{names}: the configuration's
C{database.user} for C{admin}, C{database.user.l7r}, C{database.user.hkd}).
The admin role owns the schema: C{qvd-admin} creates and migrates it. The
daemons' roles get what L{GRANTS} lists and nothing else: the L7R cannot
change the configuration, a VM or an administrator, and reads no
administrator's password; the HKD writes only the node's and the VMs' run
time state and reads no user's password. Both are granted again at every
C{qvd-admin db init} and C{db upgrade}, so a migration's new table is covered.
"""

from psycopg2 import sql

#: Kinds of program that connect to the database, and the configuration key
#: of each one's role.
KINDS = {"admin": "database.user", "l7r": "database.user.l7r", "hkd": "database.user.hkd"}

_RUNTIME_READ = ("tenants", "osfs", "osf_properties", "dis", "di_tags", "di_properties",
                 "di_runtimes", "hosts", "host_runtimes", "host_properties", "host_counters",
                 "vms", "vm_runtimes", "vm_properties", "vm_counters", "properties_list",
                 "configs", "ssl_configs", "schema_migrations", "versions")

#: kind -> [(privileges, table, columns or None)]: everything a daemon may do.
GRANTS = {
    "l7r": [("SELECT", t, None) for t in _RUNTIME_READ] + [
        ("SELECT", "users", None),
        ("SELECT", "user_properties", None),
        ("SELECT, INSERT, DELETE", "user_tokens", None),
        ("SELECT, INSERT, UPDATE, DELETE", "user_auth_parameters", None),
        ("SELECT, INSERT, UPDATE, DELETE", "user_totp_steps", None),
        # auto-provisioning makes users and their VMs; a legacy hash is upgraded
        ("INSERT", "users", None),
        ("UPDATE", "users", ("password",)),
        ("INSERT", "vms", None),
        ("INSERT", "vm_runtimes", None),
        # the session's columns, placement and the start command; not the
        # VM's state, its secret, its block or its expiration
        ("UPDATE", "vm_runtimes", ("host_id", "vm_cmd", "user_state", "user_state_ts",
                                   "user_cmd", "user_ip", "real_user_id", "l7r_host_id",
                                   "l7r_pid", "l7r_session")),
        ("INSERT, UPDATE", "vm_counters", None),
        ("INSERT, UPDATE", "host_counters", None),
        ("INSERT", "log", None),
    ],
    "hkd": [("SELECT", t, None) for t in _RUNTIME_READ] + [
        ("SELECT", "users", ("id", "login", "tenant_id", "blocked")),
        ("SELECT", "storage_identity", None),
        ("SELECT", "deleted_storage", None),
        ("INSERT, UPDATE", "host_runtimes", None),
        ("UPDATE", "vm_runtimes", None),
        ("INSERT, UPDATE", "vm_counters", None),
        ("INSERT, UPDATE", "host_counters", None),
        ("INSERT", "log", None),
    ],
}


class SuperuserRefused(Exception):
    """A daemon was configured to connect as a superuser."""


def names(config):
    """
    kind -> role name, from C{config}.
    """
    return {kind: config.get(key) for kind, key in KINDS.items()}


def ensure(cur, role_names):
    """
    Create each role of C{role_names} that does not exist: LOGIN, and no
    superuser, CREATEDB, CREATEROLE or replication right. C{cur} is a
    superuser's (or a CREATEROLE role's) cursor. Returns the roles created.
    """
    created = []
    for name in sorted(set(role_names.values())):
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (name,))
        row = cur.fetchone()
        if row is None:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
                                " NOREPLICATION").format(sql.Identifier(name)))
            created.append(name)
        elif _first(row):
            raise SuperuserRefused(
                f"the database role {name!r} is a superuser: qvd's programs must not be "
                "(choose another name in database.user, database.user.l7r or .hkd)")
    return created


def grant(cur, role_names):
    """
    Give the daemons' roles the privileges of L{GRANTS} (after revoking what
    they had, so a privilege dropped from the list goes). C{cur} is the
    schema owner's cursor.
    """
    cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v')")
    tables = {_first(row) for row in cur.fetchall()}
    cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind = 'S'")
    sequences = [_first(row) for row in cur.fetchall()]
    for kind, grants in GRANTS.items():
        role = sql.Identifier(role_names[kind])
        if role_names[kind] == role_names["admin"]:
            continue    # one role for everything: the owner has every right
        for table in sorted(tables):
            cur.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.Identifier(table), role))
        for privileges, table, columns in grants:
            if table not in tables:
                continue
            what = sql.SQL(privileges)
            if columns:
                what = sql.SQL("{} ({})").format(
                    what, sql.SQL(", ").join(sql.Identifier(c) for c in columns))
            cur.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                what, sql.Identifier(table), role))
        for sequence in sequences:
            cur.execute(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                sql.Identifier(sequence), role))


def adopt(cur, owner):
    """
    Give C{owner} every table, sequence, view and function of the public
    schema that another role owns (a database made before qvd had roles,
    by the superuser). C{cur} is a superuser's cursor in that database.
    Returns how many objects changed hands.
    """
    kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "S": "SEQUENCE"}
    count = 0
    # Tables first: a serial column's sequence goes with its table (and may
    # not be given away alone); then what remains.
    for relkinds in ("('r', 'p', 'v')", "('S')"):
        cur.execute("SELECT c.relname, c.relkind FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    f" WHERE n.nspname = 'public' AND c.relkind IN {relkinds}"
                    " AND pg_get_userbyid(c.relowner) <> %s", (owner,))
        for name, kind in [_values(row) for row in cur.fetchall()]:
            cur.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(kinds[kind]), sql.Identifier(name), sql.Identifier(owner)))
            count += 1
    cur.execute("SELECT p.oid::regprocedure::text FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> %s", (owner,))
    functions = [_first(row) for row in cur.fetchall()]
    for signature in functions:
        cur.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(
            sql.SQL(signature), sql.Identifier(owner)))
    return count + len(functions)


#: The connection's role and whether it is a superuser.
WHO_AM_I = "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"


def refuse_superuser(cur, who):
    """
    Raise L{SuperuserRefused} when the connection of C{cur} (a blocking
    cursor) is a superuser's.
    """
    cur.execute(WHO_AM_I)
    check_not_superuser(cur.fetchone(), who)


def check_not_superuser(row, who):
    """
    Raise L{SuperuserRefused} when C{row}, the answer of L{WHO_AM_I}, names
    a superuser; C{who} is the program, for the message.
    """
    user, superuser = _values(row)
    if superuser:
        raise SuperuserRefused(
            f"{who} connects to the database as {user!r}, a superuser: refused. Give it its "
            "own role (database.user.l7r, database.user.hkd; 'qvd-admin db init' creates them)")


def _values(row):
    """A row as a tuple, from a plain or a dict cursor."""
    return tuple(row.values()) if isinstance(row, dict) else tuple(row)


def _first(row):
    return _values(row)[0]
