#!/usr/bin/env bash
# The whole pipeline on the built-in demo data, on CPU: images -> shards -> SMoG pretraining ->
# export to timm -> kNN top-1 of the pretrained backbone next to the same backbone at random init.
#   bash tools/demo.sh [OUT_DIR]        (make demo runs it inside the project's .venv)
# Every stage resumes: a second run reuses the images, the shards and the finished checkpoint.
set -euo pipefail
OUT=${1:-demo_out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1/5 demo images (scikit-learn digits + scikit-image photos, no download) -> $OUT/images"
[ -d "$OUT/images/train" ] || python -m smog_scale.data.synthetic.demo "$OUT/images"

echo "== 2/5 ImageFolder -> WebDataset shards"
smog-make-shards "$OUT/images/train" "$OUT/shards/train" --prefix train --samples-per-shard 40
smog-make-shards "$OUT/images/val" "$OUT/shards/val" --prefix val --samples-per-shard 20 \
  --classes "$OUT/shards/train/classes.txt"

echo "== 3/5 SMoG pretraining (recipes/demo_cpu.yaml) -> $OUT/run"
ACCELERATE_USE_CPU=1 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no "$ROOT/smog_scale/train.py" "$ROOT/recipes/demo_cpu.yaml" \
  "run.output_dir=$OUT/run" "data.train_shards=$OUT/shards/train" \
  "monitor.knn_train_shards=$OUT/shards/train" "monitor.knn_val_shards=$OUT/shards/val"

echo "== 4/5 export the backbone to timm -> $OUT/export"
python "$ROOT/tools/export_timm.py" "$OUT/run" "$OUT/export" --check-size 64

echo "== 5/5 kNN top-1 on the held-out demo images: pretrained vs random init (with its own and with the data's BN statistics)"
for init in pretrained random random_bn; do
  case $init in
    pretrained) flags=() ;;
    random) flags=(--random-init) ;;
    random_bn) flags=(--random-init --bn-batches 5) ;;  # 5 x 64 = all 320 train images
  esac
  python "$ROOT/tools/knn_eval.py" "$OUT/export" ${flags[@]+"${flags[@]}"} --train-shards "$OUT/shards/train" \
    --val-shards "$OUT/shards/val" --image-size 64 --batch-size 64 --workers 2 --out "$OUT/knn_$init.json"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
trained, random, random_bn = (json.load(open(f"{out}/knn_{name}.json"))["knn_top1"]
                              for name in ("pretrained", "random", "random_bn"))
print(f"kNN top-1 on the demo val set: pretrained {trained:.1f}% vs random init {random:.1f}% "
      f"({trained - random:+.1f} points) and random init with the data's BatchNorm statistics {random_bn:.1f}% "
      f"({trained - random_bn:+.1f} points)")
PY
