#!/usr/bin/env bash
# The project's GPU check: one script, <= 8 minutes on one H200, run from the repository root.
#
#   tools/gpu_check.sh          # on the device machine (carry .whl, made here by tools/device_wheels.sh)
#   tools/gpu_check.sh --cpu    # the same steps at tiny sizes on the CPU (tests/test_gpu_check.py runs it)
#
# Steps, each time-boxed with `timeout` inside one overall budget (GPU_CHECK_BUDGET_S, default 450 s; a step gets
# at most what is left) and none stopping the others:
#   install      .whl/*.whl into a target folder on PYTHONPATH (skipped when the packages already import)
#   step         tools/bench_step.py side by side in one process: static ResNet-50, ConvNet-AIG, SP-Net at 224 px,
#                batch 256, bf16 autocast (DeepSpeed torch_autocast) + channels_last; and fp32 steps of static,
#                SP-Net and SP-Net with a bf16 teacher (under the bf16 step the teacher is bf16 anyway)
#   train_*      `spnet train` on one GPU (DeepSpeed, nccl, world size 1) with data.backend=torchvision on a
#                generated 224-px JPEG set: one epoch, then resume=auto for a second, then `spnet eval
#                eval.execution=skip`; tracking in a SQLite file in the work folder
#   skip_*       tools/bench_skip.py --device cuda: real skipping at batch 1/64/256, t = 0.3/0.5/0.7 (fp32, bf16)
#   decode       tools/bench_decode.py: nvJPEG batch decode vs CPU decode in 16 DataLoader workers
#   step_compile tools/bench_step.py --compile (static and SP-Net, bf16 + channels_last); last: the slowest
# Then tools/gpu_check_report.py writes $OUT/gpu_check.json (every section and every step's exit code) and
# $OUT/gpu_check.txt (a short table, printed last); $OUT/gpu_check.log holds every step's output.
# OUT defaults to outputs/gpu_check; PYTHON to python3. Exit status: 0 when every step exited 0.
set -uo pipefail  # no -e: a failing step is recorded, the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
[[ ${1:-} == --cpu ]] && MODE=cpu
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/json"
: > "$OUT/gpu_check.log"
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $MODE == gpu ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-450}
  MODEL=(--model resnet50 --image-size 224)
  STEP=(--batch 256 --threads 8 --rounds 8 --warmup 2)
  CLASSES=10
  TINY=(--train-per-class 64 --val-per-class 8 --size 256)
  TRAIN=(model=resnet50 data.image_size=224 data.val_resize=256 data.num_threads=16 trainer.batch_size=64)
  SKIP=(--batches 1 64 256 --repeats 10 --repeats-small 30 --threads 8 --device cuda)
  DECODE=(--images 256 --repeat 16 --batch 64 --workers 16 --rounds 3 --device auto)
  COMPILE=inductor
else
  BUDGET=${GPU_CHECK_BUDGET_S:-300}
  export OMP_NUM_THREADS=1
  MODEL=(--model resnet_tiny --image-size 32)
  STEP=(--batch 2 --threads 1 --rounds 2 --warmup 1)
  CLASSES=4
  TINY=(--train-per-class 8 --val-per-class 2 --size 40)
  TRAIN=(model=resnet_tiny data.image_size=32 data.val_resize=36 data.num_threads=2 trainer.batch_size=4
         trainer.threads=1 data.decode=cpu)
  SKIP=(--model resnet_tiny --image-size 32 --batches 1 4 --repeats 2 --repeats-small 3 --threads 1 --device cpu)
  DECODE=(--images 16 --repeat 2 --batch 4 --workers 2 --rounds 1 --device cpu --cpu-decode-images 16)
  COMPILE=eager  # tracing and the trainer's compile calls only: inductor's C++ build takes minutes on a CPU
fi

record() {  # NAME RC SECONDS LIMIT NOTE -> one JSON line in $WORK/steps.jsonl
  printf '{"name": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "note": "%s"}\n' "$1" "$2" "$3" "$4" "$5" \
    >> "$WORK/steps.jsonl"
}

