"""
The statements that move a VM's session, its commands and a node's state
between the L7R, the HKD and the admin tools: one module, one copy of each.

    store = RuntimeStore(db)                   # the daemons (qvd.db.pool.Database)
    held = await store.claim(vm_id, session_id, claimant, claim_max_age)
    host_id = await store.start_vm(vm_id, host_id)

    run_blocking(start_vm_in(BlockingCursor(cur), vm_id, host_id))   # qvd-admin, in
                                                                     # its transaction

Each statement is an C{async def ..._in(executor, ...)} over an I{executor}
(C{await executor.rows(sql, args)} -> tuples): L{PoolExecutor} runs single
statements in autocommit on the daemons' pool, L{TransactionExecutor} inside
one of its transactions, L{BlockingCursor} on a psycopg2 cursor of a
command-line tool (whose coroutine never suspends: L{run_blocking}).
L{RuntimeStore} is the daemons' L{IRuntimeStore}; tests pass the in-memory
fake of the test fixtures (fakeruntime.py), which passes the same suite
(runtime_store_suite.py) as this store does on PostgreSQL.

Channels notified (the NOTIFY goes out when the statement's transaction
commits): C{qvd_cmd_for_vm_on_host<N>} to the HKD of node N for a new
C{vm_cmd}; C{qvd_cmd_for_user_on_host<N>} to the L7Rs of node N when one of
their sessions got C{user_cmd = 'abort'}.
"""

from twisted.internet import defer
from zope.interface import Interface, implementer

from qvd import loadbalancer
from qvd.runtime.session import Claim, claim_verdict

#: a VM's run-time columns when it is on no node (stopped, released)
_STOPPED_RESET = (
    "vm_state = 'stopped', host_id = NULL, vm_cmd = NULL, vm_pid = NULL,"
    " vm_address = NULL, vm_vma_port = NULL, vm_x_port = NULL, vm_ssh_port = NULL,"
    " vm_vnc_port = NULL, vm_mon_port = NULL, vm_serial_port = NULL,"
    " vm_expiration_soft = NULL, vm_expiration_hard = NULL,"
    " current_di_id = NULL, vma_ok_ts = NULL")

#: the session columns of a claim by (host, pid, session, user, address); user and address are
#: kept when not given
_CLAIMED = ("user_state = 'connecting', user_state_ts = now(),"
            " l7r_host_id = %s, l7r_pid = %s, l7r_session = %s, user_cmd = NULL,"
            " real_user_id = coalesce(%s, real_user_id), user_ip = coalesce(%s, user_ip)")

#: the session columns of a row set back to "nobody's" (release, reset)
_NO_SESSION = ("user_state = 'disconnected', user_cmd = NULL,"
               " l7r_host_id = NULL, l7r_pid = NULL, l7r_session = NULL")


#: The columns of a VM's runtime row that a session works with, and the
#: VM's name: the row L{IRuntimeStore.claim} fires with.
VM_COLUMNS = ("vm_id", "host_id", "vm_state", "vm_cmd", "user_state", "user_cmd",
              "l7r_session", "vm_address", "vm_vma_port", "vm_x_port", "vma_secret", "name")

_CLAIM_RETURNING = (" FROM vms v WHERE v.id = r.vm_id AND r.vm_id = %s{condition} RETURNING "
                    + ", ".join(f"r.{c}" for c in VM_COLUMNS[:-1]) + ", v.name")


