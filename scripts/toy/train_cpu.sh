#!/usr/bin/env bash
# Start (or resume) the builtin:toy CPU recipe as a background job and return at once.
#   bash scripts/toy/train_cpu.sh [run_dir] [threads]
# run_dir defaults to ../runs/toy_base (outside the work tree, so a new checkout resumes it); threads
# defaults to the core count. Use 1 thread while other CPU work runs on the machine: a 2-thread torch
# job sharing its cores with another process runs ~10x slower (each op waits for the descheduled
# thread), a 1-thread job about 2x slower than alone. Follow it with: tail -f <run_dir>/train.log
set -euo pipefail
cd "$(dirname "$0")/../.."
run_dir="$(realpath -m "${1:-../runs/toy_base}")"
threads="${2:-$(nproc)}"
bash scripts/setup.sh
mkdir -p "$run_dir"
if pgrep -f "train-base .*output_dir=$run_dir" >/dev/null; then
  echo "already running in $run_dir"; exit 0
fi
HF_HUB_OFFLINE=1 OMP_NUM_THREADS="$threads" setsid nohup nice "${DCUSTOM_VENV:-.venv}/bin/dcustom" toyworld train-base \
  --config configs/toy_base.yaml --set "output_dir=$run_dir" --set "threads=$threads" \
  >> "$run_dir/train.log" 2>&1 < /dev/null &
echo "started in $run_dir ($threads threads); tail -f $run_dir/train.log"
