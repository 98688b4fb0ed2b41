#!/usr/bin/env bash
# Every GPU check of the project in one run, sized for a 15-minute device lease (about 8 minutes
# of commands, under 10 minutes in all): the CUDA-parametrised tests, then the benchmarks on
# CUDA, each under a timeout.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/gpu_check
#
# The device image has torch, timm, scipy, matplotlib and pytest but not torchopt. Fetch its
# wheels once on the development machine (the folder .whl/ is git-ignored and must be carried):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl torchopt==0.7.3 optree graphviz
#
# Writes tests.log, the benchmark JSON files and the plot into OUT_DIR and prints a summary.
set -uo pipefail
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# Tests whose device fixture is CUDA (the same tests run on the CPU in CI).
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee "$out/tests.log" | tail -5

# One meta-step against the peers, K = 5, 25, 100, 16 tasks (the setting); the JSON is
# rewritten after every row, so a timeout keeps what was measured.
timeout 300 python3 benchmarks/meta_step.py --device cuda --repeats 2 \
    --methods loop batched torchopt maml maml_vmap --out "$out"
# Where the time of one vmapped K=100 meta-step goes.
timeout 60 python3 benchmarks/profile_step.py --device cuda --steps 100 --out "$out"
# Eager against compiled (and CUDA-graphed) inner steps, one task and vmapped over 16.
timeout 90 python3 benchmarks/compiled_step.py --device cuda --out "$out"
ls -l "$out"