class IRuntimeStore(Interface):
    """The session and start statements, for the daemons (Deferreds)."""

    def claim(vm_id, session_id, claimant, claim_max_age, user_id=None, user_ip=None):
        """
        Claim VM C{vm_id}'s session for C{session_id} of C{claimant} (a
        L{qvd.runtime.session.Claimant}), for user C{user_id} (the row's
        C{real_user_id}) connecting from address C{user_ip} (the row's
        C{user_ip}, kept after the session as its last client), when
        L{claim_verdict} allows it.
        Fire with (verdict, the L{Claim} found, the VM's row after the
        claim as a dict of L{VM_COLUMNS}): claimed (C{connecting}) unless
        the verdict is C{'held'}, and then the live session that holds it
        was told to abort (and the row is None). C{LookupError} when the VM
        does not exist.
        """

    def claim_is_ours(vm_id, session_id):
        """Fire with True while the claim is C{session_id}'s and not aborted."""

    def assign_host(vm_id, host_id):
        """Give a stopped VM without node node C{host_id}; fire with True when done."""

    def send_vm_cmd(vm_id, cmd, from_states):
        """
        Set C{vm_cmd} of a VM with a node when its state is one of
        C{from_states}, and notify the node; fire with the node's id or None.
        """

    def start_vm(vm_id, host_id):
        """
        A stopped VM without pending command gets C{vm_cmd = 'start'} on its
        node, or on C{host_id} when it has none; fire with the node or None.
        """

    def cancel_start(vm_id):
        """Withdraw a pending start; fire with the node it was for, or None."""

    def abort_session(vm_id):
        """Tell the VM's session to end; fire with its L7R's node, or None."""

    def mark_connected(vm_id, session_id):
        """C{connecting} -> C{connected} while the claim is ours; fire with True when done."""

    def release(vm_id, session_id):
        """Give the VM's session back if it is still C{session_id}'s; fire with True if so."""

    def reset_claim(vm_id, session_id):
        """Reset a claim left by a dead L7R process (C{session_id} may be None)."""

    def claims_on_node(l7r_host_id):
        """
        Fire with [(vm_id, l7r_pid, l7r_session, user_cmd)] of every claim
        held through node C{l7r_host_id} (aborted or not disconnected).
        """

    def choose_host(vm_id, vm_name, weights, random):
        """Fire with the L{loadbalancer.HostLoad} the VM would start on (L{place_in})."""


# -- executors -----------------------------------------------------------------

class PoolExecutor:
    """
    Single statements in autocommit on a L{qvd.db.pool.Database} (one round
    trip each: every statement of this module returns rows, RETURNING if
    need be).
    """

    def __init__(self, db):
        self.db = db

    async def rows(self, sql, args=None):
        return await self.db.runQuery(sql, args)


class TransactionExecutor:
    """Statements inside one transaction of the pool (its txpostgres cursor)."""

    def __init__(self, cursor):
        self.cursor = cursor

    async def rows(self, sql, args=None):
        await self.cursor.execute(sql, args)
        return self.cursor.fetchall() if self.cursor.description else []


class BlockingCursor:
    """A psycopg2 cursor (plain or dict rows) of a command-line tool's transaction."""

    def __init__(self, cursor):
        self.cursor = cursor

    async def rows(self, sql, args=None):
        self.cursor.execute(sql, args)
        if self.cursor.description is None:
            return []
        return [tuple(r.values()) if isinstance(r, dict) else tuple(r)
                for r in self.cursor.fetchall()]


