# Sourced by the scripts in scripts/device/ on the lent GPU machine: its image has torch,
# transformers, accelerate and peft but not diffusers, which travels as wheels in .whl/
# (`bash scripts/device/toy_base.sh wheels` here, then carry=[".whl"] in the device call).
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
