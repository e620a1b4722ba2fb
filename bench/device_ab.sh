#!/bin/bash
# On the 16-core benchmark machine (see bench/device16.sh and ../shared/notes/device-cpu.md): decode
# and prefill of this tree's engine against another revision's, on one random-weight model, the two
# builds alternating round by round (that machine's readings move 10-30% within minutes, so only
# alternating rounds compare). The other revision travels as sources in an ignored folder, made here:
#   rm -rf bench/out/base && mkdir -p bench/out/base &&
#   git archive REV native llaisys_chat setup.py setup.cfg pyproject.toml | tar -x -C bench/out/base
# with .whl/ and bench/out/dev/ as for bench/device16.sh.
#
#   LAYOUTS="2x8 1x16" [W=q4_0] [ROUNDS=3] [SHAPE=05] bash bench/device_ab.sh
set -e
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo
SP=$(python3 -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --no-deps .whl/*.whl
export PATH=/tmp/venv/bin:$PATH OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 LLAISYS_BUILD_JOBS=8 PYTHONUNBUFFERED=1
export PYTHONPATH=$SP
(python3 setup.py build_ext --inplace > /tmp/build-this.log 2>&1 || tail -20 /tmp/build-this.log) &
(cd bench/out/base && python3 setup.py build_ext --inplace > /tmp/build-base.log 2>&1 || tail -20 /tmp/build-base.log) &
wait
python3 bench/out/dev/make_gguf.py bench/out/dev/meta${SHAPE:-05}.json.gz /tmp/m-bf16.gguf > /dev/null
for r in $(seq "${ROUNDS:-3}"); do
    for build in this base; do
        tree=$PWD; [ $build = base ] && tree=$PWD/bench/out/base
        PYTHONPATH=$SP:$tree python3 bench/layouts.py /tmp/m-bf16.gguf --cores 16 --weights "${W:-q4_0}" --rounds 1 \
            --tokens 64 --layouts $LAYOUTS | grep "^|" | grep -v -- "---" | sed "s/^/$build round $r /"
    done
done