def run_blocking(coroutine):
    """
    The result of a statement coroutine over a L{BlockingCursor}: it never
    suspends, so it runs to its end at once.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a store statement suspended on a blocking cursor")


# -- the statements -----------------------------------------------------------

async def claim_free_in(ex, vm_id, session_id, claimant, user_id=None, user_ip=None):
    """
    Claim the session of VM C{vm_id} if nobody holds it, in one statement
    (the everyday login: one round trip); the VM's row after it
    (L{VM_COLUMNS}) when claimed, else None. The row lock of the UPDATE
    serialises contenders, and its condition is checked again on the row a
    concurrent claim left.
    """
    rows = await ex.rows(
        f"UPDATE vm_runtimes r SET {_CLAIMED}"
        + _CLAIM_RETURNING.format(condition=" AND r.user_state = 'disconnected'"),
        (claimant.host_id, claimant.pid, session_id, user_id, user_ip or None, vm_id))
    return dict(zip(VM_COLUMNS, rows[0])) if rows else None


async def claim_in(ex, vm_id, session_id, claimant, claim_max_age, user_id=None,
                   user_ip=None):
    """L{IRuntimeStore.claim}, inside the caller's transaction (READ COMMITTED:
    the row lock serialises contenders for one VM)."""
    found = await ex.rows(
        "SELECT r.user_state, r.l7r_host_id, r.l7r_pid, r.l7r_session,"
        " extract(epoch FROM now() - r.user_state_ts)::float AS age,"
        " (SELECT state FROM host_runtimes WHERE host_id = r.l7r_host_id) AS owner_state"
        " FROM vm_runtimes r WHERE r.vm_id = %s FOR UPDATE OF r", (vm_id,))
    if not found:
        raise LookupError(f"VM {vm_id} does not exist any more")
    claim = Claim(*found[0])
    verdict = claim_verdict(claim, claimant, claim_max_age)
    if verdict == "held":
        await abort_session_in(ex, vm_id)
        return verdict, claim, None
    rows = await ex.rows(
        f"UPDATE vm_runtimes r SET {_CLAIMED}" + _CLAIM_RETURNING.format(condition=""),
        (claimant.host_id, claimant.pid, session_id, user_id, user_ip or None, vm_id))
    return verdict, claim, dict(zip(VM_COLUMNS, rows[0]))


async def abort_session_in(ex, vm_id):
    """
    Tell the session of VM C{vm_id}, if any, to end (C{user_cmd = 'abort'})
    and notify its L7Rs; the node of its L7R, or None when nobody is connected.
    """
    rows = await ex.rows(
        "WITH aborted AS (UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_id = %s"
        " AND user_state IN ('connecting', 'connected') RETURNING l7r_host_id)"
        " SELECT l7r_host_id, CASE WHEN l7r_host_id IS NULL THEN NULL"
        " ELSE pg_notify('qvd_cmd_for_user_on_host' || l7r_host_id, %s) END FROM aborted",
        (vm_id, str(vm_id)))
    return rows[0][0] if rows else None


async def claim_is_ours_in(ex, vm_id, session_id):
    rows = await ex.rows(
        "SELECT user_cmd, l7r_session FROM vm_runtimes WHERE vm_id = %s", (vm_id,))
    return bool(rows) and rows[0][0] != "abort" and rows[0][1] == session_id


async def assign_host_in(ex, vm_id, host_id):
    return bool(await ex.rows(
        "UPDATE vm_runtimes SET host_id = %s WHERE vm_id = %s"
        " AND host_id IS NULL AND vm_state = 'stopped' RETURNING vm_id", (host_id, vm_id)))


async def send_vm_cmd_in(ex, vm_id, cmd, from_states):
    rows = await ex.rows(
        "WITH sent AS (UPDATE vm_runtimes SET vm_cmd = %s WHERE vm_id = %s"
        " AND vm_state = ANY(%s) AND host_id IS NOT NULL RETURNING host_id)"
        " SELECT host_id, pg_notify('qvd_cmd_for_vm_on_host' || host_id, %s) FROM sent",
        (cmd, vm_id, list(from_states), str(vm_id)))
    return rows[0][0] if rows else None


async def start_vm_in(ex, vm_id, host_id):
    """
    A stopped VM without a pending command gets node C{host_id} (or keeps
    the one it has) and C{vm_cmd = 'start'}, and the node is notified: the
    node's id, or None when the VM was not in that state.
    """
    rows = await ex.rows(
        "WITH sent AS (UPDATE vm_runtimes SET host_id = coalesce(host_id, %s),"
        " vm_cmd = 'start' WHERE vm_id = %s AND vm_state = 'stopped' AND vm_cmd IS NULL"
        " RETURNING host_id)"
        " SELECT host_id, pg_notify('qvd_cmd_for_vm_on_host' || host_id, %s) FROM sent",
        (host_id, vm_id, str(vm_id)))
    return rows[0][0] if rows else None


#: the VM states a stop command applies to
STOPPABLE = ("starting", "running", "debugging")


async def cancel_start_in(ex, vm_id):
    """
    Withdraw the pending start of a stopped VM (and its node), notifying
    that node; its id, or None when no start was pending.
    """
    rows = await ex.rows(
        "WITH old AS (SELECT vm_id, host_id FROM vm_runtimes WHERE vm_id = %s FOR UPDATE),"
        " done AS (UPDATE vm_runtimes r SET vm_cmd = NULL, host_id = NULL FROM old"
        " WHERE r.vm_id = old.vm_id AND r.vm_state = 'stopped' AND r.vm_cmd = 'start'"
        " RETURNING old.host_id)"
        " SELECT host_id, pg_notify('qvd_cmd_for_vm_on_host' || host_id, %s) FROM done",
        (vm_id, str(vm_id)))
    return rows[0][0] if rows else None


async def mark_connected_in(ex, vm_id, session_id):
    return bool(await ex.rows(
        "UPDATE vm_runtimes SET user_state = 'connected' WHERE vm_id = %s"
        " AND l7r_session = %s AND user_state = 'connecting'"
        " AND user_cmd IS NULL RETURNING vm_id", (vm_id, session_id)))


async def release_in(ex, vm_id, session_id):
    return bool(await ex.rows(f"UPDATE vm_runtimes SET {_NO_SESSION}"
                              " WHERE vm_id = %s AND l7r_session = %s RETURNING vm_id",
                              (vm_id, session_id)))


async def reset_claim_in(ex, vm_id, session_id):
    return bool(await ex.rows(
        f"UPDATE vm_runtimes SET {_NO_SESSION}"
        " WHERE vm_id = %s AND l7r_session IS NOT DISTINCT FROM %s RETURNING vm_id",
        (vm_id, session_id)))


async def reset_claims_of_process_in(ex, vm_id, l7r_host_id, l7r_pid):
    """Reset VM C{vm_id}'s claim when L7R process C{l7r_pid} of node C{l7r_host_id} holds it."""
    return bool(await ex.rows(
        f"UPDATE vm_runtimes SET {_NO_SESSION}"
        " WHERE vm_id = %s AND l7r_host_id = %s AND l7r_pid = %s RETURNING vm_id",
        (vm_id, l7r_host_id, l7r_pid)))


