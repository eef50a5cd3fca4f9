"""`make bench` (``python -m bench soak``): the full soak, 10 minutes of load under a
seeded random fault schedule (``lensflow soak``, issue 23), run as the command line runs
it. The seed is drawn anew each time and recorded: ``lensflow soak --seed N`` replays the
same schedule. ``make test`` runs 75 s of it with a fixed seed (tests/test_soak.py).

``python -m bench.soak_bench [--seed N] [--duration S]`` runs one soak on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from bench.common import write_json

DURATION_S = 600.0


def soak(seed: int, duration_s: float = DURATION_S) -> dict:
    """One ``lensflow soak --json``: its result, with the exit code."""
    done = subprocess.run(
        [sys.executable, "-m", "lensflow", "soak", "--json"]
        + ["--seed", str(seed), "--duration", f"{duration_s:g}"],
        capture_output=True,
        text=True,
        timeout=duration_s + 1800,
    )
    try:
        result = json.loads(done.stdout)
    except ValueError:
        result = {"seed": seed, "error": done.stderr.strip().splitlines()[-1:]}
    return {**result, "exit_code": done.returncode}


def run(out_dir: Path, seed: int | None = None, duration_s: float = DURATION_S) -> dict:
    seed = seed if seed is not None else random.SystemRandom().randrange(1_000_000)
    result = soak(seed, duration_s)
    result["targets"] = {
        f"soak seed {seed}: nothing lost": result.get("lost") == 0,
        f"soak seed {seed}: no invariant broken": result.get("invariants_broken") == [],
    }
    write_json(out_dir, "soak", result)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_bench", description=__doc__)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--duration", type=float, default=DURATION_S)
    args = parser.parse_args(argv)
    result = run(Path(__file__).parent / "results", args.seed, args.duration)
    print(json.dumps({k: result.get(k) for k in ("seed", "sent", "lost", "exit_code")}))
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
