#!/usr/bin/env bash
# The decisive studies at full size on one GPU, then the benchmark's GPU mode and a short torchrun of the
# ImageNet recipe: result files and reports as on the CPU (docs/scale.md says what each stage costs).
#
#   experiments/gpu.sh DATA_DIR            the 8-minute plan on one H100-class GPU
#   experiments/gpu.sh DATA_DIR --full     the four studies at full size, every configuration, 3 seeds (about an hour)
#   experiments/gpu.sh DATA_DIR --smoke    every stage at a tiny size on the CPU (gloo instead of NCCL), in minutes
#   experiments/gpu.sh DATA_DIR [--full] --plan   only the plan and its estimate (any machine), then stop
#
# DATA_DIR holds cifar10, miniimagenet32, mnist, usps, mnistm and imagenette128, each as NAME.tar.gz or as an
# unpacked NAME/{train,val}/<class>/ folder. Nothing is downloaded: the machine may be offline.
# Environment: PYTHON (default python3); WHEELS, a folder of wheels installed first (--no-deps --no-index), for a
# version the machine's own must not stand in for; ISOMIX_RESULTS and ISOMIX_STATE, where result files and run
# state (caches, checkpoints) go (default experiments/results and output/experiments); TFLOPS, the sustained
# throughput the estimate assumes (150 with bf16 autocast, 90 without); BUDGET, seconds the study stages may run in the 8-minute plan (300):
# runs still going then are stopped, keep their last epoch's state and resume on the next call (or --full).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

usage() { echo "usage: experiments/gpu.sh DATA_DIR [--full | --smoke] [--plan]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DATA_DIR=$1; shift
MODE=fast
PLAN_ONLY=0
for arg in "$@"; do
    case $arg in
        --full) MODE=full ;;
        --smoke) MODE=smoke ;;
        --plan) PLAN_ONLY=1 ;;
        *) echo "gpu.sh: error: unknown option $arg; expected --full, --smoke or --plan" >&2; usage ;;
    esac
done
[ -d "$DATA_DIR" ] || { echo "gpu.sh: error: DATA_DIR $DATA_DIR is not a folder (it holds the datasets' .tar.gz or folders)" >&2; exit 2; }
export ISOMIX_DATA=$(cd "$DATA_DIR" && pwd)
RESULTS=${ISOMIX_RESULTS:-$ROOT/experiments/results}
STATE=${ISOMIX_STATE:-$ROOT/output/experiments}
export ISOMIX_RESULTS=$RESULTS ISOMIX_STATE=$STATE
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# ---- install: the package from this checkout without dependencies (the machine's torch, torchvision, timm stay)
if [ -n "${WHEELS:-}" ]; then
    echo "== installing the wheels in $WHEELS (--no-deps --no-index)"
    "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
fi
# INSTALL=0 leaves the interpreter's packages as they are (tests: the checkout runs from its root)
installed=$ROOT
[ "${INSTALL:-1}" = 0 ] || installed=$(cd / && "$PY" -c 'import os, timm_isomix; print(os.path.dirname(os.path.dirname(os.path.realpath(timm_isomix.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$ROOT" ]; then
    echo "== pip install --no-deps -e . (no build isolation: offline)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "gpu.sh: warning: the editable install failed; running from the checkout (its root is on the path)"
fi
"$PY" - "$MODE" "$PLAN_ONLY" <<'PYEOF' || exit 2
import re
import sys
import torch, torchvision, timm
from importlib.metadata import version
mode, plan_only = sys.argv[1], sys.argv[2] == '1'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, '
      f'CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}')
if tuple(int(p) for p in re.findall(r'\d+', timm.__version__)[:3]) < (1, 0, 31):
    sys.exit(f'gpu.sh: error: timm {timm.__version__} is older than 1.0.31: bring its wheel '
             f'(pip download timm --no-deps -d wheels) and set WHEELS=wheels')
if mode != 'smoke' and not plan_only and not torch.cuda.is_available():
    sys.exit('gpu.sh: error: CUDA is not available on this machine; --smoke runs every stage on the CPU')
try:
    import matplotlib  # noqa: F401
except ImportError:
    print('gpu.sh: warning: no matplotlib: the runs write their result files, the reports (with figures) need it')
PYEOF

