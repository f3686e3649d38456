"""
A configuration kept in step with the database's C{configs} table.

    live = LiveConfig(Config.load(path), db, listener)
    live.subscribe(lambda config: ...)      # called with each new Config
    await live.start()                      # first load
    live.current.getint("osf.default.memory", tenant=3)
    ...
    live.stop()

L{LiveConfig} reads every row of C{configs} (the global layer, tenant -1, and
each tenant's layer) and C{ssl_configs} through an async
L{qvd.db.pool.Database}, and reads them again on each NOTIFY
C{qvd_config_changed} (sent by a trigger of the schema) and after each
reconnection of the L{qvd.db.listen.Listener}, since notifications sent while
it was disconnected are lost. When a row is invalid (unknown key, a value of
the wrong type, a reference loop) the previous configuration stays in force
and one error naming the row is logged; when the database cannot be reached
the previous configuration stays in force too, and the next reconnection
reloads it.
"""

from twisted.internet import defer
from qvd.logs import Logger

from qvd.config import GLOBAL_TENANT, ConfigError

CHANNEL = "qvd_config_changed"

_log = Logger()


def layers_from_rows(rows):
    """
    (global values, tenant id -> values) from C{(tenant_id, key, value)} rows.
    """
    global_values, tenants = {}, {}
    for tenant_id, key, value in rows:
        if tenant_id == GLOBAL_TENANT:
            global_values[key] = value
        else:
            tenants.setdefault(tenant_id, {})[key] = value
    return global_values, tenants


def apply_rows(base, rows):
    """
    C{base} with the database layers of C{rows}; every database value is
    interpolated once, so loops and references to unknown keys are rejected
    here rather than when a daemon reads the key.

    @raise ConfigError: naming the offending key and layer.
    """
    global_values, tenants = layers_from_rows(rows)
    config = base.with_database(global_values, tenants)
    for key in global_values:
        _check(config, key, None, "the database (global)")
    for tenant, values in tenants.items():
        for key in values:
            _check(config, key, tenant, f"the database (tenant {tenant})")
    return config


def _check(config, key, tenant, source):
    try:
        config.typed(key, tenant)
    except ConfigError as e:
        raise ConfigError(f"{source}, key {key!r}: {e}")


class LiveConfig:
    """
    The current configuration: the node's C{base_config} under the database layers.

    @ivar current: the L{qvd.config.Config} in force.
    @ivar ssl: C{l7r.ssl.*} -> PEM text, from C{ssl_configs}.
    @ivar loads: how many reloads succeeded (for tests and metrics).
    """

    def __init__(self, base_config, db, listener, log=None):
        self.base = base_config
        self.current = base_config
        self.ssl = {}
        self.loads = 0
        self._db = db
        self._listener = listener
        self._log = log or _log
        self._subscribers = []
        self._reloading = None
        self._again = False
        self._started = False
        self._last_error = None

    def subscribe(self, callback):
        """
        Call C{callback(config)} with each new configuration.
        """
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def start(self):
        """
        Listen for changes and load the database layers.

        @return: a Deferred that fires (with the current Config) after the
            first load attempt.
        """
        self._started = True
        self._listener.onReconnect(self._on_reconnect)
        d = self._listener.subscribe(CHANNEL, self._on_notify)
        d.addErrback(lambda f: None)  # the listener re-listens on reconnect
        return self.reload()

    def stop(self):
        self._started = False
        return self._listener.unsubscribe(CHANNEL, self._on_notify)

    def _on_notify(self, channel, payload):
        if self._started:
            self.reload()

    def _on_reconnect(self):
        if self._started:
            return self.reload()

    def reload(self):
        """
        Read the database layers again. Concurrent calls are folded: while a
        reload runs, further requests cause exactly one more reload after it.

        @return: a Deferred firing with the current Config once done.
        """
        if self._reloading is not None:
            self._again = True
            waiting = defer.Deferred()
            self._reloading.addBoth(lambda r: (waiting.callback(self.current), r)[1])
            return waiting
        self._reloading = defer.ensureDeferred(self._reload_until_settled())
        result = defer.Deferred()

        def done(r):
            self._reloading = None
            result.callback(self.current)
            return r
        self._reloading.addBoth(done)
        return result

    async def _reload_until_settled(self):
        while True:
            self._again = False
            await self._reload_once()
            if not self._again:
                return

    async def _reload_once(self):
        try:
            rows = await self._db.runQuery("SELECT tenant_id, key, value FROM configs")
            ssl_rows = await self._db.runQuery("SELECT key, value FROM ssl_configs")
        except Exception as e:
            self._log.warn("cannot read the configuration from the database ({error}); "
                           "keeping the previous one until the database is back",
                           error=str(e).strip())
            return
        try:
            config = apply_rows(self.base, rows)
        except ConfigError as e:
            if str(e) == self._last_error:
                return
            self._last_error = str(e)
            self._log.error("invalid configuration in the database, keeping the previous "
                            "configuration: {error}; fix it with 'qvd-admin config set' "
                            "or 'qvd-admin config del'", error=str(e))
            return
        self._last_error = None
        self.loads += 1
        ssl = dict(ssl_rows)
        changed = config != self.current or ssl != self.ssl
        self.ssl = ssl
        self.current = config
        if changed:
            for callback in list(self._subscribers):
                try:
                    callback(config)
                except Exception:
                    self._log.failure("configuration subscriber {callback!r} failed",
                                      callback=callback)
