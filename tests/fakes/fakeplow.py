"""Shared implementation of the fake ``plowup`` / ``plowdown`` executables.

The fakes imitate the Plowshare 2 command line tools closely enough for the
cloudmanager test-suite: same exit codes, same stdout conventions, and the
same dangerous option parsing (a URL that looks like an option *is* treated as
one by ``plowdown``).  No network is involved; "uploads" are stored under a
state directory.

State directory
    ``$FAKE_PLOWSHARE_DIR`` (required; the tools exit 1 if it is unset)::

        $DIR/store/<module>/<id>/<name>   uploaded bytes (<id> = 16 hex chars)
        $DIR/faults.json                  optional fault knobs (see below)
        $DIR/log.jsonl                    one JSON line per invocation:
                                          {"tool", "argv", "cwd"}

    Object URLs are ``http://<module>.fake/dl/<id>``; delete URLs are
    ``http://<module>.fake/del/<id>``; admin URLs are
    ``http://<module>.fake/adm/<id>``.  Module names match ``^[a-z0-9_]+$``.

Fault knobs
    ``faults.json`` maps a module name to a dict of knobs.  It is re-read on
    every invocation, so tests may change it between calls.  Keys:

    ``down`` (bool)
        Print an error to stderr and exit 3 (network error).
    ``slow`` (float, seconds)
        ``time.sleep`` this long before doing anything for that module
        (killable; meant for timeout tests).  Applied before ``down``.
    ``duration`` (float, seconds)
        Make each invocation for that module last at least this long in all,
        counted from the process's start (interpreter start-up included), by
        sleeping the rest before doing anything: a host that "takes 0.5 s"
        (for benchmarks).  Applied after ``slow``, before ``down``.
    ``corrupt_upload`` (bool)
        plowup stores the bytes with the first byte XORed with 0xFF
        (an empty file is stored as the single byte ``b"X"``).
    ``corrupt_download`` (bool)
        plowdown writes the bytes with the first byte XORed with 0xFF
        (an empty object is served as ``b"X"``).
    ``truncate_download`` (bool)
        plowdown writes only the first ``len(data) // 2`` bytes.
    ``empty_download`` (bool)
        plowdown exits 0 and prints the path it would have written, but
        writes nothing.
    ``print_path`` (str)
        plowdown prints this string instead of the real final path (the real
        file is still written).
    ``plowup_links`` (str)
        Which links plowup prints for each stored file, and in which order:
        comma-separated ``del`` (``#DEL <delete URL>``), ``adm``
        (``#ADM <admin URL>``) and ``dl`` (the download URL).  The default is
        ``del,dl``.  ``del`` alone imitates a module that only reports a
        delete link; ``dl,adm`` puts the admin link last.
    ``grow_download`` (int, bytes)
        plowdown ignores the stored bytes and writes this many bytes instead,
        slowly: ``GROW_CHUNK`` bytes every ``GROW_DELAY`` seconds, flushed
        each time (a large object arriving over the network).  After each
        chunk it records the bytes written so far in
        ``$DIR/progress/<pid>`` (see :func:`read_progress`).

Exit codes (Plowshare 2): 0 ok, 1 fatal, 2 no module, 3 network error,
8 system error, 13 link dead, 15 bad command line.  With several
FILE/URL arguments the result is aggregated like Plowshare does: the single
item's code when there is one item, otherwise 0 if all succeeded, else
100 + the first non-zero code.

Test helpers: :func:`set_faults`, :func:`clear_faults`, :func:`read_log`,
:func:`stored_objects`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ENV_VAR = "FAKE_PLOWSHARE_DIR"

ERR_OK = 0
ERR_FATAL = 1
ERR_NOMODULE = 2
ERR_NETWORK = 3
ERR_SYSTEM = 8
ERR_LINK_DEAD = 13
ERR_BAD_COMMAND_LINE = 15
ERR_FATAL_MULTIPLE = 100

MODULE_RE = re.compile(r"[a-z0-9_]+")
ID_RE = re.compile(r"[0-9a-f]{16}")
URL_PATH_RE = re.compile(r"/dl/([^/]+)")

FAULT_KEYS = {
    "down": bool,
    "corrupt_upload": bool,
    "corrupt_download": bool,
    "slow": (int, float),
    "duration": (int, float),
    "empty_download": bool,
    "truncate_download": bool,
    "print_path": str,
    "plowup_links": str,
    "grow_download": int,
}

#: ``grow_download`` writes this many bytes at a time, then sleeps ``GROW_DELAY``.
GROW_CHUNK = 256 << 10
GROW_DELAY = 0.01
PLOWUP_LINKS = ("del", "adm", "dl")


class Exit(Exception):
    """Raised to stop processing with a Plowshare exit code."""

    def __init__(self, code: int, message: str | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------
# Test-side helpers
# ---------------------------------------------------------------------------

def _faults_path(state_dir) -> Path:
    return Path(state_dir) / "faults.json"


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def set_faults(state_dir, module: str, **faults) -> dict:
    """Merge ``faults`` into the knobs of ``module``; returns the module's knobs.

    Passing ``None`` as a value removes that knob.  Unknown knob names or
    wrongly typed values raise ``ValueError``.
    """
    if not MODULE_RE.fullmatch(module):
        raise ValueError(f"invalid module name {module!r}")
    for key, value in faults.items():
        if key not in FAULT_KEYS:
            raise ValueError(f"unknown fault {key!r}; known: {sorted(FAULT_KEYS)}")
        if value is not None and (
            not isinstance(value, FAULT_KEYS[key])
            or (FAULT_KEYS[key] is not bool and isinstance(value, bool))
        ):
            raise ValueError(f"fault {key!r} has wrong type: {value!r}")
    path = _faults_path(state_dir)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    knobs = dict(data.get(module, {}))
    for key, value in faults.items():
        if value is None:
            knobs.pop(key, None)
        else:
            knobs[key] = value
    data[module] = knobs
    _write_json_atomic(path, data)
    return knobs


def clear_faults(state_dir) -> None:
    """Remove every fault (deletes faults.json)."""
    try:
        _faults_path(state_dir).unlink()
    except FileNotFoundError:
        pass


def read_log(state_dir) -> list[dict]:
    """Return the invocation log as a list of dicts, oldest first."""
    path = Path(state_dir) / "log.jsonl"
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_progress(state_dir) -> dict[int, int]:
    """Bytes each ``grow_download`` run had written, by plowdown's pid."""
    base = Path(state_dir) / "progress"
    if not base.is_dir():
        return {}
    return {int(p.name): int(p.read_text(encoding="ascii")) for p in base.iterdir()
            if p.name.isdigit()}


