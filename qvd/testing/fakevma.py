"""
A fake VMA speaking SimpleRPC, and a TCP echo server standing in for nxagent,
for tests of the L7R.

    vma = FakeVMA(states=["starting", "listening"])
    port = reactor.listenTCP(0, vma.site(), interface="127.0.0.1")
    echo = reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1")

C{GET /vma/<fn>?k=v...} answers 200 C{application/json-simplerpc} with
C{JSON(result)\\r\\n} or C{"",JSON(error)\\r\\n} (reference 3.1). C{x_start}
records its parameters in C{starts} and fails C{x_start_failures} times with
"retry later" first; C{x_state} walks through C{states} (the last one
repeats).
"""

import json
from urllib.parse import parse_qsl

from twisted.internet import protocol
from twisted.web import resource, server


class FakeVMA(resource.Resource):
    isLeaf = True

    def __init__(self, states=("listening",), x_start_failures=0):
        super().__init__()
        self.states = list(states)
        self.x_start_failures = x_start_failures
        self.starts = []
        self.calls = []

    def site(self):
        return server.Site(self)

    def render_GET(self, request):
        parts = request.path.decode().strip("/").split("/")
        request.setHeader(b"content-type", b"application/json-simplerpc")
        if len(parts) != 2 or parts[0] != "vma":
            request.setResponseCode(404)
            return b""
        fn = parts[1]
        query = request.uri.decode().partition("?")[2]
        params = dict(parse_qsl(query, keep_blank_values=True))
        self.calls.append(fn)
        if fn == "x_start":
            self.starts.append(params)
            if self.x_start_failures > 0:
                self.x_start_failures -= 1
                return self._error("x session is connected, retry later")
            return self._ok("starting")
        if fn == "x_state":
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return self._ok(state)
        if fn == "ping":
            return self._ok(None)
        request.setResponseCode(404)
        return b""

    @staticmethod
    def _ok(result):
        return json.dumps(result).encode() + b"\r\n"

    @staticmethod
    def _error(error):
        return b'"",' + json.dumps(error).encode() + b"\r\n"


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.factory.received += data
        self.transport.write(data)

    def connectionLost(self, reason):
        if self in self.factory.connections:
            self.factory.connections.remove(self)
        self.factory.closed += 1


class EchoFactory(protocol.Factory):
    protocol = Echo

    def __init__(self):
        self.connections = []
        self.closed = 0
        self.received = b""     # every byte any connection got
