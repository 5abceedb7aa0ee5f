#!/usr/bin/env bash
# Train builtin:toy on a lent GPU machine through the `device` tool, in calls that each stay under its
# 10-minute limit, and bring the model back in files the tool can return (<= 8 files, <= 16 MiB each).
#
#   here, once:        bash scripts/device/toy_base.sh wheels
#                      (diffusers + importlib_metadata wheels into .whl/, gitignored; the device image
#                      has torch, transformers, accelerate and peft but not diffusers)
#   on the device:     run(command="bash scripts/device/toy_base.sh run 540", carry=[".whl"])
#                      Starts training (setsid, so it outlives the call) if it is not running or done,
#                      then follows it for up to 540 s. Repeat the same call AT ONCE while it prints
#                      "RUNNING" (the machine goes back after 30 s idle, and the run with it). When the
#                      run is finished it checks the bars and packs model + curve + bars into $OUT.
#   here, after:       bash scripts/device/toy_base.sh unpack <files_at folder of the last call>
#                      reassembles the model into runs/toy_base_gpu/, re-checks every bar here on the
#                      CPU (dcustom eval base --bars) and, only if all hold, installs it as builtin:toy
#                      (dcustom/toyworld/weights/toy/).
#
# TOY_SET adds arguments to train-base, TOY_BARS_SEEDS / TOY_BARS_PROMPT narrow the bars check (a local smoke test uses them to run
# the whole script at toy-of-the-toy size). TOY_BUDGET_MIN (default 22) caps the training's wall time (time_budget_minutes): if the GPU is slower
# than estimated, the run still exports a partial model before the session's 30 device-minutes end.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN_DIR=runs/toy_base
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # env.sh sets them too; unpack runs here without it

running() {  # the training this script started (its pid file), not any other train-base
    [ -f "$RUN_DIR/pid" ] && kill -0 "$(cat "$RUN_DIR/pid")" 2>/dev/null
}

dcustom_cli() {  # the device has no console script: run the CLI module from the source tree
    python3 -c "from dcustom.cli import main; main()" "$@"
}

case "${1:-}" in
wheels)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata zipp
    ls -la .whl
    ;;
run)
    follow=${2:-540}
    source scripts/device/env.sh
    if [ ! -f "$RUN_DIR/DONE" ] && ! running; then
        mkdir -p "$RUN_DIR"
        nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi here"
        setsid nohup bash -c "python3 -c 'from dcustom.cli import main; main()' toyworld train-base \
            --config configs/toy_base_gpu.yaml --set output_dir=$RUN_DIR --set render_workers=16 \
            --set time_budget_minutes=${TOY_BUDGET_MIN:-22} ${TOY_SET:-} >> $RUN_DIR/train.log 2>&1 && touch $RUN_DIR/DONE" \
            >/dev/null 2>&1 < /dev/null &
        echo $! > "$RUN_DIR/pid"
        echo "started training (log: $RUN_DIR/train.log)"
    fi
    end=$((SECONDS + follow))
    while [ ! -f "$RUN_DIR/DONE" ] && [ $SECONDS -lt $end ]; do
        sleep 20
        running || break
        tail -n 1 "$RUN_DIR/train.log" 2>/dev/null || true
    done
    grep '^curve' "$RUN_DIR/train.log" | tail -n 3 || true
    if [ ! -f "$RUN_DIR/DONE" ]; then
        if running; then echo RUNNING; exit 0; fi
        echo "FAILED: training stopped without finishing; the end of its log:"; tail -n 30 "$RUN_DIR/train.log"; exit 1
    fi
    dcustom_cli eval base -m "$RUN_DIR/model" --bars -o "$RUN_DIR/bars" --seeds "${TOY_BARS_SEEDS:-0,1,2,3}" \
        ${TOY_BARS_PROMPT:+--prompt "$TOY_BARS_PROMPT"} 2>&1 | tee "$RUN_DIR/bars.txt" || true
    tar -C "$RUN_DIR" -czf /tmp/toy_model.tgz model
    split -b 15M -d /tmp/toy_model.tgz "$OUT/toy_model.tgz.part-"
    for f in learning_curve.png learning_curve.json bars/bars.json bars.txt; do
        [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$OUT/"
    done
    grep -E '"event": "(end|budget)"' "$RUN_DIR/events.jsonl" > "$OUT/end_events.jsonl" || true
    ls -la "$OUT"
    echo PACKED
    ;;
unpack)
    from=${2:?usage: toy_base.sh unpack <folder with toy_model.tgz.part-* from the device>}
    dest=runs/toy_base_gpu
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    cat "$from"/toy_model.tgz.part-* | tar -C "$dest.tmp" -xzf -
    cp "$from"/learning_curve.* "$from"/bars.* "$dest.tmp/" 2>/dev/null || true
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo "model in $dest/model; checking the bars here (CPU) before installing it"
    if dcustom_cli eval base -m "$dest/model" --bars -o "$dest/bars_cpu" --device cpu --dtype fp32 \
            --seeds "${TOY_BARS_SEEDS:-0,1,2,3}" ${TOY_BARS_PROMPT:+--prompt "$TOY_BARS_PROMPT"}; then
        python3 -c "from dcustom.toyworld.train_base import install_folder; install_folder('$dest/model')"
    else
        echo "a bar does not hold (see above and $dest/bars_cpu/bars.json): not installed as builtin:toy"
        exit 1
    fi
    ;;
*)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
