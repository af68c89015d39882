#!/bin/bash
# The GPU check, as one short script for a lent GPU machine that reaches no registry (docs/benchmarks.md, "On a
# GPU"): the CUDA paths of the tests, then GPU figures, then the app itself. Prints what it measures; each part has
# its own time limit.
#
# Prepare here (x86-64, Python 3.12 on the GPU machine), in an ignored folder .gpu/ of the checkout:
#   .gpu/whl/      wheels of what the machine lacks, fetched with `pip download --no-deps --only-binary=:all:
#                  --python-version 3.12 --platform manylinux_2_28_x86_64 ...`: duckdb, trl, datasets, dill,
#                  multiprocess, and this project's transformers with what it needs (kernels, huggingface_hub, httpx2,
#                  httpcore2, click, hf-xet, tomlkit, truststore) where the machine's is older than pyproject allows
#   .gpu/app-whl/  for the parts "serving" and "api" (the app: gradio and the web stack): gradio, gradio-client,
#                  fastapi, fastapi-offline, starlette, uvicorn, pydantic, pydantic-core, annotated-types,
#                  typing-inspection, orjson, python-multipart, safehttpx, semantic-version, groovy, hf-gradio,
#                  brotli, pydub, pytz, tzdata, nh3, gguf, opentelemetry-api (38 MB: with .gpu/whl over one call's
#                  64 MiB, so it travels in a call of its own, below)
#   .gpu/smollm2/  prefloop-data/models/smollm2 without model.safetensors (the 98 MB GGUF does not travel: the
#                  benchmarks run SmolLM2's shapes with random weights, bench/gpu/random_model.py)
# then run `PARTS="cuda worker learner round vstrl sampling steps" bash bench/gpu/check.sh` there with $OUT set, carrying .gpu.
# The app's parts take two calls back to back (a warm machine keeps /tmp/site for 30 s between calls):
#   1. carry [".gpu/whl", ".gpu/smollm2"]:     PARTS="cuda steps" bash bench/gpu/check.sh       (<= 5.5 min)
#   2. at once, carry [".gpu/app-whl", ".gpu/smollm2"]: PARTS=serving bash bench/gpu/check.sh (<= 5.5 min)
#   3. the same carry, if device time is left: PARTS=api bash bench/gpu/check.sh                  (<= 3.5 min)
# (15 device minutes a session, a machine's start included: "cuda" checks the fixed GPU round, tests/test_cuda.py.)
# The machine goes back 30 s after a call ends, and a cold one has lost /tmp/site: on 2026-12-04 a PARTS=install
# call (3 s) was followed by a cold machine; a call that ran minutes was followed by a warm one. Call 2 checks the
# imports first and says so in 5 s when the wheels are missing.
# Here, without a GPU, the same parts run on the CPU with this checkout's environment:
#   PY=.venv/bin/python SKIP_INSTALL=1 PARTS="serving api" SERVING_ARGS="..." API_ITEMS=4 bash bench/gpu/check.sh
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
if [[ -z "$SKIP_INSTALL" ]]; then
  for d in .gpu/app-whl .gpu/whl; do  # what a call carries; /tmp/site keeps what an earlier call installed
    [[ -d $d ]] && { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $d/*.whl || exit 1; }
  done
fi
[[ "$PARTS" == "install" ]] && { echo "installed into /tmp/site: $(ls /tmp/site | wc -l) entries"; exit 0; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
$PY -c "import sys, torch, transformers, peft, accelerate, duckdb; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
$PY bench/gpu/random_model.py .gpu/smollm2 prefloop-data/models/smollm2 2>&1 | tail -1
export PREFLOOP_TEST_TOKENIZER=$PWD/.gpu/smollm2
run() { local name=$1 limit=$2; shift 2; local t0=$(date +%s); timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - t0 )) s"  # the log's end: pytest's -rfE summary, or a bench's rows
  grep -v "^\s*$" "$OUT/$name.log" | grep -v "Warning\|warnings.warn\|Loading weights" | tail -25; }
# A per-test timeout well inside each part's, so that a stuck test still leaves pytest's summary in the log.
PT="$PY -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning --durations=5 --timeout 40 -rfE"
# 2026-12-04: the two files together ran 11 of their 15 tests in 150 s, so each has a part of its own.
[[ " $PARTS " == *" cuda "* ]] && run cuda 200 $PT tests/test_cuda.py
[[ " $PARTS " == *" worker "* ]] && run worker 150 $PT tests/test_generation_worker.py
[[ " $PARTS " == *" learner "* ]] && run learner 150 $PT -n 6 tests/test_round.py tests/test_reference_and_kl.py \
  tests/test_merged_sampling.py tests/test_model_families.py tests/test_reward.py tests/test_logprobs.py \
  tests/test_losses.py tests/test_version_dir.py tests/test_sampling.py
[[ " $PARTS " == *" round "* ]] && run round 120 $PY -m bench.learner round --items 24
[[ " $PARTS " == *" vstrl "* ]] && run vstrl 90 $PY -m bench.learner --vs-trl --repeats 5
[[ " $PARTS " == *" sampling "* ]] && run sampling 90 $PY -m bench.sampling --model prefloop-data/models/smollm2 \
  --items 8 --k 4 --repeats 1
# The app on the GPU: `prefloop serve` in its own process (its policy worker on CUDA), simulated annotators idle,
# during a Demo chat and during a training round (bench.serving); then POST /api/train to the new version's first item.
# Where a step's time goes (forward vs sampling, host vs device, cuDNN attention on and off): bench/steps.py.
[[ " $PARTS " == *" steps "* ]] && run steps 120 $PY -m bench.steps --items 1,8 --sdpa default,no-cudnn
# The app's parts need both folders' wheels in /tmp/site; a call that finds the machine cold has lost the other's.
if [[ " $PARTS " == *" serving "* || " $PARTS " == *" api "* ]] && ! $PY -c "import uvicorn, gradio, duckdb" 2>/dev/null
then echo "the app's wheels are not all in /tmp/site (the machine was not warm: it keeps /tmp/site 30 s): rerun" \
  "this call at once after one that installed the other folder"; exit 1; fi
[[ " $PARTS " == *" serving "* ]] && run serving 300 $PY -m bench.serving --part all \
  ${SERVING_ARGS:---repeats 1 --annotators 8 --seconds 40 --warmup 20}
[[ " $PARTS " == *" api "* ]] && run api 200 $PY -m bench.learner api --items ${API_ITEMS:-24}
true
