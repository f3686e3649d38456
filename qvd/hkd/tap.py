"""
twistd qvd-hkd: the node daemon.

    twistd -n qvd-hkd --config /etc/qvd/node.conf [--nodename NAME]

Before the reactor runs it checks, and exits with one clear message when
wrong: the configuration, the node lock (hkd.lock.path: one HKD per node), the
database (reachable, migrated), the node (a C{hosts} row whose name is
C{nodename}; create it with C{qvd-admin host add}) and, with
C{path.storage.shared = 1}, that C{path.storage.root} is the cluster's shared
storage (L{qvd.storage}; checked again before each VM's start). SIGTERM stops the daemon but
not the desktops; a restarted HKD adopts them. With a lease (hkd.lease.seconds)
the HKD runs the node's fencer (L{qvd.hkd.fencer}), which outlives it.
"""

import importlib

from twisted.application import service
from twisted.python import usage
from zope.interface.verify import verifyObject

from qvd import logs
from qvd import storage as qvd_storage
from qvd.config import Config, ConfigError
from qvd.config.live import apply_rows
from qvd.virt.interfaces import IHypervisor


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "The node configuration file (default /etc/qvd/node.conf)."],
        ["nodename", "n", None, "This node's name in the hosts table (default: nodename "
                                "from the configuration)."],
    ]


def _fail(message):
    raise SystemExit(f"qvd-hkd: {message}")


def find_host(dsn, nodename):
    """
    The id of host C{nodename} and the database's configuration rows
    C{(tenant_id, key, value)}, read with a blocking connection (before the
    reactor runs). Exits with a message when the database or the row is missing.
    """
    import psycopg2

    from qvd.db import DatabaseError, roles, sync
    try:
        with sync.connect(dsn) as conn:
            with conn.cursor() as cur:
                roles.refuse_superuser(cur, "the HKD (database.user.hkd)")
                cur.execute("SELECT id FROM hosts WHERE name = %s", (nodename,))
                row = cur.fetchone()
                cur.execute("SELECT tenant_id, key, value FROM configs")
                config_rows = cur.fetchall()
                conn.rollback()
    except DatabaseError as e:
        _fail(f"{e}; start PostgreSQL or fix database.* in the configuration")
    except roles.SuperuserRefused as e:
        _fail(str(e))
    except psycopg2.errors.UndefinedTable:
        _fail("the database has no qvd schema: run qvd-admin db init first "
              "(deploy/up.sh does it on a single node)")
    except psycopg2.errors.InsufficientPrivilege as e:
        _fail(f"the HKD's database role may not read the hosts table ({str(e).strip()}): "
              "run 'qvd-admin db upgrade', which grants it what it needs")
    except psycopg2.Error as e:
        _fail(f"cannot read the hosts table: {str(e).strip()}")
    if row is None:
        _fail(f"this node, {nodename!r}, is not registered in the hosts table: add it with "
              f"'qvd-admin host add {nodename} <its IP address>', or set nodename in "
              "the configuration (or --nodename) to a registered host")
    return row[0], [tuple(r) for r in config_rows]


def check_storage(config, dsn):
    """
    The L{qvd.storage.StorageSettings} of C{config} and the database's
    storage id; exits with the problem's text when C{path.storage.shared} is
    1 and C{path.storage.root} is not the cluster's shared storage.
    """
    settings = qvd_storage.StorageSettings.from_config(config)
    if not settings.shared:
        return settings, None
    from qvd.hkd.storage import read_storage_id
    try:
        storage_id = read_storage_id(dsn)
    except Exception as e:
        _fail(f"cannot read the storage id from the database ({str(e).strip()}): run "
              "'qvd-admin db upgrade'")
    try:
        qvd_storage.check(settings, storage_id)
    except qvd_storage.StorageError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot check path.storage.root {settings.root}: {e}")
    return settings, storage_id


