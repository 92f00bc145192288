#!/usr/bin/env bash
# GPU check: everything histosynth has only ever run on CPUs, in one script that ends in under
# 8 minutes on one GPU and writes one results file.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default benchmarks/results/gpu
#   bash benchmarks/gpu_check.sh --fetch-wheels       # beforehand, where pip reaches a registry:
#                                                     # the dependencies a bare CUDA+PyTorch image
#                                                     # lacks, as wheels into .whl/
#
# On the GPU machine, .whl/*.whl (if present) are installed into /tmp/site first. Then:
#   1. benchmarks/run.py --sections conv sngan32 cyclegan effnet segmentation: fp32 eager vs the default path
#      (CUDA bf16 autocast, channels_last, fused Adam) vs train.compile, with MFU against the
#      device's dense bf16 peak
#   2. SNGAN, 200 steps, uninterrupted and SIGKILLed past step 100 then resumed (train-gan
#      --resume): the largest weight difference between the two is printed
#   3. CycleGAN, the same (bundled 384 px H&E crops as the two domains)
#   4. one classifier cell (train-classifier on the bundled demo tiles)
#   5. augment-compare --workers 2 on the demo (two processes sharing the GPU), one seed
# Each step is timed; a failed step is recorded and the others still run. A smoke test of the script
# on a CPU: GPU_CHECK_STEPS=4 GPU_CHECK_SKIP="benchmarks compare_workers2" bash benchmarks/gpu_check.sh /tmp/g
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="piq albumentations albucore stringzilla simsimd torchsampler efficientnet-pytorch torchstain prdc
        diffusers segmentation-models-pytorch pydantic pydantic-core annotated-types typing-inspection
        eval-type-backport"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl && grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --only-binary=:all: -d .whl "$w" || echo "gpu_check: no wheel for $w"
    done
    ls .whl; exit 0
fi

RES="${1:-benchmarks/results/gpu}"
mkdir -p "$RES"
REPORT="$RES/gpu_check.md"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HISTOSYNTH_CACHE="$WORK/cache"
PY=python3
N=${GPU_CHECK_STEPS:-200}; H=$((N / 2)); Q=$((N / 4 > 0 ? N / 4 : 1)); SKIP=" ${GPU_CHECK_SKIP:-} "

{
    echo "# histosynth GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
    echo
    echo "| step | seconds | result |"
    echo "|---|---|---|"
} > "$REPORT"

step() {   # step NAME COMMAND...: run, time, record; never stops the script
    local name="$1"; shift
    local t0=$SECONDS
    [[ "$SKIP" == *" $name "* ]] && { echo "| $name | | skipped |" >> "$REPORT"; return; }
    echo "gpu_check: $name ..." >&2
    if "$@" > "$WORK/$name.log" 2>&1; then
        echo "| $name | $((SECONDS - t0)) | ok |" >> "$REPORT"
    else
        echo "| $name | $((SECONDS - t0)) | FAILED: $(tail -n 1 "$WORK/$name.log" | tr '|' '/') |" >> "$REPORT"
    fi
    cp "$WORK/$name.log" "$RES/$name.log" 2>/dev/null
}

killed_then_resumed() {   # killed_then_resumed RUN CMD...: SIGKILL CMD once RUN has a checkpoint
    local run="$1"; shift     # past half way, then train-gan --resume RUN to the end
    "$@" & local pid=$!
    while kill -0 $pid 2>/dev/null; do
        local at; at=$(grep -o '"step": [0-9]*' "$run/metrics.jsonl" 2>/dev/null | tail -n 1 | grep -o '[0-9]*$')
        if (( ${at:-0} >= H )); then
            kill -9 $pid; echo "killed after step $at"; break
        fi
        sleep 0.2
    done
    wait $pid 2>/dev/null
    $PY -m gans.train_gan --resume "$run" --no-progress
}

same_weights() {   # same_weights RUN_A RUN_B: the largest difference of any weight in last.pt
    $PY - "$1" "$2" <<'EOF'
import sys, torch
a, b = (torch.load(f"{r}/checkpoints/last.pt", map_location="cpu", weights_only=True) for r in sys.argv[1:])
diff = 0.0
def walk(x, y):
    global diff
    if isinstance(x, dict):
        for k in x:
            walk(x[k], y[k])
    elif torch.is_tensor(x) and x.is_floating_point():
        diff = max(diff, (x.float() - y.float()).abs().max().item())
walk(a["modules"] if "modules" in a else a, b["modules"] if "modules" in b else b)
print(f"resumed vs uninterrupted: max |weight difference| = {diff:.3g}")
EOF
}

step benchmarks $PY benchmarks/run.py --sections conv sngan32 cyclegan effnet segmentation --iters 10 --out "$RES"

for fam in sngan cyclegan; do
    cfg=$fam; extra=()
    if [[ $fam == cyclegan ]]; then
        cfg=cyclegan_cpu
        extra=(--set data.root_a=data/monuseg_demo/train/images --set data.root_b=data/monuseg_demo/test/images)
    fi
    step "${fam}_${N}" $PY -m gans.train_gan --cfg $cfg --out "$WORK/${fam}_full" --no-progress "${extra[@]}" \
        --set train.steps=$N --set train.checkpoint_every=$Q --set train.sample_every=$H
    step "${fam}_killed_then_resumed" killed_then_resumed "$WORK/${fam}_half" $PY -m gans.train_gan --cfg $cfg \
        --out "$WORK/${fam}_half" --no-progress "${extra[@]}" \
        --set train.steps=$N --set train.checkpoint_every=$Q --set train.sample_every=$H
    echo "- $fam: $(same_weights "$WORK/${fam}_full" "$WORK/${fam}_half" 2>&1 | tail -n 1)" >> "$WORK/resume.txt"
done

step classifier $PY -m classifier.train_classifier --cfg classifier --out "$WORK/clf" --no-progress
[[ -f "$WORK/clf/metrics.json" ]] && cp "$WORK/clf/metrics.json" "$RES/classifier_metrics.json"

step compare_workers2 $PY -m experiments.augment_compare --cfg compare_demo --out "$WORK/cmp" --workers 2 \
    --no-progress --set "seeds=[0]"
[[ -f "$WORK/cmp/results.csv" ]] && cp "$WORK/cmp/results.csv" "$RES/compare_results.csv"

{
    echo
    echo "## Resume ($N steps uninterrupted vs SIGKILLed past step $H and resumed)"
    cat "$WORK/resume.txt" 2>/dev/null
    echo
    echo "## Benchmarks"
    cat "$RES/benchmarks.md" 2>/dev/null || echo "(no benchmark results)"
} >> "$REPORT"
cat "$REPORT"
