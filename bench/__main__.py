"""`make bench`: run every benchmark, write bench/results/*.json and plots, print a summary.

`python -m bench [NAME ...]` runs only the named ones (predict, isolated, queue, quant, e2e,
train, train_memory, learning, knative_autoscaler, archive, faults, soak); `summary.json` gathers the latest result
of every benchmark.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
BENCHMARKS = {
    "predict": "bench.predict_bench",
    "isolated": "bench.isolated_bench",
    "queue": "bench.queue_bench",
    "quant": "bench.quant_bench",
    "gap": "bench.gap_bench",
    "e2e": "bench.e2e_bench",
    "train": "bench.train_bench",
    "train_memory": "bench.train_memory_bench",
    "learning": "bench.learning_bench",
    "knative_autoscaler": "bench.knative_autoscaler",
    "faults": "bench.faults",
    "archive": "bench.archive_bench",
    "soak": "bench.soak_bench",
}


def main(names: list[str]) -> int:
    chosen = names or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    for name in chosen:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"[{name}] running ...", flush=True)
        started = time.perf_counter()
        module.run(OUT)
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)
    summary = {
        name: json.loads((OUT / f"{name}.json").read_text())
        for name in BENCHMARKS
        if (OUT / f"{name}.json").exists()
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for name in chosen:
        for target, met in summary[name].get("targets", {}).items():
            print(f"  {name}: {target}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