# ---- precision of the studies' in-memory loop (timm_isomix.tasks.fit): channels_last, and bf16 autocast when an
# isomix model trains under it here (a soft mixture's forward and backward); otherwise float32, said in the plan
export ISOMIX_CHANNELS_LAST=1
if "$PY" -c '
import torch, timm
import timm_isomix.models
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = timm.create_model("isomix_iso_64_8_p2", num_classes=10, width=16).to(dev)
with torch.autocast(dev, dtype=torch.bfloat16):
    loss = m(torch.randn(2, 3, 32, 32, device=dev)).float().sum()
loss.backward()' 2>/dev/null; then
    export ISOMIX_AMP=bfloat16
    PRECISION="bf16 autocast, channels_last"
    TFLOPS=${TFLOPS:-150}
else
    unset ISOMIX_AMP
    PRECISION="float32 (isomix models do not train under autocast in this version), channels_last"
    TFLOPS=${TFLOPS:-90}  # TF32 convolutions: about 0.6 of the bf16 rate
fi

# ---- the plan: STUDY:PRESET:CONFIGS:SEEDS stages (experiments/gpu_plan.py), the flags each runs with
REUSE=reuse1,reuse2,unshared-depth8
MULTI=isomix,shared_trunk,model_patch,independent
TRANSFER=mixture,patch,linear,full
case $MODE in
    fast)
        STAGES=("reuse-cifar10:full:$REUSE:0" "reuse-miniimagenet32:full:$REUSE:0"
                "multitask-digits-cifar10:full:$MULTI:0" "transfer-mnistm:full:$TRANSFER:0")
        FLAGS=("" "" "--epochs 4" "--epochs 2")
        BENCH=(--reps 3 --compile none)
        TRAIN=(--epochs 2 --warmup-epochs 1 -b 64 --img-size 128 --workers 8)
        PER_CLASS=(100 50)
        BUDGET=${BUDGET:-300} ;;
    full)
        STAGES=("reuse-cifar10:full:*:0,1,2" "reuse-miniimagenet32:full:*:0,1,2"
                "multitask-digits-cifar10:full:*:0,1,2" "transfer-mnistm:full:*:0,1,2")
        FLAGS=("" "" "" "")
        BENCH=(--reps 5 --compile main)
        TRAIN=(--epochs 5 --warmup-epochs 1 -b 128 --img-size 128 --workers 8)
        PER_CLASS=(400 100)
        BUDGET=${BUDGET:-0} ;;
    smoke)
        TINY="--epochs 1 --train-limit 64 --val-limit 32 --batch-size 16 --width-mult 0.125"
        STAGES=("reuse-cifar10:full:$REUSE:0" "reuse-miniimagenet32:full:reuse1:0"
                "multitask-digits-cifar10:full:isomix,independent:0" "transfer-mnistm:full:mixture,linear:0")
        FLAGS=("$TINY" "$TINY" "$TINY" "$TINY")
        BENCH=(--device cpu --suite tiny --batch-size 2 --img-size 32 --reps 1 --warmup 1 --train-steps 1
               --infer-steps 1 --compile none --no-memory --no-profile)
        TRAIN=(--device cpu --dist-backend gloo --amp-dtype bfloat16 --epochs 1 --warmup-epochs 0 -b 4
               --img-size 32 --workers 0)
        PER_CLASS=(4 2)
        BUDGET=${BUDGET:-0} ;;
esac
RUN=$RESULTS/gpu-run/$MODE
mkdir -p "$RUN" "$STATE"
SPECS=()
for i in "${!STAGES[@]}"; do SPECS+=("${STAGES[$i]}${FLAGS[$i]:++${FLAGS[$i]}}"); done
[ "$MODE" = smoke ] && BENCH_JSON=$RESULTS/benchmark-cpu-smoke.json || BENCH_JSON=$RESULTS/benchmark-gpu.json

