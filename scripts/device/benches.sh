#!/usr/bin/env bash
# The GPU benchmarks on a lent machine (the `device` tool), one group per call so each stays under the
# 10-minute limit; every bench prints its plain baseline, measured in the same run, and the ratio.
#
#   run(command="bash scripts/device/benches.sh train", carry=[".whl"])   # bench/train_adapter.py, SD1.5 + SDXL
#   run(command="bash scripts/device/benches.sh style", carry=[".whl"])   # bench/style.py, SD1.5, 50 steps
#   run(command="bash scripts/device/benches.sh reward", carry=[".whl"])  # bench/reward.py, SD1.5, K=1 vs full chain
#
# Each writes $OUT/bench_<group>.txt. BENCH_TINY=1 runs the same groups with the tiny architectures on
# the CPU (how the script is smoke-tested without a GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/env.sh
OUT=${OUT:-runs/benches}
mkdir -p "$OUT"
if [ "${BENCH_TINY:-0}" = 1 ]; then
    sd15=tiny-sd15 sdxl=tiny-sdxl style_model=tiny:sd15 device=cpu steps=4 extra="--steps 2"
else
    sd15=sd15 sdxl=sdxl style_model=sd15 device=cuda steps=50 extra=""
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"

group=${1:-}
log="$OUT/bench_$group.txt"
case "$group" in
train)
    { python3 bench/train_adapter.py --arch "$sd15" --device "$device" $extra
      python3 bench/train_adapter.py --arch "$sdxl" --device "$device" $extra; } 2>&1 | tee "$log" ;;
style)
    python3 bench/style.py --model "$style_model" --device "$device" --steps "$steps" 2>&1 | tee "$log" ;;
reward)
    python3 bench/reward.py --arch "$sd15" --device "$device" --steps "$steps" 2>&1 | tee "$log" ;;
*)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
