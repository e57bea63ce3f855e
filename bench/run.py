"""Run cloudmanager's benchmarks, each beside its baseline measured in the same run.

    python bench/run.py [--quick] [--json FILE] [--markdown FILE] [--only NAME ...]

Prints one row per figure: ours, the baseline's, their ratio, the target and
whether it is met. ``--quick`` is a small smoke run (CI runs it): it exits 0
whatever the ratios, and fails only when a benchmark breaks. ``--markdown``
writes the table with the machine's facts (bench/RESULTS.md); text after a
``<!-- notes -->`` line in that file is kept.

Baselines that are libraries need the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import benchmarks  # noqa: E402
import encryption_bench  # noqa: E402
import postgres_bench  # noqa: E402
import cloudmanager  # noqa: E402
from common import Workspace, machine_facts  # noqa: E402

NAMES = ["large", "small", "lookups", "growth", "sync", "hosts", "startup", "miss",
         "postgres", "encryption"]


def run_all(cfg, only, ws):
    pools = benchmarks.PoolSet(ws)
    plan = {
        "large": lambda: benchmarks.large_ingest(ws, cfg),
        "small": lambda: benchmarks.small_ingest(ws, cfg),
        "lookups": lambda: benchmarks.lookups_and_hits(ws, cfg, pools),
        "growth": lambda: benchmarks.growth(ws, cfg, pools),
        "sync": lambda: benchmarks.node_sync(ws, cfg, pools),
        "hosts": lambda: benchmarks.parallel_hosts(ws, cfg),
        "startup": lambda: benchmarks.startup(ws, cfg),
        "miss": lambda: benchmarks.warm_up_miss(ws, cfg),
        "postgres": lambda: postgres_bench.postgres(ws, cfg),
        "encryption": lambda: encryption_bench.encryption(ws, cfg),
    }
    rows, errors, times = [], [], {}
    for name in NAMES:
        if only and name not in only:
            continue
        started = time.perf_counter()
        print("running %s..." % name, file=sys.stderr, flush=True)
        try:
            got = plan[name]()
        except Exception:  # report it, run the others, fail at the end
            errors.append((name, traceback.format_exc()))
            print(errors[-1][1], file=sys.stderr)
            continue
        times[name] = time.perf_counter() - started
        for row in got:
            print(format_row(row), flush=True)
        rows.extend(got)
    return rows, errors, times


def _fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return "%.1f" % value
    return "%.3g" % value


def _target(row):
    if row.target is None:
        return "-"
    return "%s %s" % ("≥" if row.op == ">=" else "≤", _fmt(row.target))


def _met(row):
    return {True: "yes", False: "NO", None: "-"}[row.met]


def format_row(row):
    return "%-52s %12s %12s %-7s %7s %7s %4s  %s" % (
        row.name, _fmt(row.ours), _fmt(row.baseline), row.unit, _fmt(row.ratio), _target(row),
        _met(row), row.baseline_name)


def markdown(rows, facts, cfg, quick, times):
    lines = ["# Benchmark results", "",
             "Produced by `python bench/run.py%s --markdown bench/RESULTS.md`; each figure is"
             " beside its baseline, measured in the same run on the same data (best of %d,"
             " interleaved)." % (" --quick" if quick else "", cfg["repeat"]), "",
             "## Machine", ""]
    for key, value in facts.items():
        lines.append("- %s: %s" % (key, value))
    lines += ["- seconds per benchmark: %s" % ", ".join(
        "%s %.0f" % (k, v) for k, v in times.items()), "",
        "## Results", "",
        "| benchmark | ours | baseline | unit | ratio | target | met | baseline is | note |",
        "|---|---:|---:|---|---:|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.name, _fmt(r.ours), _fmt(r.baseline), r.unit, _fmt(r.ratio), _target(r), _met(r),
            r.baseline_name, r.note))
    return "\n".join(lines) + "\n"


def compile_bytecode():
    """Write the package's bytecode before anything is timed.

    An installed package has it (pip compiles at install), but a checkout run
    with ``PYTHONDONTWRITEBYTECODE`` set (as on CI machines) would recompile
    every module in each ``cm`` process a benchmark starts: the process rows
    would time Python's compiler, not cloudmanager.
    """
    import compileall

    compileall.compile_dir(os.path.dirname(cloudmanager.__file__), quiet=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    parser.add_argument("--json", metavar="FILE", help="write every figure and sample as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these")
    parser.add_argument("--workdir", help="where the fresh directories go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark files")
    args = parser.parse_args(argv)
    cfg = benchmarks.QUICK if args.quick else benchmarks.FULL
    ws = Workspace(args.workdir, keep=args.keep)
    compile_bytecode()
    facts = machine_facts(ws.root)
    started = time.perf_counter()
    print("%-52s %12s %12s %-7s %7s %7s %4s  %s" % (
        "benchmark", "ours", "baseline", "unit", "ratio", "target", "met", "baseline is"))
    try:
        rows, errors, times = run_all(cfg, set(args.only or ()), ws)
    finally:
        ws.cleanup()  # only now: deleting a large tree slows what comes right after
    total = time.perf_counter() - started
    missed = [r for r in rows if r.met is False]
    print("\n%d figures, %d targets met, %d missed, %d benchmarks failed; %.0f s"
          % (len(rows), sum(1 for r in rows if r.met), len(missed), len(errors), total))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"quick": args.quick, "machine": facts, "seconds": total, "times": times,
                       "rows": [r.as_dict() for r in rows],
                       "errors": [{"benchmark": n, "traceback": t} for n, t in errors]},
                      f, indent=2)
    if args.markdown:
        notes = ""
        if os.path.exists(args.markdown):
            with open(args.markdown, encoding="utf-8") as f:
                text = f.read()
            if "<!-- notes -->" in text:
                notes = "\n<!-- notes -->" + text.split("<!-- notes -->", 1)[1]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(rows, facts, cfg, args.quick, times) + notes)
    # Ratios vary with the machine and its load: only a broken benchmark fails.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
