"""
A minimal SimpleRPC client for the VMA (reference 3.1), used by the broker
until the "vma" helper's L{qvd.vma.client} lands; same API:

    client = VMAClient(reactor, "10.0.0.5", 3030, timeout=4)
    state = await client.x_state()            # "listening"
    await client.x_start({"qvd.client.os": "linux", ...})

C{GET /vma/<fn>?k=v&...}; the reply body is C{JSON(result)\\r\\n} or
C{"",JSON(error)\\r\\n}. A reply with an error fails with L{VMAError}; no
answer (refused, timed out, not SimpleRPC) fails with L{VMAUnreachable}.
"""

import json
from urllib.parse import quote

from twisted.internet import defer
from twisted.web.client import Agent, readBody


class VMAError(Exception):
    """
    The VMA answered with an error (e.g. "retry later").
    """


class VMAUnreachable(VMAError):
    """
    The VMA did not answer in time, or not in SimpleRPC.
    """


def encode_params(params):
    """
    The query string of a call: C{k=v&k=v}, each part URI-escaped.
    """
    items = params.items() if isinstance(params, dict) else params
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in items)


def decode_reply(body):
    """
    The result of a SimpleRPC reply body; raise L{VMAError} for an error reply.
    """
    try:
        values = json.loads("[" + body.decode("utf-8").strip() + "]")
    except (UnicodeDecodeError, ValueError):
        raise VMAUnreachable(f"the VMA's answer is not SimpleRPC: {body[:80]!r}")
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        raise VMAError(str(values[1]))
    raise VMAUnreachable(f"the VMA's answer is not SimpleRPC: {body[:80]!r}")


class VMAClient:
    def __init__(self, reactor, host, port, timeout=4.0):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self._agent = Agent(reactor, connectTimeout=timeout)

    @defer.inlineCallbacks
    def call(self, fn, params=()):
        query = encode_params(params)
        url = f"http://{self.host}:{self.port}/vma/{fn}" + (f"?{query}" if query else "")
        d = self._agent.request(b"GET", url.encode("ascii"))
        d.addCallback(lambda response: readBody(response).addCallback(
            lambda body: (response.code, body)))
        d.addTimeout(self.timeout, self.reactor)
        try:
            code, body = yield d
        except Exception as e:
            raise VMAUnreachable(f"the VMA at {self.host}:{self.port} did not answer {fn}: {e}")
        if code != 200:
            raise VMAUnreachable(f"the VMA at {self.host}:{self.port} answered {fn} with HTTP {code}")
        return decode_reply(body)

    def x_start(self, params):
        return self.call("x_start", params)

    def x_state(self):
        return self.call("x_state")
