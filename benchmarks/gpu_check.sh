#!/usr/bin/env bash
# The GPU road, checked on the tiny world: every method in fp16 and bf16 on one GPU (and with 2
# data-parallel processes, through the trainer's own `--num-processes` launcher, when the machine
# has 2 GPUs). For each run it prints s/step, peak memory, and whether the stop step is within TOL
# steps of the same method's fp32 run on CPU. Exits non-zero on any failed run, missing summary,
# wrong recorded precision/process count, or stop-step mismatch. Not yet timed on a GPU (none
# here); the budget is set for under 8 minutes on one GPU, most of it the five fp32 CPU reference
# runs (MAX_STEPS shortens every run).
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=.venv/bin/python by default
#   METHODS="lora dreambooth" MAX_STEPS=40 TOL=5 bash benchmarks/gpu_check.sh
#
# Without a CUDA GPU it runs its CPU fallback: the same runs on CPU (bf16 and fp16 through CPU
# autocast, 2 processes over gloo), peak memory as peak RSS. That is what can be run on a machine
# without a GPU; it checks the commands and the precision/process plumbing, not GPU kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
METHODS=${METHODS:-"textualInversion dreambooth lora customDiffusion tiDreambooth"}
MAX_STEPS=${MAX_STEPS:-60}
TOL=${TOL:-5}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
unset PJ_NAME PJ_NAMESPACE

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') \
  || { echo "FAIL: $PYTHON cannot import torch"; exit 1; }
if [ "$gpus" -ge 1 ]; then device=cuda; else device=cpu; echo "no CUDA GPU: CPU fallback"; fi
process_counts="1"
if [ "$gpus" -ge 2 ] || [ "$device" = cpu ]; then process_counts="1 2"; fi

# the concept images and one job file per (method, precision)
"$PYTHON" - "$WORK" "$MAX_STEPS" $METHODS <<'EOF' || exit 1
import sys, yaml
from pathlib import Path
from personalize.world import concept_by_name, write_concept_images
work, max_steps, methods = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
images = work / "concept"
if not images.exists():
    write_concept_images(concept_by_name("red_striped_triangle"), 6, images, seed=0)
for method in methods:
    for precision in ("no", "fp16", "bf16"):
        spec = {
            "baseModel": {"builtin": "tiny-world"},
            "method": method,
            "concept": {"images": {"path": str(images)}, "classNoun": "triangle", "token": "auto"},
            "training": {"maxSteps": max_steps, "batchSize": 2, "seed": 0, "mixedPrecision": precision,
                         "learningRate": 0.02 if method == "textualInversion" else 0.001},
            "earlyStopping": {"criterion": "dvar", "window": 8, "threshold": 0.3, "referenceBatchSize": 2},
            "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
        }
        if method not in ("textualInversion", "tiDreambooth"):
            spec["priorPreservation"] = {"enabled": False}
        if method == "tiDreambooth":
            spec["tiDreambooth"] = {"stage1MaxSteps": max_steps // 2, "stage1LearningRate": 0.02, "stage1Window": 8}
        (work / f"{method}-{precision}.yaml").write_text(yaml.safe_dump({"spec": spec}))
EOF

failures=0
field() { "$PYTHON" -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(v if not isinstance(v, float) else f"{v:.3f}")' "$1" "$2"; }

run() {  # run METHOD PRECISION PROCESSES DEVICE -> WORK/<name>.summary.json
  # Several processes go through the trainer's own launcher (`--num-processes`, as the operator runs it).
  local method=$1 precision=$2 procs=$3 dev=$4 name="$1-$2-$3p-$4" code=0
  local env=()
  [ "$dev" = cpu ] && env=(CUDA_VISIBLE_DEVICES=)
  rm -rf "${WORK:?}/$name" "$WORK/$name.summary.json"*
  env "${env[@]}" "$PYTHON" benchmarks/gpu_check_run.py --config "$WORK/$method-$precision.yaml" \
    --output "$WORK/$name" --summary "$WORK/$name.summary.json" --num-processes "$procs" > "$WORK/$name.log" 2>&1 \
    || code=$?
  if [ "$code" -ne 0 ] || ! field "$WORK/$name.summary.json" stop_step > /dev/null 2>&1; then
    echo "FAIL $name: exit code $code, summary ${WORK}/$name.summary.json (log: $WORK/$name.log)"
    tail -5 "$WORK/$name.log"; failures=$((failures + 1)); return 1
  fi
}

# The world the runs train on: results name it (personalize/world/provenance.py).
echo "world: $("$PYTHON" -c 'from personalize.world.provenance import installed_world; print(installed_world())' 2>/dev/null)"
printf '%-40s %8s %9s %10s %s\n' run stop s/step peak_MiB "stop vs fp32 CPU"
for method in $METHODS; do
  run "$method" no 1 cpu || continue
  reference=$(field "$WORK/$method-no-1p-cpu.summary.json" stop_step)
  printf '%-40s %8s %9s %10s %s\n' "$method fp32 cpu (reference)" "$reference" \
    "$(field "$WORK/$method-no-1p-cpu.summary.json" seconds_per_step)" "$(field "$WORK/$method-no-1p-cpu.summary.json" peak_mib)" -
  for precision in fp16 bf16; do
    for procs in $process_counts; do
      name="$method-$precision-${procs}p-$device"
      run "$method" "$precision" "$procs" "$device" || continue
      summary="$WORK/$name.summary.json"
      stop=$(field "$summary" stop_step)
      used=$(field "$summary" mixed_precision); ran=$(field "$summary" processes)
      verdict="match (|$stop - $reference| <= $TOL)"
      if [ $(( stop > reference ? stop - reference : reference - stop )) -gt "$TOL" ]; then
        verdict="MISMATCH (fp32 CPU stopped at $reference)"; failures=$((failures + 1))
      fi
      if [ "$used" != "$precision" ] || [ "$ran" != "$procs" ]; then
        verdict="$verdict; WRONG SETUP (ran $used x $ran)"; failures=$((failures + 1))
      fi
      printf '%-40s %8s %9s %10s %s\n' "$method $precision ${procs}p $device" "$stop" \
        "$(field "$summary" seconds_per_step)" "$(field "$summary" peak_mib)" "$verdict"
    done
  done
done
# Packed training on the GPU: randomly initialised full-size SD 1.5 (512 px) and SDXL (1024 px) in
# bf16, packs of 1 to 16 against solo runs (benchmarks/packing.py; results under benchmarks/results).
# PACKING=0 skips it; without a GPU it is skipped (the suite runs the same path at tiny size on CPU).
if [ "$device" = cuda ] && [ "${PACKING:-1}" != 0 ]; then
  for model in sd15 sdxl; do
    "$PYTHON" benchmarks/packing.py --model "$model" --precision bf16 --methods textualInversion,lora \
      --sizes "${PACK_SIZES:-1,2,4,8,16}" --steps "${PACK_STEPS:-10}" --output "benchmarks/results/packing_gpu_$model" \
      || { echo "FAIL packing $model"; failures=$((failures + 1)); }
  done
fi
echo "work folder: $WORK"
if [ "$failures" -gt 0 ]; then echo "$failures failure(s)"; exit 1; fi
echo "all runs passed"
