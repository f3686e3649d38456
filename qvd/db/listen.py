"""
LISTEN/NOTIFY that survives PostgreSQL restarts.

    listener = Listener(dsn, reactor, keepalive=5)
    listener.subscribe("qvd_cmd_for_vm_on_host3", on_notify)   # on_notify(channel, payload)
    listener.onReconnect(resync)        # called after every (re)connection
    await listener.start()
    ...
    await listener.stop()

One dedicated connection listens on every subscribed channel. A keepalive
query every C{keepalive} seconds notices a connection that died silently; a
lost connection is re-opened with backoff and every channel listened again.
Notifications sent while the connection was down are lost, so subscribers
register an C{onReconnect} callback that re-reads what they watch (the slow poll
of the architecture does the same).
"""

import re

from twisted.internet import defer, task
from qvd.logs import Logger

from qvd.db.pool import Connection

log = Logger()

_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]*$")


class Listener:
    def __init__(self, dsn, reactor, keepalive=5.0, max_backoff=5.0):
        self.dsn = dsn
        self.reactor = reactor
        self.keepalive = keepalive
        self.max_backoff = max_backoff
        self._channels = {}
        self._reconnect_callbacks = []
        self._conn = None
        self._running = False
        self._connecting = None
        self._loop = None
        self._retry_call = None
        self._backoff = 0.1
        self.connected = False

    def subscribe(self, channel, callback):
        """
        Call C{callback(channel, payload)} for each NOTIFY on C{channel}.

        @return: a Deferred that fires once the LISTEN is in place (at once
            when not connected: it is issued on connection).
        """
        if not _CHANNEL.match(channel):
            raise ValueError(f"not a valid channel name: {channel!r}")
        first = channel not in self._channels
        self._channels.setdefault(channel, []).append(callback)
        if first and self.connected:
            return self._conn.runOperation(f"LISTEN {channel}").addErrback(self._lost)
        return defer.succeed(None)

    def unsubscribe(self, channel, callback):
        callbacks = self._channels.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks and channel in self._channels:
            del self._channels[channel]
            if self.connected:
                return self._conn.runOperation(f"UNLISTEN {channel}").addErrback(self._lost)
        return defer.succeed(None)

    def onReconnect(self, callback):
        """
        Call C{callback()} after each successful (re)connection.
        """
        self._reconnect_callbacks.append(callback)

    def start(self):
        """
        Connect and listen. Fires once the first connection is made.
        """
        self._running = True
        self._loop = task.LoopingCall(self._ping)
        self._loop.clock = self.reactor
        self._loop.start(self.keepalive, now=False)
        self._connecting = defer.Deferred()
        first = self._connecting
        self._connect()
        return first

    def stop(self):
        self._running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self.connected = False
        self._conn = None
        return defer.succeed(None)

    @defer.inlineCallbacks
    def _connect(self):
        self._retry_call = None
        if not self._running:
            return
        conn = Connection(reactor=self.reactor)
        conn.lostCallback = lambda reason, conn=conn: self._connection_lost(conn, reason)
        try:
            yield conn.connect(self.dsn)
            conn.addNotifyObserver(self._dispatch)
            for channel in list(self._channels):
                yield conn.runOperation(f"LISTEN {channel}")
        except Exception as e:
            try:
                conn.close()
            except Exception:
                pass
            log.warn("database listener cannot connect ({error}); retrying in {delay:.1f}s",
                     error=str(e).strip(), delay=self._backoff)
            self._schedule_retry()
            return
        if not self._running:
            conn.close()
            return
        self._conn = conn
        self.connected = True
        self._backoff = 0.1
        for callback in list(self._reconnect_callbacks):
            try:
                yield defer.maybeDeferred(callback)
            except Exception:
                log.failure("reconnect callback failed")
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.callback(None)

    def _schedule_retry(self):
        if self._running and self._retry_call is None:
            self._retry_call = self.reactor.callLater(self._backoff, self._connect)
            self._backoff = min(self._backoff * 2, self.max_backoff)

    def _connection_lost(self, conn, reason):
        if conn is self._conn:
            self._lost(reason)

    def _lost(self, failure):
        if self.connected:
            log.warn("database listener lost its connection: {error}",
                     error=str(failure.value).strip())
        self.connected = False
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        self._schedule_retry()

    def _ping(self):
        if not self.connected:
            if self._retry_call is None and self._running:
                self._schedule_retry()
            return None
        return self._conn.runOperation("SELECT 1").addErrback(self._lost)

    def _dispatch(self, notify):
        for callback in list(self._channels.get(notify.channel, [])):
            try:
                callback(notify.channel, notify.payload)
            except Exception:
                log.failure("NOTIFY callback for {channel} failed", channel=notify.channel)
