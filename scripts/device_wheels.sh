# Sourced by the device scripts (device_moshi.sh, device_omni.sh) on the lent GPU machine: puts
# the wheels carried in `.whl` (scripts/device_prepare makes them) on the Python path, and stops
# at once, saying why, if what the engines need is not there (rather than minutes into a run).
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' || { echo "run bash scripts/device_prepare here, then carry .whl" >&2; exit 3; }
import sys

import msgspec
import torch
import transformers

print(f"python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, msgspec {msgspec.__version__}", flush=True)
if transformers.__version__ != "5.24.0":
    sys.exit("transformers 5.24.0 is needed (carry .whl)")
PY