def stored_objects(state_dir, module: str) -> list[Path]:
    """Paths of stored objects of ``module`` (``store/<module>/<id>/<name>``), sorted."""
    base = Path(state_dir) / "store" / module
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob("*/*") if p.is_file())


# ---------------------------------------------------------------------------
# Tool-side plumbing
# ---------------------------------------------------------------------------

def _err(tool: str, message: str) -> None:
    sys.stderr.write(f"{tool}: {message}\n")
    sys.stderr.flush()


def _out(line: str) -> None:
    # Encode with surrogateescape so odd (non UTF-8) file names survive.
    sys.stdout.buffer.write(os.fsencode(line) + b"\n")
    sys.stdout.flush()


def _state_dir(tool: str) -> Path:
    value = os.environ.get(ENV_VAR)
    if not value:
        _err(tool, f"{ENV_VAR} is not set")
        raise SystemExit(ERR_FATAL)
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_invocation(state: Path, tool: str, argv: list[str]) -> None:
    record = {"tool": tool, "argv": argv, "cwd": os.getcwd()}
    data = (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
    fd = os.open(state / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)  # also releases the lock


def _load_faults(state: Path) -> dict:
    path = state / "faults.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Exit(ERR_FATAL, f"invalid {path}: {exc}")
    if not isinstance(data, dict):
        raise Exit(ERR_FATAL, f"invalid {path}: top level must be an object")
    return data


def _module_faults(faults: dict, module: str) -> dict:
    knobs = faults.get(module) or {}
    return knobs if isinstance(knobs, dict) else {}


def _apply_common_faults(tool: str, module: str, knobs: dict) -> None:
    slow = knobs.get("slow")
    if slow:
        time.sleep(float(slow))
    duration = knobs.get("duration")
    if duration:
        time.sleep(max(0.0, float(duration) - _elapsed_since_start()))
    if knobs.get("down"):
        raise Exit(ERR_NETWORK, f"{module}: network error (couldn't connect to {module}.fake)")


_IMPORTED = time.monotonic()


def _elapsed_since_start() -> float:
    """Seconds since this process started, never more than the truth.

    From the kernel's start time (in clock ticks since boot, rounded down,
    so one tick is added); without /proc, since this module was imported.
    """
    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - (ticks + 1) / hz)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


def _aggregate(retvals: list[int]) -> int:
    if not retvals:
        return ERR_OK
    if len(retvals) == 1:
        return retvals[0]
    errors = [r for r in retvals if r != 0]
    return ERR_FATAL_MULTIPLE + errors[0] if errors else ERR_OK


