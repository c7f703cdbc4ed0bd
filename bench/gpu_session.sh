#!/usr/bin/env bash
# One GPU session's worth of measurements and training, in one command (the device tool's
# machines have no network and a 15-minute budget; see docs/performance.md).
#
#   bash bench/gpu_session.sh                 # writes to $OUT (default /tmp/pacs-node-gpu)
#
# Needs beside the repo (not committed): .gpu/whl/ with the wheels the GPU image lacks
# (pydicom, monai) and .gpu/data/ holding unpack.sh and mr/*.tar.xz (copies of ../shared/data).
# SR_BUDGET (seconds per mr-superres task, default 240) sizes the training; TRAIN=0 skips it
# (measurements and the GPU tests only, about 2 minutes).
#
# 0. the pipelines' CUDA paths against their CPU paths (tests/test_gpu.py, skipped on CI)
# 1. ct-denoise throughput at 512 x 512 (bench/model_ct_denoise.py --device cuda)
# 2. mr-superres GPU recipe (models/mr-superres/train_gpu.toml): in-plane x2 and x4 generators,
#    trained side by side on the one GPU, each with its own batch workers
# 3. model stage of the MR pipelines on the GPU (bench/model_pipelines.py), committed weights
#    and (TRAIN=1) the new mr-superres weights
set -u
OUT=${OUT:-/tmp/pacs-node-gpu}
SR_BUDGET=${SR_BUDGET:-240}
DEVICE=${DEVICE:-cuda}   # dry run on a CPU machine: DEVICE=cpu SR_BUDGET=20 SLICES=2 CT_ARGS="--batches 1 --series 2"
SLICES=${SLICES:-40}
TRAIN=${TRAIN:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }

stamp "start"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, numpy, scipy; print("torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__, "cpus", __import__("os").cpu_count())'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PACS_NODE_SHARED=$PWD/.gpu PACS_NODE_DATA=/tmp/pacs-node-data
bash .gpu/data/unpack.sh "$PACS_NODE_DATA" || exit 1
stamp "data unpacked"
python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15
stamp "GPU tests done"

# the training bank (CPU work) while the GPU measures ct-denoise
python3 -c '
from pathlib import Path
from pacs_node.ml.mr_superres import DEFAULT_CACHE, TrainConfig, build_bank
bank, uih = build_bank(None, DEFAULT_CACHE, TrainConfig.load(Path("models/mr-superres/train_gpu.toml")))
print("bank", len(bank), "slices,", int(uih.sum()), "UIH")' &
bank_pid=$!
python3 bench/model_ct_denoise.py --device "$DEVICE" ${CT_ARGS:-} | tee "$OUT/bench.txt"
wait $bank_pid || exit 1
stamp "ct-denoise measured, bank built"

if [ "$TRAIN" = 1 ]; then
train() {  # task workers
  python3 -c 'import sys; from pacs_node.ml.mr_superres import train_main; sys.exit(train_main(sys.argv[1:]))' \
    --config models/mr-superres/train_gpu.toml --init models/mr-superres --tasks "$1" --out "/tmp/sr-$1" \
    --device "$DEVICE" --workers "$2" --time-budget "$SR_BUDGET" > "$OUT/train_$1.log" 2>&1
}
train inplane2 8 & p2=$!
train inplane4 6 & p4=$!
wait $p2; rc2=$?
wait $p4; rc4=$?
stamp "mr-superres training done (rc $rc2 / $rc4)"
tail -n 4 "$OUT/train_inplane2.log" "$OUT/train_inplane4.log"

# one weights folder: new in-plane generators, the through-plane ones of the committed model
python3 - <<'EOF'
import json, shutil
from pathlib import Path
from pacs_node.ml.mr_superres_net import load_generators, save_generators
out = Path("/tmp/models/mr-superres"); out.mkdir(parents=True, exist_ok=True)
for fname in ("model.safetensors", "l1_baseline.safetensors"):
    base = load_generators(Path("models/mr-superres") / fname)
    gens, meta, hist = dict(base.generators), dict(base.meta), []
    tasks = dict(meta.get("tasks", {}))
    for task in ("inplane2", "inplane4"):
        f = Path(f"/tmp/sr-{task}") / fname
        if f.exists():
            new = load_generators(f)
            gens[task] = new.generators[task]
            tasks[task] = new.meta["tasks"][task]
            meta.update({k: new.meta[k] for k in ("version", "config")})
            hist += json.loads((f.parent / "train_history.json").read_text())
    meta["tasks"] = tasks
    save_generators(out / fname, gens, meta)
    if hist:
        (out / "train_history.json").write_text(json.dumps(hist))
    print(fname, load_generators(out / fname).meta["arch"])
for name in ("ct-denoise", "anomaly-mr"):
    shutil.copytree(Path("models") / name, Path("/tmp/models") / name, dirs_exist_ok=True)
EOF
cp /tmp/models/mr-superres/*.safetensors /tmp/models/mr-superres/train_history.json "$OUT/" 2>/dev/null
stamp "weights merged"
fi

python3 bench/model_pipelines.py --device "$DEVICE" --slices "$SLICES" | tee -a "$OUT/bench.txt"
[ "$TRAIN" = 1 ] && PACS_NODE_MODELS=/tmp/models python3 bench/model_pipelines.py --device "$DEVICE" --slices "$SLICES" \
  --json "$OUT/pipelines_new.json" | tee -a "$OUT/bench.txt"
stamp "done"
