#!/usr/bin/env bash
# Every GPU check and benchmark the open issues (21, 23, 24, 25) wait for, in stages that each fit one
# device call (< 10 min). Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_session.sh STAGE [STAGE ...]   # stages: env priority tests tests-all tests-models trees trees-again models hybrid-quick calibrate
#                                                   model-trees hybrid-fast
#
# A session has 30 min of device time: in order of what the issues' done-when need, env+tests, tests-models (21),
# models (24, 25), trees (23), calibrate (23), model-trees (24, 25 stretch), hybrid-fast (24).
#
# Results land under $OUT/<stage>/ (logs, JUnit XML, each benchmark's JSON). Missing packages
# (cudnn-frontend, datasets, TRL, fla) travel as wheels in .whl/ (git-ignored; fetch them here with
# `bash scripts/gpu_wheels.sh`) and are installed into /tmp/site with --no-deps; torch, transformers
# and Triton stay the image's. Every step runs under its own timeout, so one hung benchmark cannot eat
# the call; a failing step is logged and the next one runs; the exit status is non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:=/tmp/packmask-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=()
# DEADLINE (seconds from the start, e.g. 560 inside a 600 s device call): a step's limit is cut to what is
# left, a step with under 30 s left is skipped and reported, and the results are always packed at the end
: "${DEADLINE:=100000}"
# the image carries pytest-xdist and pytest-timeout: cuda tests spread over workers (compiles are CPU-bound),
# and one hung test fails alone instead of eating the step and its JUnit report
pytest_fast=()
python3 -c 'import xdist, pytest_timeout' 2>/dev/null && pytest_fast=(-n "${WORKERS:-8}" --timeout 240)

step() {  # step STAGE NAME SECONDS COMMAND... : run with a timeout, log to $OUT/STAGE/NAME.log
    local stage=$1 name=$2 limit=$3; shift 3
    mkdir -p "$OUT/$stage"
    local left=$((DEADLINE - SECONDS - 10))
    if [ "$left" -lt 30 ]; then
        echo "== $stage/$name skipped: ${left}s left before DEADLINE"; failed+=("$stage/$name (skipped: no time)"); return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    echo "== $stage/$name (limit ${limit}s): $*"
    OUT="$OUT/$stage" timeout "$limit" "$@" > "$OUT/$stage/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"; tail -n 25 "$OUT/$stage/$name.log"
    [ "$rc" -eq 0 ] || failed+=("$stage/$name (exit $rc)")
}

for stage in "$@"; do
    case "$stage" in
    env)  # what ran where: the closing note quotes this
        step env versions 120 python3 -c 'import torch, transformers, triton, importlib.util as u