def _flip_first(data: bytes) -> bytes:
    if not data:
        return b"X"
    return bytes([data[0] ^ 0xFF]) + data[1:]


def _run(tool: str, main, argv: list[str]) -> int:
    state = _state_dir(tool)
    _log_invocation(state, tool, argv)
    try:
        return main(state, argv)
    except Exit as exc:
        if exc.message:
            _err(tool, exc.message)
        return exc.code


# ---------------------------------------------------------------------------
# plowup
# ---------------------------------------------------------------------------

def _split_dest(arg: str) -> tuple[str, str]:
    """FILE[:DESTNAME] -> (file, destname); split on the last ':' only if the
    remainder contains no '/'."""
    head, sep, tail = arg.rpartition(":")
    if sep and "/" not in tail:
        file, dest = head, tail
    else:
        file, dest = arg, ""
    if dest in ("", ".", ".."):
        dest = os.path.basename(file.rstrip("/")) or file
    return file, dest


def _parse_plowup_args(argv: list[str]) -> list[str]:
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals.extend(argv[i:])
            break
        if arg.startswith("--"):
            continue  # --name=value or --flag: ignored (lenient)
        if arg.startswith("-") and arg != "-":
            if arg == "-v":
                if i >= len(argv):
                    raise Exit(ERR_BAD_COMMAND_LINE, "option -v requires an argument")
                i += 1
            continue  # -q, -vLEVEL, other short options: ignored
        positionals.append(arg)
    return positionals


def _plowup_links(knobs: dict) -> list[str]:
    spec = knobs.get("plowup_links") or "del,dl"
    links = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [link for link in links if link not in PLOWUP_LINKS]
    if unknown:
        raise Exit(ERR_FATAL, f"invalid plowup_links {spec!r}: {unknown}")
    return links


def _plowup(state: Path, argv: list[str]) -> int:
    positionals = _parse_plowup_args(argv)
    if not positionals:
        raise Exit(ERR_BAD_COMMAND_LINE, "no module specified")
    module, items = positionals[0], positionals[1:]
    if not items:
        raise Exit(ERR_BAD_COMMAND_LINE, "no file specified")
    if not MODULE_RE.fullmatch(module):
        raise Exit(ERR_NOMODULE, f"unsupported module ({module})")

    knobs = _module_faults(_load_faults(state), module)
    _apply_common_faults("plowup", module, knobs)

    retvals: list[int] = []
    for item in items:
        file, dest = _split_dest(item)
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            _err("plowup", f"skip: cannot read {file!r}: {exc.strerror}")
            retvals.append(ERR_SYSTEM)
            continue
        if knobs.get("corrupt_upload"):
            data = _flip_first(data)
        base = state / "store" / module
        base.mkdir(parents=True, exist_ok=True)
        while True:
            obj_id = secrets.token_hex(8)
            try:
                (base / obj_id).mkdir()
                break
            except FileExistsError:
                continue
        target = base / obj_id / dest
        tmp = base / obj_id / f".{dest}.uploading"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            _err("plowup", f"cannot store {dest!r}: {exc.strerror}")
            retvals.append(ERR_FATAL)
            continue
        links = {"del": f"#DEL http://{module}.fake/del/{obj_id}",
                 "adm": f"#ADM http://{module}.fake/adm/{obj_id}",
                 "dl": f"http://{module}.fake/dl/{obj_id}"}
        for which in _plowup_links(knobs):
            _out(links[which])
        retvals.append(ERR_OK)
    return _aggregate(retvals)


# ---------------------------------------------------------------------------
# plowdown
# ---------------------------------------------------------------------------

def _parse_plowdown_args(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"output_dir": None, "temp_rename": False, "run_after": None}
    urls: list[str] = []
    i = 0

    def need_value(name: str) -> str:
        nonlocal i
        if i >= len(argv):
            raise Exit(ERR_BAD_COMMAND_LINE, f"option {name} requires an argument")
        value = argv[i]
        i += 1
        return value

    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            urls.extend(argv[i:])
            break
        if not arg.startswith("-"):
            urls.append(arg)
        elif arg == "-o":
            opts["output_dir"] = need_value("-o")
        elif arg.startswith("-o") and not arg.startswith("--"):
            opts["output_dir"] = arg[2:]
        elif arg.startswith("--output-directory="):
            opts["output_dir"] = arg.split("=", 1)[1]
        elif arg == "--output-directory":
            opts["output_dir"] = need_value(arg)
        elif arg == "--temp-rename":
            opts["temp_rename"] = True
        elif arg.startswith("--run-after="):
            opts["run_after"] = arg.split("=", 1)[1]
        elif arg == "--run-after":
            opts["run_after"] = need_value(arg)
        elif arg == "-q":
            pass
        elif arg == "-v":
            need_value("-v")
        elif arg.startswith("-v") and not arg.startswith("--"):
            pass
        else:
            raise Exit(ERR_BAD_COMMAND_LINE, f"unknown option: {arg}")
    return opts, urls