def make_driver(config, reactor):
    """
    The virt driver named by vm.hypervisor: the module qvd.virt.<name> offers
    C{makeHypervisor(config, reactor)} or a class implementing L{IHypervisor}
    that takes the same arguments (C{LXCDriver(config, reactor)}).
    """
    name = config.get("vm.hypervisor")
    try:
        module = importlib.import_module(f"qvd.virt.{name}")
    except ImportError as e:
        _fail(f"vm.hypervisor = {name!r}: no driver qvd.virt.{name} ({e}); use lxc or kvm")
    factory = getattr(module, "makeHypervisor", None)
    if factory is None:
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if (isinstance(value, type) and value.__module__ == module.__name__
                    and IHypervisor.implementedBy(value)):
                factory = value
                break
    if factory is None:
        _fail(f"qvd.virt.{name} has no driver class implementing IHypervisor")
    driver = factory(config, reactor)
    verifyObject(IHypervisor, driver)
    return driver


def make_vma_factory(config, reactor):
    from qvd.vmaclient import VMAClient
    timeout = config.getfloat("hkd.vm.vma.timeout")

    def factory(host, port, secret=""):
        return VMAClient(reactor, host, port, timeout=timeout, secret=secret)
    return factory


class _Lock(service.Service):
    def __init__(self, lock):
        self.lock = lock

    def startService(self):
        service.Service.startService(self)
        self.lock.update_pid()

    def stopService(self):
        service.Service.stopService(self)
        self.lock.release()


def makeService(options, driver=None, vma_factory=None):
    """
    The HKD service of C{options}. Tests pass a C{driver(config, reactor)}
    and a C{vma_factory(driver, config, reactor)} (their fakes, from a .tac
    file) instead of the configured driver and the real agent client.
    """
    from twisted.internet import reactor

    from qvd.db.listen import Listener
    from qvd.db.pool import Database
    from qvd.db.settings import database_dsn
    from qvd.hkd.fencer import FenceSettings, FencerProcess
    from qvd.hkd.lock import LockHeld, NodeLock
    from qvd.hkd.node import HKD

    overrides = {}
    if options["nodename"]:
        overrides["nodename"] = options["nodename"]
    try:
        config = Config.load(options["config"], overrides=overrides)
        logs.set_level(config.get("log.level"))
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    nodename = config.get("nodename")
    lock = NodeLock(config.get("hkd.lock.path"))
    try:
        lock.acquire()
    except LockHeld as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot create the node lock {lock.path}: {e.strerror} (set hkd.lock.path)")
    try:
        dsn = database_dsn(config, "hkd")
    except Exception as e:
        _fail(f"cannot reach the database: {e}")
    host_id, config_rows = find_host(dsn, nodename)
    try:
        # The node's drivers and paths are read once: the database's values
        # of those keys (scope "restart") count from this start; the HKD
        # follows the live ones (it replaces these database layers).
        config = apply_rows(config, config_rows)
    except ConfigError as e:
        _fail(f"invalid configuration in the database: {e}; fix it with "
              "'qvd-admin config set' or 'qvd-admin config del'")
    storage_settings, storage_id = check_storage(config, dsn)
    make = make_driver if driver is None else driver
    try:
        driver = make(config, reactor)
    except SystemExit:
        raise
    except Exception as e:
        _fail(f"cannot set up the {config.get('vm.hypervisor')} driver: {e}")
    if storage_settings.shared:
        from qvd.hkd.storage import StorageGuard
        driver = StorageGuard(driver, storage_settings, storage_id, reactor)
    if vma_factory is None:
        vma_factory = make_vma_factory(config, reactor)
    else:
        vma_factory = vma_factory(driver, config, reactor)
    db = Database(dsn, reactor, size=config.getint("database.pool.size"),
                  retries=config.getint("database.retry.max"))
    listener = Listener(dsn, reactor, keepalive=config.getfloat("database.listen.keepalive"))

    def node_stopped():
        if reactor.running:
            reactor.stop()

    top = service.MultiService()
    _Lock(lock).setServiceParent(top)
    fencer = None
    if config.getfloat("hkd.lease.seconds") > 0:
        fencer = FencerProcess(FenceSettings.from_config(config))
    hkd = HKD(config, reactor, db, listener, driver, vma_factory, host_id, dsn=dsn,
              on_node_stopped=node_stopped, fencer=fencer)
    hkd.setServiceParent(top)
    from qvd.hkd.storage import Sweeper, SweepSettings
    Sweeper(reactor, db, SweepSettings.from_config(config),
            lambda: qvd_storage.problem(storage_settings, storage_id) is None
            ).setServiceParent(top)
    return top
