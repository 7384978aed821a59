#!/usr/bin/env bash
# Deployed-model GPU measurements of issue 12 in ONE call on a lent GPU (H200/H100), inside a time budget:
#   environment | GPU tests of advmoe.deploy (CUDA-graph capture, input checks) | deployed-vs-source logits on
#   the GPU (every deployed mode, 3 models) | model benchmark bf16 with every side CUDA-graph captured, then
#   eager | GPU claims.json | fp32 graph + eager | kernel/sync counts per variant | torch.compile
#   reduce-overhead beside the graphs | per-layer routers.
# Models: resnet18_cifar, wrn_28_10_cifar, vgg16_bn (r=0.5, E=2, top-1); B = 1, 64, 256. Every side: BatchNorm
# folded, eval, inference_mode, channels_last, same dtype, same execution mode (see docs/deployment.md).
# No compiled extension is needed: the pathway/grouped/per-layer forms run on cuDNN convolutions; layer mode
# of the research model uses the op's reference backend here (sparse[...] rows are not run).
# Usage (repository root, on the GPU machine):  BUDGET_S=480 OUT=/some/dir bash benchmarks/gpu_bench_models.sh
# DRY_RUN=1 prints each step's command instead (checkable on a CPU machine; steps: scripts/gpu_steps.sh).
# Each step logs to $OUT/logs/<step>.log; results under $OUT/<dtype>_<execution>[_<router>]/models_bench.*;
# $OUT/summary.txt lists PASS/FAIL/SKIP with seconds per step; $OUT/claims.json holds the GPU claims.
# Steps never stop the script and are skipped once the budget is spent (highest priority first).
set -u -o pipefail
set -f  # no globbing: variant names such as deployed[pathway] are passed as they are
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-${1:-/tmp/gpu_bench_models}}
LOG_DIR="$OUT/logs"
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python3}
T_END=$((SECONDS + ${BUDGET_S:-480}))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
MODELS="resnet18_cifar wrn_28_10_cifar vgg16_bn"
VARIANTS="dense deployed deployed[pathway] deployed[grouped] deployed[layer] ideal router"
STEP_MARGIN_S=10 STEP_MIN_S=15 STEP_TAIL=4
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh

bench() {  # bench NAME LIMIT DTYPE EXECUTION ROUTER [extra bench args...]
  local name=$1 limit=$2 dtype=$3 execution=$4 router=$5
  shift 5
  # shellcheck disable=SC2086
  step "$name" "$limit" $PY -m advmoe bench --device cuda --dtype "$dtype" --execution "$execution" \
    --router "$router" --batch 1 64 256 --warmup 5 --repeats 20 --backends reference --no-plot \
    --out "$OUT/${dtype}_${execution}_${router}" "$@"
}

install_wheels
{ nvidia-smi -L; git rev-parse HEAD; git status --short | head -5
  $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 \
  | tee "$OUT/logs/env.log"

# 1. Correctness on the GPU: capture tests, then logits of every deployed mode against the source model.
step pytest_deploy_cuda 120 $PY -m pytest -q -p no:cacheprovider -m cuda tests/library/test_deploy.py
step logits_gpu 90 $PY - <<'PYEOF'
import torch
from advmoe.bench.models import balance_router
from advmoe.deploy import capture, to_sparse
from advmoe.deploy.check import compare_deployed
from advmoe.models import create_model

for name in ("resnet18_cifar", "wrn_28_10_cifar", "vgg16_bn"):
    torch.manual_seed(0)
    model = create_model(name, num_experts=2, ratio=0.5, backend="reference").cuda().eval()
    x = torch.rand(256, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    balance_router(model, x)
    for mode in ("pathway", "grouped", "layer"):
        deployed = to_sparse(model, mode=mode, example_input=x[:2])
        with torch.no_grad():
            print(name, mode, "fp32", compare_deployed(model, deployed, x), flush=True)
    captured = capture(to_sparse(model, mode="pathway", example_input=x[:2]), 256, torch.float32)
    with torch.no_grad():
        ref, out = model(x), captured(x.contiguous(memory_format=torch.channels_last))
    print(name, "pathway captured fp32 max|diff|", (ref - out).abs().max().item(), flush=True)
PYEOF

# 2. The model benchmark, bf16 first (the claims), every side captured as a CUDA graph, then eager.
bench bf16_graph 150 bf16 graph research --models $MODELS --variants $VARIANTS
bench bf16_eager 100 bf16 eager research --models $MODELS --variants $VARIANTS
step claims 20 $PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
res = json.loads((out / "bf16_graph_research" / "models_bench.json").read_text())
targets = {("resnet18_cifar", 256): 0.50, ("resnet18_cifar", 1): 1.0, ("wrn_28_10_cifar", 256): 0.40}
claims = []
for entry in res["models"]:
    for (model, batch), target in targets.items():
        if entry["model"] != model:
            continue
        rows = {r["variant"]: r for r in entry["latency"] if r["batch"] == batch}
        forms = {k: r for k, r in rows.items() if k.startswith("deployed")}
        if "dense" not in rows or not forms:
            continue
        key = "deployed" if "deployed" in forms else min(forms, key=lambda k: forms[k]["median_ms"])
        claims.append({"id": f"model.{model}.bf16.b{batch}.deployed_vs_dense", "value": forms[key]["vs_dense"],
                       "target": target, "source": f"{out.name}/bf16_graph_research/models_bench.json "
                       f"(variant {key}, both sides CUDA-graph captured, BN folded, channels_last)"})
doc = {"commit": res["provenance"]["commit"], "device": res["device"], "claims": claims}
(out / "claims.json").write_text(json.dumps(doc, indent=1) + "\n")
print(json.dumps(doc, indent=1))
PYEOF

# 3. fp32, kernel counts, torch.compile beside the graphs, per-layer routers.
bench fp32_graph 90 fp32 graph research --models $MODELS --variants $VARIANTS
bench fp32_eager 70 fp32 eager research --models $MODELS --variants $VARIANTS
step kernel_counts 90 $PY -m advmoe.bench.gpu_counts --dtype bf16 --batch 1 256 --out "$OUT/kernel_counts_bf16.json"
bench bf16_compile 150 bf16 compile research --models resnet18_cifar --variants dense deployed[pathway] ideal
bench bf16_graph_pl 60 bf16 graph per_layer --models resnet18_cifar --variants dense deployed ideal
bench bf16_eager_pl 40 bf16 eager per_layer --models resnet18_cifar --variants dense deployed ideal
echo "total $SECONDS s" | tee -a "$SUMMARY"
