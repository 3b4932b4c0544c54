#!/usr/bin/env bash
# Wheels that the GPU device image lacks, for its Python 3.12 on x86-64 Linux, written to .whl/ (git-ignored).
#
#   tools/device_wheels.sh            # run on a machine that reaches PyPI; then carry .whl to the device
#
# tools/gpu_check.sh installs them there with `pip install --no-index --no-deps --target ...`. Versions are the
# pins of requirements.lock; one version of each package; the total must stay under 60 MiB (the device call carries
# at most 64 MiB, the repository included). deepspeed and antlr4-python3-runtime are sdists on PyPI: built here into
# pure-Python wheels (DeepSpeed with DS_BUILD_OPS=0: its ops compile just in time; the trainer needs none of them).
#
# The device image (the device docs' package list, read 2026-11-17) already has torch 2.11, torchvision 0.26, numpy,
# pillow, typing-extensions, filelock, jinja2, markupsafe, sympy, networkx, fsspec, packaging, psutil, pyyaml, tqdm,
# requests, urllib3, protobuf, click, cloudpickle, anyio, h11, zipp, einops, msgpack, ninja, py-cpuinfo,
# nvidia-ml-py, matplotlib, pandas, scipy (full list in DEVICE_HAS below; versions unknown except torch/torchvision/
# numpy). It lacks deepspeed (+ hjson, pydantic, pydantic-core, annotated-types, typing-inspection), hydra-core,
# omegaconf, antlr4, submitit and mlflow. typing-extensions travels too, as pydantic's floor (>= 4.16): gpu_check.sh
# installs a wheel only where the image lacks the package or has an older version, so nothing newer is shadowed.
# MLflow travels as mlflow-skinny (client, SQLite store, no server UI) with its declared dependencies and
# SQLAlchemy + alembic + Mako for the sqlite:// store. After downloading, every wheel's declared dependencies (for
# CPython 3.12 on Linux, no extras) are checked to be either here or in DEVICE_HAS.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHL_DIR:-.whl}
LIMIT_MIB=60
PY=${PYTHON:-}
if [[ -z $PY ]]; then [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; fi

# pure Python or cp312 manylinux wheels on PyPI
WHEELS=(
  hjson pydantic pydantic_core annotated-types typing-inspection              # deepspeed's
  hydra-core omegaconf submitit
  mlflow-skinny cachetools databricks-sdk google-auth pyasn1_modules pyasn1 cryptography cffi pycparser
  fastapi starlette uvicorn GitPython gitdb smmap importlib_metadata python-dotenv sqlparse
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  SQLAlchemy alembic Mako                                                     # sqlite:// tracking store
  typing_extensions                    # pydantic's floor (>= 4.16): installed there only over an older copy
)
SDISTS=(deepspeed antlr4-python3-runtime)   # built here into py3-none-any wheels

pin() {  # NAME -> NAME==VERSION from requirements.lock (names compared as PEP 503 normalises them)
  local want; want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  local line; line=$(awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n); if (n == w) print}' \
    requirements.lock)
  [[ -n $line ]] || { echo "device_wheels: $1 is not pinned in requirements.lock" >&2; exit 1; }
  echo "$line"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST"
specs=(); for n in "${WHEELS[@]}"; do specs+=("$(pin "$n")"); done
echo "# downloading ${#specs[@]} wheels for CPython 3.12 manylinux x86-64"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${specs[@]}" 2> >(grep -v "is ignored" >&2)
sd=(); for n in "${SDISTS[@]}"; do sd+=("$(pin "$n")"); done
echo "# building ${sd[*]} from their sdists"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$tmp/sdist" "${sd[@]}" \
  2> >(grep -v "is ignored" >&2)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/built" "$tmp"/sdist/* \
  2> >(grep -v "is ignored" >&2)
for w in "$tmp"/built/*.whl; do
  [[ $w == *-py3-none-any.whl ]] || { echo "device_wheels: $w is not pure Python" >&2; exit 1; }
  cp "$w" "$DEST/"
done

# one version each, declared dependencies covered, size under the limit
"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import Marker
from packaging.requirements import Requirement

DEVICE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja
numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
dest, limit = Path(sys.argv[1]), float(sys.argv[2])
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(dest.glob("*.whl"))
have: dict[str, str] = {}
errors = []
for w in wheels:
    name, version = w.name.split("-")[:2]
    if norm(name) in have:
        errors.append(f"two versions of {name}: {have[norm(name)]} and {version}")
    have[norm(name)] = version
device = {norm(n) for n in DEVICE_HAS}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        n = norm(req.name)
        if n not in have and n not in device:
            errors.append(f"{w.name} needs {req} (neither in {dest} nor on the device image)")
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {dest}/ (limit {limit:.0f} MiB)")
if total >= limit * 2**20:
    errors.append(f"the wheels take {total / 2**20:.1f} MiB, over the {limit:.0f} MiB limit")
if errors:
    sys.exit("device_wheels: FAILED\n  " + "\n  ".join(errors))
EOF
