#!/usr/bin/env bash
# Set up this machine (deploy/setup.sh), start what the tests need, and run
# the whole test suite with trial. Extra arguments name test modules to run
# instead of all of them.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$("$here/deploy/setup.sh" | tail -1)
cd "$here"
export PATH="$bin:$PATH"
# Tests never read this node's own configuration (/etc/qvd/node.conf).
export QVD_CONFIG=/dev/null
"$here/deploy/services.sh"
status=0
"$bin/python" "$here/deploy/trial.py" --temp-directory="${TMPDIR:-/tmp}/qvd-trial-$$" "${@:-tests}" || status=$?
rm -rf "${TMPDIR:-/tmp}/qvd-trial-$$"
exit $status
