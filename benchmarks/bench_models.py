"""Model benchmark: FLOPs and latency of dense, masked (research code), sparse, deployed and ideal models.

Thin script over ``advmoe.bench.models`` (same as ``advmoe bench``); see ``--help``. Examples::

    python benchmarks/bench_models.py                                  # CPU, docs/deployment.md's six models, B=1,16,64
    python benchmarks/bench_models.py --device cuda --dtype bf16       # + B=256
    python benchmarks/bench_models.py --quick                          # tiny CI run

Results go to ``benchmarks/results/<device-slug>/models_bench.{json,md,png}``.
"""

import sys

from advmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
