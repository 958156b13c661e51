#!/usr/bin/env bash
# Run the whole suite; "no tests ran" (pytest exit 5) is a failure, never a pass.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
