#!/bin/bash
# The GPU check, as one short script for a lent GPU machine that reaches no registry (docs/benchmarks.md, "On a
# GPU"): the CUDA paths of the tests, then GPU figures. Prints what it measures; each part has its own time limit.
#
# Prepare here (x86-64, Python 3.12 on the GPU machine), in an ignored folder .gpu/ of the checkout:
#   .gpu/whl/      wheels of what the machine lacks, fetched with `pip download --no-deps --only-binary=:all:
#                  --python-version 3.12 --platform manylinux_2_28_x86_64 ...`: duckdb, trl, datasets, dill,
#                  multiprocess, and this project's transformers with what it needs (kernels, huggingface_hub, httpx2,
#                  httpcore2, click, hf-xet, tomlkit, truststore) where the machine's is older than pyproject allows
#   .gpu/smollm2/  prefloop-data/models/smollm2 without model.safetensors (the 98 MB GGUF does not travel: the
#                  benchmarks run SmolLM2's shapes with random weights, bench/gpu/random_model.py)
# then run `PARTS="cuda learner round vstrl sampling" bash bench/gpu/check.sh` there with $OUT set, carrying .gpu.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import sys, torch, transformers, peft, accelerate, duckdb; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/gpu/random_model.py .gpu/smollm2 prefloop-data/models/smollm2 2>&1 | tail -1
export PREFLOOP_TEST_TOKENIZER=$PWD/.gpu/smollm2
run() { local name=$1 limit=$2; shift 2; local t0=$(date +%s); timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - t0 )) s"; grep -v "^\s*$" "$OUT/$name.log" | grep -v "Warning\|warnings.warn\|^  " | tail -25; }
# A per-test timeout well inside each part's, so that a stuck test still leaves pytest's summary in the log.
PT="python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning --durations=5 --timeout 40 -rfE"
[[ " $PARTS " == *" cuda "* ]] && run cuda 150 $PT tests/test_cuda.py tests/test_generation_worker.py
[[ " $PARTS " == *" learner "* ]] && run learner 150 $PT -n 6 tests/test_round.py tests/test_reference_and_kl.py \
  tests/test_merged_sampling.py tests/test_model_families.py tests/test_reward.py tests/test_logprobs.py \
  tests/test_losses.py tests/test_version_dir.py tests/test_sampling.py
[[ " $PARTS " == *" round "* ]] && run round 120 python3 -m bench.learner round --items 24
[[ " $PARTS " == *" vstrl "* ]] && run vstrl 90 python3 -m bench.learner --vs-trl --repeats 5
[[ " $PARTS " == *" sampling "* ]] && run sampling 90 python3 -m bench.sampling --model prefloop-data/models/smollm2 \
  --items 8 --k 4 --repeats 1
true