async def reset_claims_of_nodes_in(ex, host_ids):
    """Reset every claim held through the L7Rs of the nodes C{host_ids} (lost)."""
    return [r[0] for r in await ex.rows(
        f"UPDATE vm_runtimes SET {_NO_SESSION} WHERE l7r_host_id = ANY(%s) RETURNING vm_id",
        (list(host_ids),))]


async def abort_sessions_on_nodes_in(ex, host_ids):
    """
    Tell every session of a VM running on the nodes C{host_ids} to end;
    the L7R nodes to notify (the caller NOTIFYs them, once each).
    """
    rows = await ex.rows(
        "UPDATE vm_runtimes SET user_cmd = 'abort'"
        " WHERE host_id = ANY(%s) AND user_state <> 'disconnected'"
        " RETURNING l7r_host_id", (list(host_ids),))
    return sorted({r[0] for r in rows if r[0] is not None})


async def claims_on_node_in(ex, l7r_host_id):
    return [tuple(r) for r in await ex.rows(
        "SELECT vm_id, l7r_pid, l7r_session, user_cmd FROM vm_runtimes"
        " WHERE l7r_host_id = %s AND (user_cmd = 'abort' OR user_state <> 'disconnected')",
        (l7r_host_id,))]


async def place_in(ex, vm_id, vm_name, weights, random):
    """
    The node VM C{vm_id} would start on: its DI's kind (an LXC tarball or a
    KVM disk) and every backend node's state and load, through
    L{loadbalancer.choose_host}. L{loadbalancer.NoHostAvailable} says why
    none (also when the VM has no DI to boot, or it is blocked).
    """
    dis = await ex.rows(loadbalancer.VM_DI_SQL, (vm_id,))
    if not dis:
        raise loadbalancer.NoHostAvailable(
            f"VM {vm_name!r} cannot start: its OSF has no DI with the VM's tag "
            "(add one with 'qvd-admin di add' or change the tag with 'qvd-admin di tag')")
    di_id, path, blocked = dis[0]
    if blocked:
        raise loadbalancer.NoHostAvailable(
            f"VM {vm_name!r} cannot start: its DI {di_id} is blocked "
            "('qvd-admin di unblock' it or tag another DI)")
    hosts = [loadbalancer.HostLoad(*row) for row in await ex.rows(loadbalancer.HOSTS_SQL)]
    return loadbalancer.choose_host(vm_name, loadbalancer.di_hypervisor(path), hosts,
                                    weights, random)


# -- a node's commands and state (the HKD, its cluster monitor, qvd-admin) ---------

async def take_stops_in(ex, host_id):
    """Take every pending stop command of node C{host_id}: [(vm_id, vm_state)]."""
    return [tuple(r) for r in await ex.rows(
        "UPDATE vm_runtimes SET vm_cmd = NULL WHERE host_id = %s AND vm_cmd = 'stop'"
        " RETURNING vm_id, vm_state", (host_id,))]


async def take_starts_in(ex, host_id, limit):
    """
    Take at most C{limit} pending start commands of stopped VMs of node
    C{host_id}, oldest first, in one statement: they become C{starting}.
    The VM ids.
    """
    return [r[0] for r in await ex.rows(
        "UPDATE vm_runtimes SET vm_cmd = NULL, vm_state = 'starting', vm_state_reason = NULL"
        " WHERE vm_id IN (SELECT vm_id FROM vm_runtimes WHERE host_id = %s"
        "   AND vm_cmd = 'start' AND vm_state = 'stopped'"
        "   ORDER BY vm_state_ts, vm_id LIMIT %s)"
        " AND host_id = %s AND vm_cmd = 'start' AND vm_state = 'stopped'"
        " RETURNING vm_id", (host_id, limit, host_id))]