def _download_one(state: Path, faults: dict, url: str, opts: dict, out_dir: str) -> int:
    parts = urlsplit(url)
    host = parts.hostname or ""
    module = host[: -len(".fake")] if host.endswith(".fake") else ""
    m = URL_PATH_RE.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not MODULE_RE.fullmatch(module) or not m:
        _err("plowdown", f"skip: no module for URL ({url})")
        return ERR_NOMODULE

    knobs = _module_faults(faults, module)
    try:
        _apply_common_faults("plowdown", module, knobs)
    except Exit as exc:
        _err("plowdown", exc.message or "error")
        return exc.code

    obj_id = m.group(1)
    obj_dir = state / "store" / module / obj_id
    names = (
        [p for p in obj_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
        if ID_RE.fullmatch(obj_id) and obj_dir.is_dir()
        else []
    )
    if not names:
        _err("plowdown", f"link is not alive: {url}")
        return ERR_LINK_DEAD
    stored = names[0]
    name = stored.name
    final_path = os.path.join(out_dir, name) if out_dir else name

    if knobs.get("empty_download"):
        printed = knobs.get("print_path") or final_path
        _out(printed)
        _run_after(opts, module, url, printed)
        return ERR_OK

    write_path = final_path + ".part" if opts["temp_rename"] else final_path
    if knobs.get("grow_download"):
        return _grow(state, write_path, final_path, opts, int(knobs["grow_download"]))

    data = stored.read_bytes()
    if knobs.get("corrupt_download"):
        data = _flip_first(data)
    if knobs.get("truncate_download"):
        data = data[: len(data) // 2]

    try:
        with open(write_path, "wb") as fh:
            fh.write(data)
        if opts["temp_rename"]:
            os.replace(write_path, final_path)
    except OSError as exc:
        _err("plowdown", f"cannot write {write_path!r}: {exc.strerror}")
        return ERR_SYSTEM

    printed = knobs.get("print_path") or final_path
    _out(printed)
    _run_after(opts, module, url, printed)
    return ERR_OK


def _grow(state: Path, write_path: str, final_path: str, opts: dict, total: int) -> int:
    """Write ``total`` bytes slowly, recording the progress after each chunk."""
    progress = state / "progress"
    progress.mkdir(exist_ok=True)
    record = progress / str(os.getpid())
    chunk = b"\0" * GROW_CHUNK
    written = 0
    try:
        with open(write_path, "wb") as fh:
            while written < total:
                piece = chunk[: min(GROW_CHUNK, total - written)]
                fh.write(piece)
                fh.flush()  # on disk (in the page cache) now, as curl's writes are
                written += len(piece)
                _write_json_atomic(record, written)
                time.sleep(GROW_DELAY)
        if opts["temp_rename"]:
            os.replace(write_path, final_path)
    except OSError as exc:
        _err("plowdown", f"cannot write {write_path!r}: {exc.strerror}")
        return ERR_SYSTEM
    _out(final_path)
    return ERR_OK


def _run_after(opts: dict, module: str, url: str, path: str) -> None:
    program = opts["run_after"]
    if not program:
        return
    try:
        # Keep our stdout clean: the program's stdout goes to our stderr.
        subprocess.run([program, module, url, path], stdout=sys.stderr, check=False)
    except OSError as exc:
        _err("plowdown", f"cannot run {program!r}: {exc.strerror}")


def _plowdown(state: Path, argv: list[str]) -> int:
    opts, urls = _parse_plowdown_args(argv)
    if not urls:
        raise Exit(ERR_BAD_COMMAND_LINE, "no URL specified!")
    out_dir = opts["output_dir"]
    if out_dir is not None and not os.path.isdir(out_dir):
        raise Exit(ERR_SYSTEM, f"output directory does not exist: {out_dir}")
    faults = _load_faults(state)
    retvals = [_download_one(state, faults, url, opts, out_dir or "") for url in urls]
    return _aggregate(retvals)


def plowup_main(argv: list[str] | None = None) -> int:
    return _run("plowup", _plowup, sys.argv[1:] if argv is None else argv)


def plowdown_main(argv: list[str] | None = None) -> int:
    return _run("plowdown", _plowdown, sys.argv[1:] if argv is None else argv)