print("torch", torch.__version__, "| transformers", transformers.__version__, "| triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "| cudnn", torch.backends.cudnn.version())
for m in ("cudnn", "datasets", "trl", "fla"): print(m, "importable" if u.find_spec(m) else "absent")' ;;
    tests)  # issue 21: every cuda-marked test on one GPU (kernels and data here, models in tests-models); the
        # counts of both go into the closing note
        step tests cuda 560 python3 -m pytest -q -p no:cacheprovider -m cuda -rs "${pytest_fast[@]}" \
            --junitxml="$OUT/tests/cuda.xml" tests/backends tests/core tests/data tests/distributed tests/trl ;;
    tests-all)  # both of the above in one pytest run (needs the image's pytest-xdist to fit one call)
        step tests cuda-all 180 python3 -m pytest -q -p no:cacheprovider -m cuda -rs "${pytest_fast[@]}" \
            --junitxml="$OUT/tests/cuda-all.xml" tests ;;
    tests-models)  # the cuda-marked tests of hybrid and vision-language models
        step tests-models cuda 560 python3 -m pytest -q -p no:cacheprovider -m cuda -rs "${pytest_fast[@]}" \
            --junitxml="$OUT/tests-models/cuda.xml" tests/multimodal tests/recurrent tests/models tests/cli ;;
    priority)  # one call (~560 s) with what the last session could not measure, most needed first: every cuda
        # test (the decode route's are new), the recurrent price by mixer kind and the call cap (24), agentic trees
        # on 16k rows and draft trees with auto's new choices (23)
        step priority cuda-all 180 python3 -m pytest -q -p no:cacheprovider -m cuda -rs "${pytest_fast[@]}" \
            --junitxml="$OUT/priority/cuda-all.xml" tests
        step priority hybrid_sft 150 python3 benchmarks/hybrid.py --model all --dist sft --rows 1 --steps 2 \
            --methods packmask,contaminated --out "$OUT/priority/hybrid_sft"
        step priority agentic_16k 100 python3 benchmarks/preference.py --steps 2 --cases agentic --tree-row 16384 \
            --out "$OUT/priority/agentic_16k"
        step priority spec_decode 90 env ITERS=10 python3 benchmarks/spec_decode.py ;;
    trees)  # issue 23: what the H200 run of 2026-12-05 left unmeasured (GRPO, agentic, tree steps, kernels alone)
        step trees preference_grpo 230 python3 benchmarks/preference.py --steps 3 --cases grpo,agentic --out "$OUT/trees/grpo"
        # agentic trees (~5k tokens a group) fill 8192-token rows to 0.65: 16384-token tree rows (same slots a step)
        step trees preference_agentic_16k 150 python3 benchmarks/preference.py --steps 3 --cases agentic --tree-row 16384 \
            --out "$OUT/trees/agentic_16k"
        step trees tree_attention 110 env STEPS=4 python3 benchmarks/tree_attention.py
        step trees tree_kernels 130 env HEAD_DIMS=64,128 python3 benchmarks/tree_kernels.py ;;
    trees-again)  # issue 23: draft trees and DPO (measured 2026-12-05; again after a change to auto or the cost table)
        step trees-again spec_decode 100 env ITERS=10 python3 benchmarks/spec_decode.py
        step trees-again preference_dpo 150 python3 benchmarks/preference.py --steps 3 --cases ultrafeedback,long_prompt \
            --out "$OUT/trees-again/dpo" ;;
    hybrid-quick)  # issue 24's table in one short step: one 8192-token row, 2 warm steps, each method printed as it
        # ends; HYBRID_MODEL (qwen35, nemotron_h or all) and HYBRID_DIST (sft or long) pick the part
        step models "hybrid_${HYBRID_MODEL:-all}_${HYBRID_DIST:-sft}" "${HYBRID_LIMIT:-200}" python3 benchmarks/hybrid.py \
            --model "${HYBRID_MODEL:-all}" --dist "${HYBRID_DIST:-sft}" --rows 1 --steps 2 \
            --out "$OUT/models/${HYBRID_MODEL:-all}_${HYBRID_DIST:-sft}" ;;
    models)  # issues 24 and 25: hybrids (both length distributions) and the Qwen2.5-VL-shaped VLM
        step models hybrid_sft 180 python3 benchmarks/hybrid.py --model all --dist sft --steps 3 --out "$OUT/models/sft"
        step models hybrid_long 150 python3 benchmarks/hybrid.py --model all --dist long --steps 3 --out "$OUT/models/long"
        step models vlm 200 python3 benchmarks/vlm.py --steps 4 ;;
    model-trees)  # shared-prefix trees on hybrids (issue 24, item 5) and on VLMs (issue 25, stretch)
        step model-trees hybrid_tree_dpo 150 python3 benchmarks/hybrid_tree.py --model all --shape dpo --steps 3 --out "$OUT/model-trees/dpo"
        step model-trees hybrid_tree_grpo 150 python3 benchmarks/hybrid_tree.py --model all --shape grpo --steps 3 --out "$OUT/model-trees/grpo"
        step model-trees vlm_preference 150 python3 benchmarks/vlm_preference.py --steps 4
        step model-trees vlm_grpo 200 python3 benchmarks/vlm_preference.py --group 8 --steps 4 ;;
    hybrid-fast)  # issue 24: the varlen fast path. fla-core takes cu_seqlens; the per-instance kernel functions
        # it swaps need transformers >= 5.25 with kernels >= 0.19.1 (the image has 5.17), both carried in
        # .whl/fast; fla apart in .whl/fla, since once importable transformers routes every method to it
        # a missing or broken wheel folder is a failed step (the steps below would then test the image's versions)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fast .whl/fast/*.whl \
            || failed+=("hybrid-fast/install .whl/fast")
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fla .whl/fla/*.whl \
            || failed+=("hybrid-fast/install .whl/fla")
        fast="/tmp/site-fast:$PYTHONPATH" fla="/tmp/site-fast:/tmp/site-fla:$PYTHONPATH"
        step hybrid-fast cuda 200 env PYTHONPATH="$fla" python3 -m pytest -q -p no:cacheprovider -m cuda -rs \
            tests/recurrent/test_recurrent_varlen_cuda.py --junitxml="$OUT/hybrid-fast/cuda.xml"
        step hybrid-fast fwd 150 env PYTHONPATH="$fla" python3 benchmarks/hybrid.py --model all --dist sft --pass fwd \
            --steps 3 --out "$OUT/hybrid-fast/fwd"
        step hybrid-fast fwdbwd 180 env PYTHONPATH="$fast" python3 benchmarks/hybrid.py --model all --dist sft --steps 3 \
            --out "$OUT/hybrid-fast/fwdbwd" ;;
    calibrate)  # issue 23: the H200 cost table the dispatcher's `auto` reads, then auto against forced
        step calibrate table 420 python3 -m packmask.backends.calibrate --out "$OUT/calibrate/kernel_costs.json"
        step calibrate train_step 150 python3 benchmarks/train_step.py --dist sft --steps 4 --out "$OUT/calibrate" ;;
    *) echo "unknown stage $stage (env priority tests tests-all tests-models trees trees-again models hybrid-quick calibrate model-trees hybrid-fast)"; exit 2 ;;
    esac
done

# the device returns at most 8 files from $OUT: everything travels back as one archive (logs, JUnit, JSON)
archive="results-$(IFS=-; echo "$*").tgz"
tar czf "/tmp/$archive" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "/tmp/$archive" "$OUT/$archive" \
    && echo "packed: \$OUT/$archive"

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all steps passed"