echo "== plan ($MODE): results in $RESULTS, state in $STATE"
echo "  1. data: unpack and decode every dataset the studies read, once, a process per study (about 40 s on 16 cores)"
echo "  2. benchmark, alone on the device: python -m timm_isomix.tools.benchmark ${BENCH[*]} (about 90 s; 4 min with compile)"
echo "  3. at once, one process per run ($PRECISION), and torchrun beside them:"
for spec in "${SPECS[@]}"; do echo "     $spec"; done
echo "     torchrun --nproc_per_node=1 train.py -c hparams/isomix_resnet50_in1k.yaml --aug-repeats 0 ${TRAIN[*]} (about 45 s)"
[ "$BUDGET" -gt 0 ] && echo "     stopped after $BUDGET s; an unfinished run resumes from its last epoch on the next call"
echo "  4. reports: python -m experiments report / experiments.task_report at each stage's scale"
echo "== estimate (training FLOPs of each stage from its models' MACs, at an assumed $TFLOPS TFLOP/s):"
if [ "$PLAN_ONLY" = 1 ]; then
    "$PY" -m experiments.gpu_plan plan --tflops "$TFLOPS" --json "$RUN/plan.json" "${SPECS[@]}"
    exit 0
fi
PREP=()
if [ "$(nproc)" -gt 4 ]; then  # one process per stage: the datasets decode in parallel
    for spec in "${SPECS[@]}"; do
        "$PY" -m experiments.gpu_plan prepare "$spec" > "$RUN/prepare-${spec%%:*}.log" 2>&1 & PREP+=($!)
    done
else  # a few cores: one process, no imports in parallel
    "$PY" -m experiments.gpu_plan prepare "${SPECS[@]}" > "$RUN/prepare-all.log" 2>&1 & PREP+=($!)
fi
for pid in "${PREP[@]}"; do wait "$pid" || { echo "gpu.sh: error: preparing the data failed (logs: $RUN/prepare-*.log)" >&2; exit 1; }; done
"$PY" -m experiments.gpu_plan plan --tflops "$TFLOPS" --json "$RUN/plan.json" "${SPECS[@]}"
echo "  (data ready and plan made after $(elapsed) s)"

# ---- 2. the benchmark's GPU mode, alone, so that no training run shares the device while it times
t=$(date +%s)
rc_bench=0
"$PY" -m timm_isomix.tools.benchmark "${BENCH[@]}" --json "$BENCH_JSON" > "$RUN/benchmark.log" 2>&1 || rc_bench=$?
tail -n 8 "$RUN/benchmark.log"
bench_s=$(( $(date +%s) - t ))
echo "== benchmark: exit $rc_bench, $bench_s s -> $BENCH_JSON"

# ---- 3. the studies (each run its own process) and the ImageNet recipe's short torchrun, at once
SMALL=$STATE/gpu-imagefolder
"$PY" - "$SMALL" "${PER_CLASS[@]}" <<'PYEOF'
import os, sys
from timm_isomix.train.datasets import prepare_dataset
dest, per_class = sys.argv[1], {'train': int(sys.argv[2]), 'val': int(sys.argv[3])}
src = prepare_dataset('imagenette128')
for split, n in per_class.items():
    for c in sorted(os.listdir(src / split)):
        os.makedirs(os.path.join(dest, split, c), exist_ok=True)
        for f in sorted(os.listdir(src / split / c))[:n]:
            link = os.path.join(dest, split, c, f)
            if not os.path.lexists(link):
                os.symlink(src / split / c / f, link)