async def save_vm_state_in(ex, vm_id, host_id, state, reason):
    """
    The VM's state as node C{host_id} sees it (and C{reason}, if given);
    C{stopped} also releases it from the node. How many rows changed (0:
    the VM is no longer the node's).
    """
    if state == "stopped":
        sql = (f"UPDATE vm_runtimes SET {_STOPPED_RESET}, vm_state_reason = %s"
               " WHERE vm_id = %s AND host_id = %s RETURNING vm_id")
        args = (reason, vm_id, host_id)
    else:
        sql = ("UPDATE vm_runtimes SET vm_state = %s,"
               " vm_state_reason = coalesce(%s, vm_state_reason)"
               " WHERE vm_id = %s AND host_id = %s RETURNING vm_id")
        args = (state, reason, vm_id, host_id)
    return len(await ex.rows(sql, args))


async def release_stopped_in(ex, vm_id, host_id):
    """A stop command for a VM that does not run on node C{host_id}: release its row."""
    return bool(await ex.rows(
        f"UPDATE vm_runtimes SET {_STOPPED_RESET}"
        " WHERE vm_id = %s AND host_id = %s AND vm_state = 'stopped' RETURNING vm_id",
        (vm_id, host_id)))


async def add_node_in(ex, host_id):
    """The run-time rows of a node just registered (stopped, no counts)."""
    await ex.rows("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'stopped')"
                  " ON CONFLICT DO NOTHING RETURNING host_id", (host_id,))
    await ex.rows("INSERT INTO host_counters (host_id) VALUES (%s)"
                  " ON CONFLICT DO NOTHING RETURNING host_id", (host_id,))


_LEASE = "CASE WHEN %s > 0 THEN now() + make_interval(secs => %s) END"


async def node_starting_in(ex, host_id, pid, hypervisor, usable_cpu, usable_ram, lease=0.0):
    """
    Node C{host_id}'s HKD (process C{pid}) starts: C{starting}, with its
    capacity and a lease of C{lease} seconds (see L{heartbeat_in}).
    """
    await add_node_in(ex, host_id)
    await ex.rows(
        "UPDATE host_runtimes SET state = 'starting', state_ts = now(), pid = %s,"
        f" ok_ts = now(), lease_expires = {_LEASE}, hypervisor = %s, usable_cpu = %s,"
        " usable_ram = %s, cmd = NULL WHERE host_id = %s RETURNING host_id",
        (pid, lease, lease, hypervisor, usable_cpu, usable_ram, host_id))


async def node_state_in(ex, host_id, state):
    return bool(await ex.rows(
        "UPDATE host_runtimes SET state = %s, state_ts = now() WHERE host_id = %s"
        " RETURNING host_id", (state, host_id)))


async def heartbeat_in(ex, host_id, pid, lease=0.0):
    """
    Node C{host_id}'s heartbeat, which renews its lease for C{lease} seconds
    by the database clock (C{now() + lease}; 0: the node holds no lease). Fires
    with its state, or None when it is C{lost} (nothing written: a lost node
    rejoins through L{node_state_in}, its VMs already released).
    """
    rows = await ex.rows(
        f"UPDATE host_runtimes SET ok_ts = now(), pid = %s, lease_expires = {_LEASE}"
        " WHERE host_id = %s AND state <> 'lost' RETURNING state",
        (pid, lease, lease, host_id))
    return rows[0][0] if rows else None


async def peers_in(ex, host_id, seconds):
    """
    The other nodes that are running and sent a heartbeat in the last
    C{seconds} (by the database clock): those that could start this node's
    VMs if it were lost.
    """
    rows = await ex.rows(
        "SELECT count(*) FROM host_runtimes WHERE host_id <> %s AND state = 'running'"
        " AND ok_ts > now() - make_interval(secs => %s)", (host_id, seconds))
    return rows[0][0]


async def rejoin_in(ex, host_id, pid, lease=0.0):
    """
    Lost node C{host_id} (its VMs released, its local copies killed) is
    C{running} again with a new lease, in one statement, so that the cluster
    monitor does not find it lost again on its old lease. True if it was lost.
    """
    return bool(await ex.rows(
        "UPDATE host_runtimes SET state = 'running', state_ts = now(), ok_ts = now(),"
        f" pid = %s, lease_expires = {_LEASE} WHERE host_id = %s AND state = 'lost'"
        " RETURNING host_id", (pid, lease, lease, host_id)))


