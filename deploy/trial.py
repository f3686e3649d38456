"""
trial, failing on skips: ``python deploy/trial.py [trial options] TESTS``.

Runs the tests as ``python -m twisted.trial`` does, then exits non-zero
when a test was skipped (or marked todo) unless its id is on the allow-list
(tests/allowed-skips.txt, or $QVD_ALLOWED_SKIPS: one ``test.id  reason`` a line), so that a missing
component can never turn the integration suite green by skipping it.
"""

import os
import sys

from twisted.python import usage
from twisted.scripts import trial

ALLOW_LIST = os.environ.get("QVD_ALLOWED_SKIPS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "allowed-skips.txt")


def allowed_skips(path=ALLOW_LIST):
    """The test ids of the allow-list; each line must give a reason."""
    allowed = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return allowed
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        test_id, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: {test_id} needs a reason")
        allowed[test_id] = reason.strip()
    return allowed


def main(argv):
    config = trial.Options()
    try:
        config.parseOptions(argv)
    except usage.error as e:
        raise SystemExit(f"trial: {e}")
    allowed = allowed_skips()
    runner = trial._makeRunner(config)
    result = runner.run(trial._getSuite(config))
    skipped = [(test.id(), reason) for test, reason in result.skips]
    skipped += [(test.id(), f"todo: {todo}") for test, _, todo in result.expectedFailures]
    refused = [(test_id, reason) for test_id, reason in skipped if test_id not in allowed]
    if refused:
        print(f"\n{len(refused)} test(s) skipped without being on {ALLOW_LIST}:",
              file=sys.stderr)
        for test_id, reason in refused:
            print(f"  {test_id}: {reason}", file=sys.stderr)
    return 0 if result.wasSuccessful() and not refused else 1


if __name__ == "__main__":
    sys.path[0] = os.getcwd()       # as "python -m twisted.trial": tests import from here
    sys.exit(main(sys.argv[1:]))