step() {  # NAME LIMIT_S CMD...: run CMD time-boxed (within what is left of the budget); log and record it
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$(( BUDGET - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "## $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$OUT/gpu_check.log"
    record "$name" 124 0 "$limit" "skipped: budget spent"
    return
  fi
  echo "## $name (limit ${limit} s, $(( SECONDS - START )) s in): $*" | tee -a "$OUT/gpu_check.log"
  t0=$(date +%s.%N)
  timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  local secs; secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  cat "$WORK/logs/$name.log" >> "$OUT/gpu_check.log"
  echo "## $name: exit $rc after $secs s" | tee -a "$OUT/gpu_check.log"
  record "$name" "$rc" "$secs" "$limit" "$([[ $rc == 124 || $rc == 137 ]] && echo "timed out")"
}

IMPORTS="import deepspeed, hydra, omegaconf, submitit, mlflow, pydantic"
if "$PY" -c "$IMPORTS" 2>/dev/null; then
  record install 0 0 0 "skipped: the packages already import"
else
  # the wheels of packages that this Python lacks or has in an older version (e.g. typing-extensions travels
  # as pydantic's floor and is left out where the image's copy is as new); the rest would shadow the image's
  mapfile -t NEEDED < <("$PY" - .whl <<'EOF'
import sys
from importlib import metadata
from pathlib import Path
from packaging.version import Version
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = w.name.split("-")[:2]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(w)
    else:
        print(f"# {w.name}: {have} is already there", file=sys.stderr)
EOF
)
  (( ${#NEEDED[@]} )) || NEEDED=(no-wheels-in-.whl--run-tools/device_wheels.sh)
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$WORK/pkgs" "${NEEDED[@]}"
  export PYTHONPATH="$WORK/pkgs:$PYTHONPATH"
fi
step imports 60 "$PY" -c "$IMPORTS; import torch, torchvision; print(torch.__version__, torchvision.__version__)"

SPNET=(sh -c 'cd "$1" && shift && exec "$@"' sh "$WORK" "$PY" -m spnet_dist.cli)  # MLflow's artifacts: in WORK
TOOLS=$ROOT/tools

step step 150 "$PY" "$TOOLS/bench_step.py" "${MODEL[@]}" "${STEP[@]}" --jsonl "$WORK/json/step.jsonl" \
  --variants static:cl+bf16 aig:cl+bf16 spnet:cl+bf16 static:cl spnet:cl spnet:cl+bf16teacher

step make_data 60 "${SPNET[@]}" make-tiny-imagenet "$WORK/tiny" --classes "$CLASSES" "${TINY[@]}"
TRAIN_ARGS=(method=spnet_code "data.root=$WORK/tiny" data.backend=torchvision "model.num_classes=$CLASSES"
            deepspeed.bf16_autocast=true trainer.progress=false "checkpoint.dir=$WORK/ckpt"
            "tracking.uri=sqlite:///$WORK/mlflow.db" "${TRAIN[@]}")
step train_epoch1 120 "${SPNET[@]}" train "${TRAIN_ARGS[@]}" trainer.epochs=1
step train_resume 120 "${SPNET[@]}" train "${TRAIN_ARGS[@]}" trainer.epochs=2 resume=auto
step eval_skip 90 "${SPNET[@]}" eval "checkpoint=$WORK/ckpt" eval.execution=skip "data.root=$WORK/tiny"

step skip_fp32 60 "$PY" "$TOOLS/bench_skip.py" "${SKIP[@]}" --jsonl "$WORK/json/skip_fp32.jsonl"
step skip_bf16 60 "$PY" "$TOOLS/bench_skip.py" "${SKIP[@]}" --bf16 --channels-last \
  --jsonl "$WORK/json/skip_bf16.jsonl"
step decode 90 "$PY" "$TOOLS/bench_decode.py" "${DECODE[@]}" --data-dir "$WORK/jpeg" --jsonl "$WORK/json/decode.jsonl"
step step_compile 240 "$PY" "$TOOLS/bench_step.py" "${MODEL[@]}" "${STEP[@]}" --compile "$COMPILE" \
  --variants static:cl+bf16 spnet:cl+bf16 --jsonl "$WORK/json/step_compile.jsonl"

timeout 120 "$PY" "$TOOLS/gpu_check_report.py" --work "$WORK" --out "$OUT" --mode "$MODE" \
  --seconds "$(( SECONDS - START ))"
