"""
The layers hold: no product module imports the test fakes; the front door
does not import the CLI.
"""

import os
import re

from twisted.trial import unittest

import qvd

ROOT = os.path.dirname(os.path.abspath(qvd.__file__))


def _modules(*packages):
    for package in packages:
        top = os.path.join(ROOT, package)
        for where, _, files in os.walk(top):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(where, name)
                    with open(path) as f:
                        yield os.path.relpath(path, os.path.dirname(ROOT)), f.read()


class LayerTests(unittest.TestCase):

    def offenders(self, pattern, *packages):
        found = re.compile(pattern)
        return [path for path, text in _modules(*packages) if found.search(text)]

    def test_no_product_module_uses_the_fakes(self):
        """Only qvd/testing names qvd.testing."""
        packages = [p for p in os.listdir(ROOT)
                    if os.path.isdir(os.path.join(ROOT, p)) and p not in ("testing",
                                                                          "__pycache__")]
        self.assertEqual(self.offenders(r"qvd\.testing", *packages), [])

    def test_drivers_without_the_image_builder(self):
        """The virt drivers and the daemons import nothing of qvd.di (the image builder)."""
        self.assertEqual(self.offenders(r"(from|import) qvd\.di\b", "virt", "hkd", "l7r"), [])

    def test_front_door_without_the_cli(self):
        """The L7R and the HKD import nothing of qvd.admin, nor of the agent's package."""
        self.assertEqual(self.offenders(r"(from|import) qvd\.(admin|vma)\b", "l7r", "hkd"), [])
