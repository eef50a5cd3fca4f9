"""`make bench`: run every benchmark, write bench/results/*.json and plots, print a summary.

`python -m bench [NAME ...]` runs only the named ones (predict, e2e, train, knative_autoscaler).
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
    "e2e": "bench.e2e_bench",
    "train": "bench.train_bench",
    "knative_autoscaler": "bench.knative_autoscaler",
}


def main(names: list[str]) -> int:
    chosen = names or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    summary: dict[str, dict] = {}
    for name in chosen:
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            print(f"[{name}] not available: {exc}")
            summary[name] = {"error": f"not available: {exc}"}
            continue
        print(f"[{name}] running ...", flush=True)
        started = time.perf_counter()
        result = module.run(OUT)
        result["bench_seconds"] = round(time.perf_counter() - started, 1)
        summary[name] = result
        print(f"[{name}] done in {result['bench_seconds']} s: {OUT / (name + '.json')}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for name, result in summary.items():
        targets = result.get("targets", {})
        for target, met in targets.items():
            print(f"  {name}: {target}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
