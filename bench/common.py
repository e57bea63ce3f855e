"""Helpers shared by the benchmarks: results, timing, fresh directories, machine facts."""

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(REPO, "tests", "fakes")
MiB = 1 << 20


class Row:
    """One line of the results table: our figure beside the baseline's.

    ``ratio`` is oriented so that ``ratio <op> target`` means the target is
    met: ``">="`` for speed-ups (ours over the baseline), ``"<="`` for
    slow-downs (growth, wall time over a budget). ``target`` None marks a row
    that is shown for information only.
    """

    def __init__(self, name, ours, baseline, unit, ratio, target=None, op=">=",
                 baseline_name="", note="", samples=None):
        self.name, self.ours, self.baseline, self.unit = name, ours, baseline, unit
        self.ratio, self.target, self.op = ratio, target, op
        self.baseline_name, self.note = baseline_name, note
        self.samples = samples or {}

    @property
    def met(self):
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.op == ">=" else self.ratio <= self.target

    def as_dict(self):
        return {"name": self.name, "ours": self.ours, "baseline": self.baseline,
                "baseline_name": self.baseline_name, "unit": self.unit, "ratio": self.ratio,
                "target": self.target, "op": self.op, "met": self.met, "note": self.note,
                "samples": self.samples}


def rate_row(name, ours_rate, base_rate, unit, target, baseline_name, note="", samples=None):
    """A row comparing two rates (higher is better): ratio = ours / baseline."""
    return Row(name, ours_rate, base_rate, unit, ours_rate / base_rate, target, ">=",
               baseline_name, note, samples)


def best_rate(fn, count, repeat):
    """Run ``fn()`` ``repeat`` times; return (best rate in count/s, all rates)."""
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - started))
    return max(rates), rates


def timed(fn):
    """``(seconds, fn())``."""
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def settle():
    """Write back what earlier steps left dirty, so its writeback is not timed
    as part of whatever runs next."""
    os.sync()


class Workspace:
    """A fresh directory per benchmark under one run root.

    Nothing is deleted until the whole run is over (:meth:`cleanup`): on an
    ext4 disk without a journal, creating files right after a mass delete is
    slow, and would make whatever is timed next look slow.
    """

    def __init__(self, root=None, keep=False):
        self.root = tempfile.mkdtemp(prefix="cm-bench-", dir=root)
        self.keep = keep
        self._count = 0

    def fresh(self, name):
        settle()
        self._count += 1
        path = os.path.join(self.root, "%02d-%s" % (self._count, name))
        os.makedirs(path)
        return path

    def cleanup(self):
        if self.keep:
            print("kept the benchmark files in %s" % self.root)
            return
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def write_random_file(path, size, chunk=MiB):
    """Write ``size`` random bytes to ``path``."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


def write_small_files(directory, count, size, prefix="f"):
    """``count`` files of ``size`` random bytes each; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(directory, "%s%06d" % (prefix, i))
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        paths.append(path)
    return paths


def median(values):
    return statistics.median(values)


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def machine_facts(work_root):
    """What the figures were measured on."""
    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = _read("/proc/cpuinfo")
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    fs = ""
    try:
        out = subprocess.run(["df", "-T", work_root], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()
        if len(out) > 1:
            fs = out[1].split()[1]
    except (OSError, subprocess.SubprocessError):
        pass
    import sqlite3

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "sha_ni": " sha_ni " in flags,
        "memory_gib": round(mem_kb / 2 ** 20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "filesystem": fs,
        "work_dir": work_root,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