async def take_node_stop_in(ex, host_id):
    """Take node C{host_id}'s pending stop command: True when there was one."""
    return bool(await ex.rows(
        "UPDATE host_runtimes SET cmd = NULL WHERE host_id = %s AND cmd = 'stop'"
        " RETURNING host_id", (host_id,)))


async def block_node_in(ex, host_id, blocked):
    return bool(await ex.rows(
        "UPDATE host_runtimes SET blocked = %s WHERE host_id = %s RETURNING host_id",
        (blocked, host_id)))


async def mark_lost_nodes_in(ex, monitor_host_id, margin):
    """
    Every node but the monitor's whose lease ran out more than C{margin}
    seconds ago by the database clock becomes C{lost}: one not lost yet that
    is not stopped, or that is stopped but still holds VMs (its HKD stopped,
    its desktops did not). A node without a lease (C{lease_expires} NULL:
    hkd.lease.seconds = 0) is never lost. Fires with their ids.
    """
    return sorted(r[0] for r in await ex.rows(
        "UPDATE host_runtimes h SET state = 'lost', state_ts = now()"
        " WHERE h.host_id <> %s AND h.state <> 'lost'"
        " AND h.lease_expires < now() - make_interval(secs => %s)"
        " AND (h.state <> 'stopped' OR EXISTS (SELECT 1 FROM vm_runtimes v"
        " WHERE v.host_id = h.host_id AND v.vm_state <> 'stopped'))"
        " RETURNING h.host_id", (monitor_host_id, margin)))


async def release_vms_of_nodes_in(ex, host_ids):
    """Every VM of the (lost) nodes C{host_ids} is stopped and on no node; their ids."""
    return [r[0] for r in await ex.rows(
        f"UPDATE vm_runtimes SET {_STOPPED_RESET},"
        " vm_state_reason = 'released: node ' || host_id || ' was lost'"
        " WHERE host_id = ANY(%s) RETURNING vm_id", (list(host_ids),))]


@implementer(IRuntimeStore)
class RuntimeStore:
    """L{IRuntimeStore} on the daemons' pool (L{qvd.db.pool.Database})."""

    def __init__(self, db):
        self.db = db
        self._pool = PoolExecutor(db)

    def _one(self, statement, *args):
        return defer.ensureDeferred(statement(self._pool, *args))

    def claim(self, vm_id, session_id, claimant, claim_max_age, user_id=None, user_ip=None):
        return defer.ensureDeferred(
            self._claim(vm_id, session_id, claimant, claim_max_age, user_id, user_ip))

    async def _claim(self, vm_id, session_id, claimant, claim_max_age, user_id, user_ip):
        # Nobody holds it (the usual case): one statement. Else the claim
        # found is judged under its row lock, in a transaction.
        row = await claim_free_in(self._pool, vm_id, session_id, claimant, user_id, user_ip)
        if row is not None:
            return "free", Claim("disconnected"), row
        return await self.db.transaction(
            lambda cursor: claim_in(TransactionExecutor(cursor), vm_id, session_id, claimant,
                                    claim_max_age, user_id, user_ip),
            isolation="READ COMMITTED")

    def claim_is_ours(self, vm_id, session_id):
        return self._one(claim_is_ours_in, vm_id, session_id)

    def assign_host(self, vm_id, host_id):
        return self._one(assign_host_in, vm_id, host_id)

    def send_vm_cmd(self, vm_id, cmd, from_states):
        return self._one(send_vm_cmd_in, vm_id, cmd, from_states)

    def start_vm(self, vm_id, host_id):
        return self._one(start_vm_in, vm_id, host_id)

    def cancel_start(self, vm_id):
        return self._one(cancel_start_in, vm_id)

    def abort_session(self, vm_id):
        return self._one(abort_session_in, vm_id)

    def mark_connected(self, vm_id, session_id):
        return self._one(mark_connected_in, vm_id, session_id)

    def release(self, vm_id, session_id):
        return self._one(release_in, vm_id, session_id)

    def reset_claim(self, vm_id, session_id):
        return self._one(reset_claim_in, vm_id, session_id)

    def claims_on_node(self, l7r_host_id):
        return self._one(claims_on_node_in, l7r_host_id)

    def choose_host(self, vm_id, vm_name, weights, random):
        return self._one(place_in, vm_id, vm_name, weights, random)
