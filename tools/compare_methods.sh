#!/usr/bin/env bash
# Train every method on the tiny dataset at the same target rate into ONE MLflow experiment, then print a
# top-1 / MACs table (also written to $OUT/table.md; one JSON summary per method in $OUT/summary.jsonl).
#
#   tools/compare_methods.sh [extra Hydra overrides applied to every run]
#
# Environment (defaults): DATA=data/tiny-imagenet  RATE=0.7  EPOCHS=10  USW=2 (RDI-Net warm-up epochs)
#   HELDOUT=0.1 (BoostNet held-out fraction of train)  MODEL=resnet_tiny  IMAGE_SIZE=64  SEED=0
#   METHODS="aig spnet_code rdinet boostnet"  OUT=outputs/compare  EXPERIMENT=compare  SPNET=.venv/bin/spnet
set -euo pipefail
cd "$(dirname "$0")/.."
SPNET=${SPNET:-.venv/bin/spnet}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/tiny-imagenet}
RATE=${RATE:-0.7}
EPOCHS=${EPOCHS:-10}
USW=${USW:-2}
HELDOUT=${HELDOUT:-0.1}
MODEL=${MODEL:-resnet_tiny}
IMAGE_SIZE=${IMAGE_SIZE:-64}
SEED=${SEED:-0}
METHODS=${METHODS:-"aig spnet_code rdinet boostnet"}
OUT=${OUT:-outputs/compare}
EXPERIMENT=${EXPERIMENT:-compare}

test -f "$DATA/tiny_imagenet.json" || "$SPNET" make-tiny-imagenet "$DATA"
mkdir -p "$OUT"
: > "$OUT/summary.jsonl"
for m in $METHODS; do
  case "$m" in
    rdinet) extra=("method.usw_epochs=$USW") ;;
    boostnet) extra=("method.heldout=$HELDOUT") ;;
    *) extra=() ;;
  esac
  rm -rf "$OUT/$m"
  echo "== $m: $EPOCHS epochs, target rate $RATE" >&2
  "$SPNET" train "method=$m" "model=$MODEL" "data.root=$DATA" "data.image_size=$IMAGE_SIZE" \
    "method.target_rate=$RATE" "trainer.epochs=$EPOCHS" "seed=$SEED" resume=none trainer.progress=false \
    "checkpoint.dir=$OUT/$m/checkpoints" "tracking.uri=sqlite:///$OUT/mlflow.db" \
    "tracking.experiment=$EXPERIMENT" "name=$m-t$RATE" "${extra[@]}" "$@" | tail -n 1 >> "$OUT/summary.jsonl"
done

"$PY" - "$OUT" "$MODEL" "$IMAGE_SIZE" "$RATE" "$EXPERIMENT" <<'PY' | tee "$OUT/table.md"
import json, sys
from spnet_dist.models import build_model, cost_table

out, model, size, rate, experiment = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
full = cost_table(build_model(model, {"router": {"type": "none"}}), size).backbone_full
rows = [json.loads(line) for line in open(f"{out}/summary.jsonl") if line.strip()]
print(f"{model} at {size}px, target rate {rate}; plain ResNet = {full / 1e6:.3f} MMACs/image "
      f"(MACs from hard decisions, routers/heads included)\n")
print("| method | top-1 | MMACs/image | vs plain ResNet | exec rate | notes |")
print("|---|---|---|---|---|---|")
for s in rows:
    note = ""
    if s["method"] == "rdinet":
        note = f"skip/light/full {s['skip_rate']:.2f}/{s['light_rate']:.2f}/{s['full_rate']:.2f}"
    if s["method"] == "boostnet":
        ex = ", ".join(f"{e['top1']:.3f}@{e['macs'] / 1e6:.2f}M" for e in s["exits"])
        note = (f"budgeted batch (exit fractions {'/'.join(f'{f:.2f}' for f in s['exit_fractions'])}); "
                f"anytime exits: {ex}")
    print(f"| {s['method']} | {s['top1']:.3f} | {s['macs_per_image'] / 1e6:.3f} | "
          f"{s['macs_per_image'] / full:.3f} | {s['exec_rate']:.3f} | {note} |")
if rows:
    print(f"\nMLflow store {rows[0]['tracking_uri']}, experiment '{experiment}', runs: "
          + ", ".join(f"{s['method']} {s['mlflow_run_id'][:8]}" for s in rows))
PY
