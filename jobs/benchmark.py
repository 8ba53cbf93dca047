"""Benchmarks: figures side by side in one run, never timed tests.

    python jobs/benchmark.py model-parallel [--quick]   # reference vs two towers vs micro-batches
    python jobs/benchmark.py data [--quick] [--replicas 1 4 16]  # DataLoader baseline vs Ray Data pipeline; read amplification
    python jobs/benchmark.py end-to-end [--quick]       # Trainer.fit() vs a plain torch.multiprocessing loop
    python jobs/benchmark.py soak [--quick]             # worker memory over many epochs
    python jobs/benchmark.py prepare [--images N]       # prepare vs a plain multiprocessing.Pool

Each prints a table and, as its last line, one JSON object with the figures.
"""

import importlib
import sys

BENCHMARKS = {
    "model-parallel": "alexnet_ray.benchmarks.model_parallel",
    "data": "alexnet_ray.benchmarks.data",
    "end-to-end": "alexnet_ray.benchmarks.end_to_end",
    "soak": "alexnet_ray.benchmarks.soak",
    "prepare": "alexnet_ray.benchmarks.prepare",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        print(f"choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