PYEOF
limit() { if [ "$BUDGET" -gt 0 ]; then timeout --signal=TERM --kill-after=20 "$BUDGET" "$@"; else "$@"; fi; }
PIDS=(); NAMES=(); LOGS=()
launch() {  # name log command...
    local name=$1 log=$2; shift 2
    ( limit "$@" > "$log" 2>&1 ) &
    PIDS+=($!); NAMES+=("$name"); LOGS+=("$log")
}
t=$(date +%s)
for i in "${!STAGES[@]}"; do
    IFS=: read -r study preset configs seeds <<< "${STAGES[$i]}"
    [ "$configs" = "*" ] && cfg=() || cfg=(--configs ${configs//,/ })
    runs=$(( ${#cfg[@]} > 0 ? ${#cfg[@]} - 1 : 9 ))
    nseeds=$(( $(tr -cd , <<< "$seeds" | wc -c) + 1 ))
    # every run of the 8-minute plan at once (14 processes); --full at most 4 per study (GPU memory)
    # (the smoke test runs the first study's runs as parallel processes, the others in their stage's process)
    jobs=$(( runs * nseeds )); [ "$MODE" = full ] && [ $jobs -gt 4 ] && jobs=4
    [ "$MODE" = smoke ] && { [ "$i" -eq 0 ] && jobs=2 || jobs=1; }
    # shellcheck disable=SC2086  # the stage's flags are words
    launch "$study" "$RUN/$study.log" "$PY" -m experiments run "$study" --preset "$preset" "${cfg[@]}" \
        --seeds ${seeds//,/ } --jobs "$jobs" --threads 1 ${FLAGS[$i]}
done
rm -rf "$STATE/train/gpu-in1k-recipe-$MODE"  # train.py would write a rerun beside it under another name
# torchrun, as `python -m torch.distributed.run` (the same program) so that it is the chosen interpreter's. One
# process is not distributed to timm (WORLD_SIZE 1), and its loader takes the recipe's repeated augmentation only
# when distributed: --aug-repeats 0 here, the rest of the recipe as written (AMP, channels_last, LAMB, BCE, mixup).
launch torchrun "$RUN/torchrun.log" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    -c hparams/isomix_resnet50_in1k.yaml --data-dir "$SMALL" --num-classes 10 --val-split val --aug-repeats 0 \
    --output "$STATE/train" --experiment "gpu-in1k-recipe-$MODE" "${TRAIN[@]}"
RCS=()
for i in "${!PIDS[@]}"; do
    rc=0; wait "${PIDS[$i]}" || rc=$?
    RCS+=("$rc")
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== ${NAMES[$i]}: stopped at the budget ($BUDGET s); its unfinished runs resume on the next call"
    else
        echo "== ${NAMES[$i]}: exit $rc after $(( $(date +%s) - t )) s (log ${LOGS[$i]})"
        [ "$rc" -eq 0 ] || tail -n 5 "${LOGS[$i]}"
    fi
done
runs_s=$(( $(date +%s) - t ))
summary=$STATE/train/gpu-in1k-recipe-$MODE/summary.csv
if [ -f "$summary" ]; then
    mkdir -p "$RESULTS/timm-train-py"
    cp "$summary" "$RESULTS/timm-train-py/gpu-in1k-recipe-$MODE-summary.csv"
fi

# ---- 4. reports at each stage's scale (report.md, report.json, figures; sharing.md for the task studies)
"$PY" -m experiments.gpu_plan scales "${SPECS[@]}" | while read -r study scale kind; do
    "$PY" -m experiments report "$study" --scale "$scale" > /dev/null 2>> "$RUN/reports.log" \
        || echo "  $study [$scale]: no report ($(tail -n 1 "$RUN/reports.log"))"
    if [ "$kind" = task ]; then
        "$PY" -m experiments.task_report "$study" --scale "$scale" > /dev/null 2>> "$RUN/reports.log" || true
    fi
    echo "  $study [$scale]: $RESULTS/$study/$scale/report.md"
done

"$PY" - "$RUN" "$MODE" "$(elapsed)" "$bench_s" "$rc_bench" "$runs_s" "$BUDGET" "${NAMES[*]}" "${RCS[*]}" <<'PYEOF'
import json, os, sys, time
import torch
run, mode, total, bench_s, rc_bench, runs_s, budget, names, rcs = sys.argv[1:10]
plan = json.load(open(f'{run}/plan.json'))
record = {'mode': mode, 'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'wall_s': int(total),
          'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__,
          'benchmark': {'seconds': int(bench_s), 'exit': int(rc_bench)}, 'runs_wall_s': int(runs_s),
          'budget_s': int(budget), 'stages': dict(zip(names.split(), map(int, rcs.split()))),
          'estimate': {'tflops': plan['tflops'], 'study_seconds': round(plan['seconds'])},
          'precision': {'amp': os.environ.get('ISOMIX_AMP'), 'channels_last': os.environ.get('ISOMIX_CHANNELS_LAST') == '1'}}
json.dump(record, open(f'{run}/run.json', 'w'), indent=1)
print(f'== {mode}: {total} s in all (benchmark {bench_s} s, runs {runs_s} s; the estimate for the studies was '
      f'{plan["seconds"]:.0f} s at {plan["tflops"]:g} TFLOP/s); {run}/run.json')
PYEOF
for rc in "${RCS[@]}" "$rc_bench"; do  # a stage stopped at the budget is not a failure
    [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || exit 1
done
