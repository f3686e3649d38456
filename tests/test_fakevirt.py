"""
The fake hypervisor passes the driver interface suite the real drivers run.
"""

from twisted.internet import reactor
from twisted.trial import unittest

from qvd.testing.fakestore import make_spec
from qvd.testing.fakevirt import FakeHypervisor
from qvd.testing.virt_interface import HypervisorInterfaceTests


class FakeHypervisorInterfaceTests(HypervisorInterfaceTests, unittest.TestCase):

    def makeHypervisor(self):
        hv = FakeHypervisor(reactor)
        return hv.setUp().addCallback(lambda _: hv)

    def makeSpec(self, vm_id):
        return make_spec(vm_id)
