#!/usr/bin/env bash
# Model benchmark on a lent GPU: bf16 and fp32, B=1/16/64/256, the six README models.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash benchmarks/gpu_bench_models.sh [--backends reference triton cuda]
# Results: $OUT/<dtype>/models_bench.{json,md,png} (copy them to benchmarks/results/<device-slug>-<dtype>/).
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi -L || true
python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
python -c "import fvcore, tqdm, matplotlib" 2>/dev/null || echo "note: fvcore/tqdm/matplotlib missing: FLOPs, bars or plot are skipped"
MODELS="resnet18_cifar wrn_28_10_cifar vgg16_bn densenet_cifar resnet18_imagenet resnet50_imagenet"
for dtype in bf16 fp32; do
  python -m advmoe bench --device cuda --dtype "$dtype" --models $MODELS --batch 1 16 64 256 \
    --warmup 5 --repeats 20 --out "$OUT/$dtype" "$@"
done
