#!/usr/bin/env bash
# The README main job: set up, then train and validate two isomix models on real images, on a laptop CPU,
# and show what is particular to the method:
#   A: one bank of 4 templates run by 8 executed layers whose mixtures start near uniform and are learned;
#   B: the same bank (the same parameters) run once per template (4 layers), trained in the same job.
# It prints both accuracies, and how A's mixtures moved from where they started (entropy, leading templates),
# and writes A's mixture heatmap.
#
#   bash main_job.sh              # CIFAR-10 subset from ../shared/data (no network needed for the data)
#   bash main_job.sh DATA_DIR     # your ImageFolder: DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*
#
# Environment overrides: OUT (output/main_job), IMG_SIZE (32), EPOCHS (6), BATCH (64),
# TRAIN_PER_CLASS / VAL_PER_CLASS (1000 / 200, the CIFAR-10 subset), PYTHON (python3, to create .venv).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=isomix_iso_64_8_p2
IMG_SIZE=${IMG_SIZE:-32}
EPOCHS=${EPOCHS:-6}
BATCH=${BATCH:-64}
OUT=${OUT:-output/main_job}
RUN=run-$(date +%Y%m%d-%H%M%S)

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv and installing timm-isomix"
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[plot]'
elif ! .venv/bin/python -c "import timm_isomix, matplotlib" 2>/dev/null; then
    echo "== installing timm-isomix into the existing .venv"
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[plot]'
fi
PY=.venv/bin/python
# The project's datasets lie in ../shared/data beside the checkout unless ISOMIX_DATA names another folder.
export ISOMIX_DATA=${ISOMIX_DATA:-$(cd .. && pwd)/shared/data}

if [ $# -ge 1 ]; then
    DATA=$1
    [ -d "$DATA" ] || { echo "main_job.sh: error: dataset folder not found: $DATA" >&2; exit 2; }
    NORM_ARGS=()
else
    # A class-balanced subset of the real CIFAR-10 (symlinks, made once), so the run takes minutes.
    DATA=$("$PY" - "${TRAIN_PER_CLASS:-1000}" "${VAL_PER_CLASS:-200}" <<'PYEOF'
import os, sys
from timm_isomix.train.datasets import prepare_dataset
ntrain, nval = int(sys.argv[1]), int(sys.argv[2])
try:
    src = prepare_dataset('cifar10')
except FileNotFoundError as e:
    sys.exit(f'main_job.sh: error: {e}; or pass an ImageFolder: bash main_job.sh DATA_DIR')
dst = src.parent / f'cifar10-main-job-{ntrain}-{nval}'
if not (dst / 'val').is_dir():
    tmp = dst.parent / (dst.name + f'.tmp{os.getpid()}')
    for split, n in (('train', ntrain), ('val', nval)):
        for cls in sorted(os.listdir(src / split)):
            os.makedirs(tmp / split / cls)
            for f in sorted(os.listdir(src / split / cls))[:n]:
                os.symlink(src / split / cls / f, tmp / split / cls / f)
    os.replace(tmp, dst)
print(dst)
PYEOF
)
    NORM_ARGS=(--mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616)
fi

# The trunk of the studies (README, Results): width 64, 4x4 patches (8x8 tokens), K = 4 templates.
COMMON=(--data-dir "$DATA" --model "$MODEL" --img-size "$IMG_SIZE" --crop-pct 1.0 "${NORM_ARGS[@]}"
        --epochs "$EPOCHS" --warmup-epochs 1 -b "$BATCH" --opt adamw --lr 3e-3 --weight-decay 0.05
        --mixture-lr-mult 10 --sched cosine --sched-on-updates --scale 0.6 1.0 --smoothing 0.1 -j 2 --device cpu
        --log-interval 50 --checkpoint-hist 1 --output "$OUT")
mkdir -p "$OUT"
for ARM in reuse2 reuse1; do
    DEPTH=$([ $ARM = reuse2 ] && echo 8 || echo 4)
    echo "== training $MODEL ($ARM: 4 templates, $DEPTH executed layers) on $DATA ($EPOCHS epochs) into $OUT/$RUN-$ARM"
    "$PY" train.py "${COMMON[@]}" --experiment "$RUN-$ARM" \
        --model-kwargs patch_size=4 num_templates=4 depth=$DEPTH mixture_init=random 2>&1 | tee "$OUT/$RUN-$ARM.log"
    echo "== validating $OUT/$RUN-$ARM/last.pth.tar"
    "$PY" validate.py --checkpoint "$OUT/$RUN-$ARM/last.pth.tar" --data-dir "$DATA" --split val -b 128 -j 2 \
        --device cpu --results-file "$OUT/$RUN-$ARM/validation.json"
done

"$PY" - "$OUT/$RUN" <<'PYEOF'
import json, math, re, sys
run = sys.argv[1]
top1 = {arm: json.load(open(f'{run}-{arm}/validation.json'))[0]['top1'] for arm in ('reuse2', 'reuse1')}
mixtures = [re.search(r'Mixtures \(epoch (-?\d+)\) schedule: order \[(.*?)\] entropy \[(.*?)\]', line)
            for line in open(f'{run}-reuse2.log')]
mixtures = [m for m in mixtures if m]
(_, order0, h0), (_, order1, h1) = mixtures[0].groups(), mixtures[-1].groups()
order0, order1 = order0.split(', '), order1.split(', ')
h0, h1 = [float(v) for v in h0.split()], [float(v) for v in h1.split()]
print(f'main job: 4 templates, 8 learned-mixture layers (reuse 2): top-1 {top1["reuse2"]:.2f}%; '
      f'the same parameters at 4 layers (reuse 1): top-1 {top1["reuse1"]:.2f}%')
print(f'mixtures moved: mean entropy {sum(h0) / len(h0):.3f} -> {sum(h1) / len(h1):.3f} nats '
      f'(uniform {math.log(4):.3f}); {sum(a != b for a, b in zip(order0, order1))} of {len(order0)} layers changed '
      f'their leading template; leading templates {order0} -> {order1}')
print(f'mixture heatmap: {run}-reuse2/mixtures.png')
PYEOF
