"""
Tests for qvd.logs.
"""

from twisted.logger import LogLevel
from twisted.trial import unittest

from qvd import logs


class LevelTests(unittest.TestCase):

    def setUp(self):
        self.addCleanup(setattr, logs, "_threshold", logs._threshold)
        self.events = []
        self.log = logs.Logger(observer=self.events.append)

    def test_everything_until_set(self):
        """
        Before set_level, debug events are emitted.
        """
        logs._threshold = None
        self.log.debug("d")
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.debug])

    def test_threshold(self):
        """
        With log.level INFO, debug events are dropped and info and above kept;
        WARNING is accepted as the name of the warn level.
        """
        logs.set_level("INFO")
        self.log.debug("d")
        self.log.info("i")
        self.log.error("e")
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.info, LogLevel.error])
        logs.set_level("warning")
        self.log.info("i")
        self.assertEqual(len(self.events), 2)

    def test_bad_level(self):
        """
        An unknown level name is refused with a message naming it.
        """
        e = self.assertRaises(ValueError, logs.set_level, "LOUD")
        self.assertIn("'LOUD'", str(e))
