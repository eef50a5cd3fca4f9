"""usable_cpus: the affinity mask and the cgroup CPU quota, not the machine's CPU count."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from lensflow_core.cpus import cgroup_cpu_limit, usable_cpus


def _cgroup(tmp_path: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return root, proc


def test_a_cgroup_v2_quota_rounds_up_to_whole_cpus(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {"cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "150000 100000\n"},
        "0::/kubepods/pod1\n",
    )
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_the_tightest_quota_on_the_path_wins_and_max_is_no_limit(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {"a/cpu.max": "50000 100000\n", "a/b/cpu.max": "max 100000\n"},
        "0::/a/b\n",
    )
    assert cgroup_cpu_limit(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1
    unlimited, proc = _cgroup(tmp_path / "u", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(unlimited, proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        {"cpu/docker/x/cpu.cfs_quota_us": "100000\n", "cpu/docker/x/cpu.cfs_period_us": "100000"},
        "4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n",
    )
    assert cgroup_cpu_limit(root, proc) == 1.0
    none, proc = _cgroup(
        tmp_path / "n",
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000"},
        "4:cpu:/\n",
    )
    assert cgroup_cpu_limit(none, proc) is None


def test_the_affinity_mask_counts_not_the_machine(tmp_path):
    root, proc = _cgroup(tmp_path, {}, "0::/\n")
    seen = []

    def pinned() -> None:  # affinity of this thread only
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        seen.append(usable_cpus(root, proc))

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen == [1]
    assert usable_cpus(root, proc) == len(os.sched_getaffinity(0))
