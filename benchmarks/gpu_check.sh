#!/usr/bin/env bash
# The prepared GPU check: every CUDA-marked test (pytest -m cuda), one JSON.
#
# Runtime budget: under 8 minutes on one H200 from a fresh clone, install included:
#   install (venv over the machine's own CUDA torch, ferrytune editable, no downloads)   <= 1 min
#   pytest -m cuda: Triton kernels compiled for real vs the reference (~1 min, incl. the
#     > 2**31-element tensor), pinned vs pageable H2D (~10 s), DeepSpeed GDS when its op
#     builds (<= 2 min JIT, else skipped with the reason), the streamer/collective tests  <= 6 min
#   a hard limit of 7 min (GPU_CHECK_TIMEOUT_S) stops pytest so the JSON is always written.
#
# Without CUDA (nvidia-smi missing or failing) it says so in one line, exits 0 and runs nothing.
# With a GPU but no torch that sees it (and none installable), it fails in one line.
#
#   bash benchmarks/gpu_check.sh                  # writes bench-out/gpu_check.json (GPU_CHECK_OUT)
#   bash benchmarks/gpu_check.sh --prepare-wheels # on a machine with an index: wheels into .whl/ for a
#                                                 # GPU machine that cannot download (carry .whl there)
#
# Python: GPU_CHECK_PYTHON (default python3) must be the interpreter that holds a CUDA build of torch;
# the venv sees its packages (--system-site-packages) so nothing large is installed. If that torch
# cannot use CUDA, `pip install torch==$GPU_CHECK_TORCH` (default 2.14.1) is tried in the venv.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${GPU_CHECK_PYTHON:-python3}
OUT_JSON=${GPU_CHECK_OUT:-$ROOT/bench-out/gpu_check.json}
LIMIT_S=${GPU_CHECK_TIMEOUT_S:-420}

if [[ "${1:-}" == "--prepare-wheels" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    "$PY" -m pip download -q -d .whl --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYVER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 pydantic pydantic-core annotated-types typing-inspection hjson py-cpuinfo \
        && "$PY" -m pip wheel -q --no-deps -w .whl deepspeed  # a source distribution: its wheel, no op compiled in
    exit $?
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (nvidia-smi missing or failing); nothing run"
    exit 0
fi

start=$(date +%s)
log() { echo "gpu_check [$(( $(date +%s) - start ))s] $*"; }
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
"$PY" -m venv --system-site-packages "$VENV" || { echo "gpu_check: cannot make a venv with $PY"; exit 1; }
. "$VENV/bin/activate"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    log "$PY's torch does not see the GPU: trying torch==${GPU_CHECK_TORCH:-2.14.1} in the venv"
    python -m pip install -q --retries 0 --timeout 20 "torch==${GPU_CHECK_TORCH:-2.14.1}" \
        || { echo "gpu_check: no CUDA torch: $PY has none and pip install torch==${GPU_CHECK_TORCH:-2.14.1} failed"; exit 1; }
fi
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl || log "some carried wheels did not install"
fi
# ferrytune itself, editable; dependencies the image lacks come from .whl/ or an index if one is reachable.
python -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: pip install -e . failed"; exit 1; }
missing=$(python - <<'EOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers",
        "yaml": "pyyaml", "pydantic": "pydantic", "tqdm": "tqdm", "numpy": "numpy", "numba": "numba",
        "xxhash": "xxhash", "pytest": "pytest", "triton": "triton"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
    log "installing what the image lacks: $missing"
    timeout 120 python -m pip install -q --retries 0 --timeout 10 $missing || { echo "gpu_check: cannot install $missing (no index here: run --prepare-wheels elsewhere and carry .whl)"; exit 1; }
fi
log "installed: $(python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))')"

METRICS=$(mktemp -d)
JUNIT=$METRICS/junit.xml
export FERRYTUNE_GPU_METRICS=$METRICS OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
# deterministic cuBLAS: the tier tests compare streamed and resident runs bit for bit
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}
PYTHONUNBUFFERED=1 timeout "$LIMIT_S" python -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$JUNIT" tests
rc=$?
log "pytest -m cuda exited $rc"
if (( $(date +%s) - start < 360 )); then  # the three short ratios, if the budget leaves room (~2 min)
    timeout 150 python benchmarks/gpu_ratios.py --scratch "$METRICS/ratios-scratch" --out "$METRICS/ratios.json" \
        || log "gpu_ratios did not finish"
    rm -rf "$METRICS/ratios-scratch"
fi

mkdir -p "$(dirname "$OUT_JSON")"
python - "$JUNIT" "$METRICS" "$OUT_JSON" "$rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
import torch
junit, metrics, out, rc, wall = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tests, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
if os.path.exists(junit):
    for case in ET.parse(junit).getroot().iter("testcase"):
        status, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = "failed" if tag == "failure" else tag
                detail = (el.get("message") or "")[:500]
        counts[status] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                      "seconds": float(case.get("time") or 0), "detail": detail})
figures = {f[:-5]: json.load(open(os.path.join(metrics, f))) for f in sorted(os.listdir(metrics))
           if f.endswith(".json")}
doc = {"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "pytest_rc": rc, "timed_out": rc == 124, "wall_s": wall,
       "counts": counts, "tests": tests, "figures": figures}
json.dump(doc, open(out, "w"), indent=1)
print(f"gpu_check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
      f"{', %d errors' % counts['error'] if counts['error'] else ''}; wrote {out}")
EOF
exit $rc
