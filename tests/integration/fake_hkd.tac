# twistd -n -y tests/integration/fake_hkd.tac: the real qvd-hkd service (its
# start-up checks, node lock, life cycle) driving the fake hypervisor and
# agents of qvd.testing.fakevirt. Its options come from $QVD_HKD_ARGS.
import os
import shlex

from twisted.application import service

from qvd.hkd import tap
from qvd.testing.fakevirt import FakeHypervisor, FakeVMA

options = tap.Options()
options.parseOptions(shlex.split(os.environ.get("QVD_HKD_ARGS", "")))
application = service.Application("qvd-hkd (fake hypervisor)")
tap.makeService(options, driver=lambda config, reactor: FakeHypervisor(reactor),
                vma_factory=lambda driver, config, reactor: FakeVMA(driver)
                ).setServiceParent(application)
