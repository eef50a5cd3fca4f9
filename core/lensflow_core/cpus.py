"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota.

``os.cpu_count()`` counts the machine's CPUs. A process pinned with ``taskset`` may run on
fewer, and a container with a CPU limit (Kubernetes ``resources.limits.cpu``: cgroup v2
``cpu.max``, or v1 ``cpu.cfs_quota_us``) gets only ``quota / period`` CPU-seconds per
second however many cores it sees. Threads sized from ``os.cpu_count()`` then
oversubscribe the CPU the process actually has. ``usable_cpus`` is the smaller of the
two: the predict function sizes its LiteRT interpreters by it, and training may bind
TensorFlow's thread pools to it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may use: ``min(affinity, ceil(cgroup quota / period))``, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup or Path("/proc/self/cgroup"))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_limit(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors; None if
    unlimited. Reads cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    limits = []
    for directory in _cgroup_dirs(cgroup_root, proc_cgroup):
        limit = _v2_limit(directory / "cpu.max")
        if limit is None:
            limit = _v1_limit(directory)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup directory and its ancestors up to ``root`` (root included)."""
    relatives = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            # "0::/kubepods/pod1/abc" (v2) or "4:cpu,cpuacct:/docker/abc" (v1)
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                relatives.append((controllers, path.strip("/")))
    except (OSError, ValueError):
        pass
    dirs = [root]
    for controllers, path in relatives:
        # v1 mounts the controller at cpu,cpuacct/ (and usually links cpu/ to it)
        bases = [root] if controllers == "" else [root / "cpu", root / controllers]
        parts = [p for p in path.split("/") if p]
        for base in bases:
            dirs += [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
