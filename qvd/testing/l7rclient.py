"""
A raw QVD client for L7R tests: sends bytes, reads whole responses.

    client = await RawClient.connect(reactor, "127.0.0.1", port, tls=True)
    client.send(b"GET /qvd/ping HTTP/1.1\\n\\n")
    status, head, body = await client.response()
"""

import re

from twisted.internet import defer, endpoints, protocol, ssl, task


class RawClient(protocol.Protocol):
    def __init__(self, reactor):
        self.reactor = reactor
        self.buffer = bytearray()
        self.closed = False
        self.lost = defer.Deferred()

    @classmethod
    async def connect(cls, reactor, host, port, tls=True, options=None):
        if tls:
            endpoint = endpoints.SSL4ClientEndpoint(reactor, host, port,
                                                    options or ssl.CertificateOptions())
        else:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port)
        return await endpoints.connectProtocol(endpoint, cls(reactor))

    def dataReceived(self, data):
        self.buffer += data

    def connectionLost(self, reason):
        self.closed = True
        self.lost.callback(None)

    def send(self, data):
        self.transport.write(data)

    async def wait(self, predicate, timeout=10.0, what="data"):
        waited = 0.0
        while not predicate():
            if waited > timeout:
                raise AssertionError(f"timed out waiting for {what}; have {bytes(self.buffer)!r}"
                                     f" closed={self.closed}")
            if self.closed and not predicate():
                raise AssertionError(f"connection closed waiting for {what}; "
                                     f"have {bytes(self.buffer)!r}")
            await task.deferLater(self.reactor, 0.01, lambda: None)
            waited += 0.01

    def _complete(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end + 4])
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return None
        return status, head, end + 4 + length

    async def raw_response(self, timeout=10.0):
        """
        The bytes of the next whole response (head and body).
        """
        await self.wait(lambda: self._complete() is not None, timeout, "a response")
        _, _, size = self._complete()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def response(self, timeout=10.0):
        data = await self.raw_response(timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n", body

    async def final_response(self, timeout=10.0):
        """
        Skip 102s; return (status, head, body, [102 infos]).
        """
        infos = []
        while True:
            status, head, body = await self.response(timeout)
            if status != 102:
                return status, head, body, infos
            infos.append(re.search(rb"X-QVD-VM-Info: (.*)\r\n", head).group(1).decode())

    def close(self):
        self.transport.loseConnection()
        return self.lost
