#!/usr/bin/env bash
# The README main job: set up, then train and validate an isomix model on real images, on a laptop CPU.
#
#   bash main_job.sh              # CIFAR-10 subset from ../shared/data (no network needed for the data)
#   bash main_job.sh DATA_DIR     # your ImageFolder: DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*
#
# Environment overrides: OUT (output/main_job), MODEL (isomix_iso_64_8_p2), IMG_SIZE (32), EPOCHS (3), BATCH (64),
# TRAIN_PER_CLASS / VAL_PER_CLASS (250 / 100, the CIFAR-10 subset), PYTHON (python3, to create .venv).
#
# Why CIFAR-10 by default: it is real natural-image data that ships offline in ../shared/data, and at
# 32 px the paper's isometric model sees ~10k images in a few CPU minutes, enough to learn well above
# chance. Imagenette-128 (real ImageNet photos) is the better ImageNet stand-in, but a ResNet at 128 px
# would see less than one epoch in that time; use it with hparams/isomix_resnet18_imagenette128.yaml.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-isomix_iso_64_8_p2}
IMG_SIZE=${IMG_SIZE:-32}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-64}
OUT=${OUT:-output/main_job}
RUN=run-$(date +%Y%m%d-%H%M%S)

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv and installing timm-isomix"
    "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e .
elif ! .venv/bin/python -c "import timm_isomix, matplotlib" 2>/dev/null; then
    echo "== installing timm-isomix into the existing .venv"
    .venv/bin/python -m pip install -q -e .
fi
PY=.venv/bin/python

if [ $# -ge 1 ]; then
    DATA=$1
    [ -d "$DATA" ] || { echo "main_job.sh: error: dataset folder not found: $DATA" >&2; exit 2; }
    NORM_ARGS=()
else
    # A class-balanced subset of the real CIFAR-10 (symlinks, made once), so the run takes minutes.
    DATA=$("$PY" - "${TRAIN_PER_CLASS:-250}" "${VAL_PER_CLASS:-100}" <<'PYEOF'
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

echo "== training $MODEL on $DATA ($EPOCHS epochs, ${IMG_SIZE} px) into $OUT/$RUN"
"$PY" train.py --data-dir "$DATA" --model "$MODEL" --img-size "$IMG_SIZE" --crop-pct 1.0 "${NORM_ARGS[@]}" \
    --epochs "$EPOCHS" --warmup-epochs 0 -b "$BATCH" --opt adamw --lr 3e-3 --weight-decay 0.05 \
    --mixture-lr-mult 10 --sched cosine --scale 0.6 1.0 --smoothing 0.1 -j 2 --device cpu \
    --log-interval 20 --checkpoint-hist 2 --output "$OUT" --experiment "$RUN"

echo "== validating $OUT/$RUN/model_best.pth.tar"
"$PY" validate.py --checkpoint "$OUT/$RUN/model_best.pth.tar" --data-dir "$DATA" -b 128 -j 2 --device cpu \
    --results-file "$OUT/$RUN/validation.json"

"$PY" - "$OUT/$RUN" <<'PYEOF'
import json, os, sys
run = sys.argv[1]
row = json.load(open(os.path.join(run, 'validation.json')))[0]
print(f"main job: {row['model']} top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}% "
      f"on {row['samples']} validation images")
print(f"mixture heatmap: {os.path.abspath(os.path.join(run, 'mixtures.png'))}")
PYEOF
