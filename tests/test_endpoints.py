"""
Connections to a VM's address never wait for the reactor's thread pool
(qvd._endpoints): with every thread of the pool busy (a login storm's
password checks), the agent call and the nxagent connection still go
through at once. Real sockets on 127.0.0.1.
"""

import threading
import time

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from qvd._endpoints import client_endpoint
from qvd.l7r.relay import connect_peer
from qvd.protocols.simplerpc import CONTENT_TYPE
from qvd.vmaclient import VMAClient


class _Ping(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return b"null"


class EndpointTests(unittest.TestCase):

    def test_literal_addresses_need_no_resolver(self):
        """An IPv4 or IPv6 address gets a plain TCP endpoint; a name the resolving one."""
        self.assertIsInstance(client_endpoint(reactor, "10.1.2.3", 3030, 4),
                              endpoints.TCP4ClientEndpoint)
        self.assertIsInstance(client_endpoint(reactor, "fd00::5", 3030, 4),
                              endpoints.TCP6ClientEndpoint)
        self.assertIsInstance(client_endpoint(reactor, "vm1.example", 3030, 4),
                              endpoints.HostnameEndpoint)

    @defer.inlineCallbacks
    def test_busy_thread_pool_does_not_delay_vm_connections(self):
        """
        Every thread of the reactor's pool blocked for 3 s: a SimpleRPC call
        to 127.0.0.1 and a relay connection to 127.0.0.1 complete in well
        under a second all the same.
        """
        site = server.Site(_Ping())
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                 interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        pool = reactor.getThreadPool()
        release = threading.Event()
        self.addCleanup(release.set)
        for _ in range(pool.max + 2):
            reactor.callInThread(release.wait, 3)
        began = time.monotonic()
        client = VMAClient(reactor, "127.0.0.1", port.getHost().port, timeout=2)
        result = yield client.ping()
        peer = yield connect_peer(reactor, "127.0.0.1", echo.getHost().port, 2)
        took = time.monotonic() - began
        peer.transport.loseConnection()
        self.assertIsNone(result)
        self.assertLess(took, 1.0)
        self.assertFalse(release.is_set(), "the pool was not busy during the calls")
        release.set()
