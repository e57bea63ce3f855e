"""cm beside the tools people pick instead: rclone, restic, git-annex and DVC (issue 16).

    python bench/peers.py [--quick] [--rounds N] [--workdir DIR] [--keep]
                          [--markdown FILE] [--json FILE]

Every figure is the wall time of whole processes (``python -m cloudmanager``
with a config file in a fresh directory, ``rclone``, ``restic``,
``git annex``, ``dvc``) on the same generated data, to a folder remote and to
moto's S3 server on loopback. Within each round every tool runs once per
workload, the tools' order rotated from one round to the next, so drift in
the machine's load hits them alike; the table gives each tool's median and
the ratio peer/cm (above 1, cm is faster), and names the fastest peer.

Each run is checked (the remote holds at least the data's bytes, every file
comes back, a sample of them byte for byte), so a broken invocation cannot
give a fast figure. A peer that is not installed is skipped with a note;
``CM_REQUIRE_PEERS=1`` makes a missing rclone or restic a failure (CI).
``--quick`` is a small smoke run: it exits 0 whatever the ratios, and fails
only when a workload breaks. ``--markdown FILE`` writes the "Against the
peers" section into FILE (bench/RESULTS.md), between its markers, keeping
the rest of the file.

Peers come from Debian (``apt-get install rclone restic git-annex``) and PyPI
(``dvc``: used when ``dvc`` is on PATH). Nothing reads the user's
configuration: HOME, the rclone config, the AWS variables and the restic
password all point into the run's directory.
"""

import argparse
import compileall
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (REPO, MiB, Row, Workspace, machine_facts, median, settle,  # noqa: E402
                    write_random_file, write_small_files)

#: The issue's scale, and a smoke run for CI (well under 2 minutes).
FULL = {"small_files": 10000, "small_size": 4096, "large_mib": 1024, "s3_files": 2000,
        "s3_size": 16384, "s3_large_mib": 512, "rounds": 3, "warm_up": True}
QUICK = {"small_files": 300, "small_size": 4096, "large_mib": 32, "s3_files": 100,
         "s3_size": 16384, "s3_large_mib": 16, "rounds": 1, "warm_up": False}

PEERS = ["rclone", "restic", "git-annex", "dvc"]
TOOLS = ["cm"] + PEERS
#: The peers CI insists on when CM_REQUIRE_PEERS=1.
REQUIRED = ("rclone", "restic")
#: A peer whose run takes longer than this many times cm's, and more than
#: SLOW_SECONDS, is not run again on that data set: git-annex takes minutes
#: on 10,000 files, and three rounds of it would triple the run for a
#: figure whose order of magnitude one run already gives. The table says so.
SLOW_FACTOR, SLOW_SECONDS = 10.0, 30.0
#: Seconds a single command may take before the run counts as broken.
COMMAND_TIMEOUT = 1800
#: Files compared byte for byte after each retrieval.
SAMPLE = 20

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


class BenchError(Exception):
    """A workload did not do its work: a command failed, or its result is wrong."""


# -- data ---------------------------------------------------------------------------

class Data:
    """A generated data set: a directory of files whose names are unique."""

    def __init__(self, root, label):
        self.root, self.label = root, label
        self.sizes = {e.name: e.stat().st_size for e in os.scandir(root) if e.is_file()}
        self.total = sum(self.sizes.values())

    @property
    def count(self):
        return len(self.sizes)

    def path(self, name):
        return os.path.join(self.root, name)


def make_data(ws, key, count, size, label):
    root = os.path.join(ws.fresh("data-" + key), "data")
    if count == 1:
        os.makedirs(root)
        write_random_file(os.path.join(root, "big.bin"), size)
    else:
        write_small_files(root, count, size, prefix=key[:1])
    return Data(root, label)


def same_bytes(a, b, rng):
    """Whether two files hold the same bytes: all of them up to 4 MiB, else
    the size, the first and last MiB and eight random MiB."""
    size = os.path.getsize(a)
    if os.path.getsize(b) != size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if size <= 4 * MiB:
            return fa.read() == fb.read()
        offsets = [0, size - MiB] + [rng.randrange(0, size - MiB) for _ in range(8)]
        for off in offsets:
            fa.seek(off)
            fb.seek(off)
            if fa.read(MiB) != fb.read(MiB):
                return False
    return True


def check_restored(data, found, what):
    """Every file of ``data`` is in ``found`` (name -> path), a sample byte for byte."""
    missing = [n for n in data.sizes if n not in found or not os.path.isfile(found[n])]
    if missing:
        raise BenchError("%s: %d of %d files not restored (e.g. %s)"
                         % (what, len(missing), data.count, missing[0]))
    rng = random.Random(len(found))
    for name in rng.sample(sorted(data.sizes), min(SAMPLE, data.count)):
        if not same_bytes(data.path(name), found[name], rng):
            raise BenchError("%s: %s came back with other bytes" % (what, name))


def files_under(root, skip=(".git", ".dvc")):
    """name -> path of every file under ``root`` (symbolic links included: git-annex)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            out[f] = os.path.join(dirpath, f)
    return out


def tree_bytes(root):
    """Bytes of the regular files under ``root`` (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total


# -- processes -------------------------------------------------------------------------

class Env:
    """The environment every process runs in: nothing of the user's."""

    def __init__(self, root):
        self.root = root
        home = os.path.join(root, "home")
        os.makedirs(home, exist_ok=True)
        with open(os.path.join(home, ".gitconfig"), "w", encoding="utf-8") as f:
            f.write("[user]\n\tname = bench\n\temail = bench@example.invalid\n"
                    "[init]\n\tdefaultBranch = main\n")
        self.rclone_config = os.path.join(root, "rclone.conf")
        open(self.rclone_config, "w").close()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RCLONE_", "RESTIC_", "DVC_", "GIT_", "XDG_"))}
        env.update(S3_CREDENTIALS)
        env.update({
            "HOME": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "RCLONE_CONFIG": self.rclone_config,
            # restic always encrypts; the password is the run's, not a secret.
            "RESTIC_PASSWORD": "bench",
            "AWS_CONFIG_FILE": os.path.join(root, "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(root, "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATE_CHECK": "1",
        })
        self.vars = env

    def run(self, argv, cwd=None, extra=None):
        """Run one command; its CompletedProcess, or BenchError with its stderr."""
        env = dict(self.vars, **(extra or {}))
        try:
            proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError("%s: %s" % (" ".join(argv[:4]), exc)) from exc
        if proc.returncode != 0:
            raise BenchError("%s exited %d: %s" % (" ".join(argv[:4]), proc.returncode,
                                                   (proc.stderr or proc.stdout)[-800:]))
        return proc


class Job:
    """Commands timed back to back (each ``(argv, cwd, extra_env)``), then ``check(outputs)``."""

    def __init__(self, commands, check):
        self.commands, self.check = commands, check


def time_job(env, job):
    settle()  # no run inherits another's dirty pages
    started = time.perf_counter()
    outs = [env.run(argv, cwd, extra) for argv, cwd, extra in job.commands]
    seconds = time.perf_counter() - started
    job.check(outs)
    return seconds


# -- the S3 server -------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto's S3 server in a subprocess on loopback, as tests/hosts/s3_server.py runs it."""

    def __init__(self, log_path):
        self.log_path, self.process, self.url = log_path, None, None

    def start(self, deadline=30.0):
        for _ in range(3):  # a port picked free may be taken before the server binds it
            port = free_port()
            self.url = "http://127.0.0.1:%d" % port
            with open(self.log_path, "ab") as log:  # a file: it logs every request
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, **S3_CREDENTIALS))
            end = time.monotonic() + deadline
            while time.monotonic() < end and self.process.poll() is None:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    opener.open(self.url + "/moto-api/", timeout=1).close()
                    return self.url
                except urllib.error.HTTPError:
                    return self.url
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise BenchError("moto's S3 server did not start (see %s)" % self.log_path)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(s3={"addressing_style": "path"}))

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Remote:
    """Where a tool's copies go: a folder, or a prefix of a bucket on the moto server."""

    def __init__(self, folder=None, moto=None, bucket=None, prefix=None):
        self.folder, self.moto, self.bucket, self.prefix = folder, moto, bucket, prefix

    @property
    def is_s3(self):
        return self.moto is not None

    def stored_bytes(self):
        if not self.is_s3:
            return tree_bytes(self.folder)
        client, total = self.moto.client(), 0
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/"):
            total += sum(item["Size"] for item in page.get("Contents", ()))
        return total


def check_stored(remote, data, what):
    got = remote.stored_bytes()
    if got < data.total:
        raise BenchError("%s: the remote holds %d bytes, less than the data's %d"
                         % (what, got, data.total))


# -- the tools ---------------------------------------------------------------------------

class Site:
    """One tool's copy of one data set in one round: its directory and its remote."""

    def __init__(self, tool, data, base, remote):
        self.tool, self.data, self.base, self.remote = tool, data, base, remote
        self.info = {}


class Tool:
    """How one tool is driven. ``up`` and ``down`` prepare (untimed) and return a Job."""

    name = ""
    exe = ""
    kinds = ("folder", "s3")

    def missing(self):
        return None if shutil.which(self.exe) else "not installed"

    def version(self, env):
        return ""

    def up(self, env, site):
        raise NotImplementedError

    def down(self, env, site, dest):
        raise NotImplementedError

    def check(self, env, site):
        return None  # no check of all copies


class Cm(Tool):
    name = "cm"

    def missing(self):
        return None

    def version(self, env):
        import cloudmanager

        try:
            rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            rev = ""
        return "cloudmanager %s (%s), fsync off" % (cloudmanager.__version__, rev or "?")

    def _cm(self, site, *args):
        return ([sys.executable, "-m", "cloudmanager", "--config", site.info["config"], "-q"]
                + list(args), site.base, None)

    def up(self, env, site):
        r = site.remote
        if r.is_s3:
            host = ('[hosts.s3]\nspec = "s3://%s/%s"\noptions = { endpoint_url = "%s", '
                    'region = "us-east-1", addressing_style = "path" }\n'
                    % (r.bucket, r.prefix, r.moto.url))
        else:
            os.makedirs(r.folder)
            # The folder host's own fsync off too: it is the remote rclone
            # and the others write to without syncing.
            host = '[hosts.folder]\nspec = "dir:%s"\noptions = { fsync = false }\n' % r.folder
        config = os.path.join(site.base, "cloudmanager.toml")
        with open(config, "w", encoding="utf-8") as f:
            # fsync off: rclone, git-annex and DVC do not sync what they write
            # either (restic does, per pack file: a few per data set).
            f.write('[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "8 GiB"\n'
                    'redundancy = 1\nfsync = false\n' + host)
        site.info["config"] = config

        def check(outs):
            hashes = {}
            trees = 0
            for line in outs[0].stdout.splitlines():
                digest, _, path = line.partition("  ")
                if path.endswith("/"):  # the directory's tree (a manifest, stored too)
                    trees += 1
                    continue
                hashes[os.path.basename(path)] = digest
            if sorted(hashes) != sorted(site.data.sizes):
                raise BenchError("cm upload printed %d of %d files"
                                 % (len(hashes), site.data.count))
            site.info["hashes"] = hashes
            site.info["trees"] = trees
            check_stored(site.remote, site.data, "cm upload")

        return Job([self._cm(site, "upload", site.data.root)], check)

    def down(self, env, site, dest):
        env.run(*self._cm(site, "evict")[:2])
        cache = os.path.join(site.base, "cache")
        if tree_bytes(cache) > site.data.total // 10:
            raise BenchError("cm evict left the cache full")
        hashes = site.info["hashes"]
        names = {h: n for n, h in hashes.items()}
        if site.data.count == 1:
            # One large file: written to a destination, like the peers do.
            (name, digest), = hashes.items()
            os.makedirs(dest)

            def check_one(outs):
                check_restored(site.data, {name: outs[0].stdout.strip()}, "cm download")

            return Job([self._cm(site, "download", digest, os.path.join(dest, name))],
                       check_one)

        def check(outs):
            found = {}
            for line in outs[0].stdout.splitlines():
                digest, _, path = line.partition("  ")
                found[names.get(digest, digest)] = path
            check_restored(site.data, found, "cm warm")

        # Many files: into the cache, where they are read from (one process).
        return Job([self._cm(site, "warm", *sorted(hashes.values()))], check)

    def check(self, env, site):
        def check(outs):
            summary = json.loads(outs[0].stdout)
            copies = site.data.count + site.info.get("trees", 0)  # the files and their tree
            if summary.get("checked") != copies or summary.get("good") != copies:
                raise BenchError("cm verify: %r for %d copies" % (summary, copies))

        return Job([self._cm(site, "verify", "--json")], check)


class Rclone(Tool):
    name = exe = "rclone"

    def version(self, env):
        return env.run(["rclone", "version"]).stdout.splitlines()[0]

    def _remote(self, site):
        r = site.remote
        if r.is_s3:
            return "moto:%s/%s" % (r.bucket, r.prefix)
        return r.folder

    def up(self, env, site):
        if site.remote.is_s3:
            write_rclone_s3(env, site.remote.moto)
        else:
            os.makedirs(site.remote.folder)
        return Job([(["rclone", "copy", site.data.root, self._remote(site)], site.base, None)],
                   lambda outs: check_stored(site.remote, site.data, "rclone copy"))

    def down(self, env, site, dest):
        os.makedirs(dest)
        return Job([(["rclone", "copy", self._remote(site), dest], site.base, None)],
                   lambda outs: check_restored(site.data, files_under(dest), "rclone copy"))

    def check(self, env, site):
        def check(outs):
            text = outs[0].stderr
            expected = "%d matching files" % site.data.count
            if expected not in text:
                raise BenchError("rclone check did not report %r: %s" % (expected, text[-500:]))

        return Job([(["rclone", "check", site.data.root, self._remote(site)], site.base, None)],
                   check)


def write_rclone_s3(env, moto):
    """The run's rclone config: one S3 remote, ``moto``, on the loopback server."""
    with open(env.rclone_config, "w", encoding="utf-8") as f:
        f.write("[moto]\ntype = s3\nprovider = Other\naccess_key_id = testing\n"
                "secret_access_key = testing\nregion = us-east-1\nendpoint = %s\n"
                "force_path_style = true\n" % moto.url)


class Restic(Tool):
    name = exe = "restic"

    def version(self, env):
        return env.run(["restic", "version"]).stdout.strip()

    def _repo(self, site):
        r = site.remote
        return "s3:%s/%s/%s" % (r.moto.url, r.bucket, r.prefix) if r.is_s3 else r.folder

    def _extra(self, site):
        return {"RESTIC_CACHE_DIR": os.path.join(site.base, "restic-cache")}

    def up(self, env, site):
        env.run(["restic", "-q", "-r", self._repo(site), "init"], site.base, self._extra(site))
        return Job([(["restic", "-q", "-r", self._repo(site), "backup", site.data.root],
                     site.base, self._extra(site))],
                   lambda outs: check_stored(site.remote, site.data, "restic backup"))

    def down(self, env, site, dest):
        return Job([(["restic", "-q", "-r", self._repo(site), "restore", "latest",
                      "--target", dest], site.base, self._extra(site))],
                   lambda outs: check_restored(site.data, files_under(dest), "restic restore"))


class GitAnnex(Tool):
    name = "git-annex"
    exe = "git-annex"
    kinds = ("folder",)

    def version(self, env):
        return "git-annex " + env.run(["git", "annex", "version", "--raw"]).stdout.strip()

    def up(self, env, site):
        repo = os.path.join(site.base, "repo")
        os.makedirs(repo)
        os.makedirs(site.remote.folder)
        for argv in (["git", "init", "-q"], ["git", "annex", "init", "-q", "bench"],
                     ["git", "annex", "initremote", "-q", "folder", "type=directory",
                      "directory=" + site.remote.folder, "encryption=none"]):
            env.run(argv, repo)
        # Its files must be in the work tree; `add` moves them into the annex.
        shutil.copytree(site.data.root, os.path.join(repo, "data"))
        return Job([(["git", "annex", "add", "-q", "data"], repo, None),
                    (["git", "annex", "copy", "-q", "--to", "folder", "data"], repo, None)],
                   lambda outs: check_stored(site.remote, site.data, "git annex copy"))

    def down(self, env, site, dest):
        repo = os.path.join(site.base, "repo")
        env.run(["git", "annex", "drop", "-q", "--force", "data"], repo)
        if tree_bytes(os.path.join(repo, ".git", "annex", "objects")) > site.data.total // 10:
            raise BenchError("git annex drop left the content")
        return Job([(["git", "annex", "get", "-q", "data"], repo, None)],
                   lambda outs: check_restored(site.data, files_under(os.path.join(repo, "data")),
                                               "git annex get"))


class Dvc(Tool):
    name = exe = "dvc"
    kinds = ("folder",)

    def version(self, env):
        return "dvc " + env.run(["dvc", "--version"]).stdout.strip()

    def up(self, env, site):
        repo = os.path.join(site.base, "repo")
        os.makedirs(repo)
        os.makedirs(site.remote.folder)
        for argv in (["git", "init", "-q"], ["dvc", "init", "-q"],
                     ["dvc", "remote", "add", "-q", "-d", "folder", site.remote.folder]):
            env.run(argv, repo)
        shutil.copytree(site.data.root, os.path.join(repo, "data"))
        return Job([(["dvc", "add", "-q", "data"], repo, None),
                    (["dvc", "push", "-q"], repo, None)],
                   lambda outs: check_stored(site.remote, site.data, "dvc push"))

    def down(self, env, site, dest):
        repo = os.path.join(site.base, "repo")
        # Its eviction: the work tree and the cache moved aside, not deleted
        # (creating files right after a mass delete is slow on this disk).
        os.rename(os.path.join(repo, "data"), os.path.join(site.base, "data.gone"))
        os.rename(os.path.join(repo, ".dvc", "cache"), os.path.join(site.base, "cache.gone"))
        return Job([(["dvc", "pull", "-q"], repo, None)],
                   lambda outs: check_restored(site.data, files_under(os.path.join(repo, "data")),
                                               "dvc pull"))


ALL_TOOLS = {t.name: t for t in (Cm(), Rclone(), Restic(), GitAnnex(), Dvc())}


# -- the workloads ---------------------------------------------------------------------

class Group:
    """A data set sent up to one kind of remote and brought back: two rows, and on
    S3 with many files a third, the check of every copy."""

    def __init__(self, key, kind, data, up_label, down_label, check_label=None):
        self.key, self.kind, self.data = key, kind, data
        self.labels = {"up": up_label, "down": down_label}
        if check_label:
            self.labels["check"] = check_label


class Results:
    """Samples per (group, step) and tool, and why a tool has none."""

    def __init__(self):
        self.samples = {}  # (group key, step) -> tool -> [seconds]
        self.notes = {}  # (group key, step) -> tool -> note
        self.capped = set()  # (group key, tool): too slow to repeat
        self.errors = []

    def add(self, key, tool, seconds):
        self.samples.setdefault(key, {}).setdefault(tool, []).append(seconds)


def run_group(env, ws, group, rnd, order, results, moto, log=True):
    """One round of one group: every tool up, then every tool down (then the
    check), each step alternating the tools in ``order``."""
    base = ws.fresh("r%d-%s" % (rnd, group.key))
    bucket = None
    if group.kind == "s3":
        bucket = "peers-r%d-%s" % (rnd, group.key.replace("_", "-"))
        moto.client().create_bucket(Bucket=bucket)
    sites = {}
    tools = []
    for name in order:
        tool = ALL_TOOLS[name]
        if group.kind not in tool.kinds or tool.missing() or (group.key, name) in results.capped:
            continue
        tools.append(name)
        tbase = os.path.join(base, name)
        os.makedirs(tbase)
        remote = Remote(moto=moto, bucket=bucket, prefix=name) if group.kind == "s3" \
            else Remote(folder=os.path.join(tbase, "remote"))
        sites[name] = Site(tool, group.data, tbase, remote)
    took = {}  # tool -> step -> seconds, this round
    for step in group.labels:
        for name in list(tools):
            if name not in sites:
                continue  # its upload failed
            site, tool = sites[name], ALL_TOOLS[name]
            try:
                if step == "up":
                    job = tool.up(env, site)
                elif step == "down":
                    job = tool.down(env, site, os.path.join(site.base, "restored"))
                else:
                    job = tool.check(env, site)
                if job is None:
                    continue
                seconds = time_job(env, job)
            except BenchError as exc:
                results.errors.append("round %d, %s %s, %s: %s" % (rnd, group.key, step, name,
                                                                    exc))
                print("  FAILED: %s" % results.errors[-1], file=sys.stderr, flush=True)
                del sites[name]
                continue
            results.add((group.key, step), name, seconds)
            took.setdefault(name, {})[step] = seconds
            if log:
                print("  round %d %-12s %-5s %-9s %8.2f s" % (rnd, group.key, step, name,
                                                               seconds), file=sys.stderr,
                      flush=True)
    cm_took = took.get("cm", {})
    for name, steps in took.items():
        if any(t > SLOW_SECONDS and step in cm_took and t > SLOW_FACTOR * cm_took[step]
               for step, t in steps.items()):
            results.capped.add((group.key, name))
    # Free what the next group would trip over: large files on the disk,
    # objects in the server's memory. A few large files delete quickly;
    # many small ones stay until the end (see Workspace).
    if group.data.count == 1:
        shutil.rmtree(base, ignore_errors=True)
    if bucket:
        empty_bucket(moto, bucket)


def empty_bucket(moto, bucket):
    client = moto.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000],
                                                         "Quiet": True})


GROUP_NAMES = ("folder_small", "folder_large", "s3_small", "s3_large")


def make_groups(ws, cfg, only=None):
    """The workloads, each with its generated data; ``only``: these names."""
    n, size = cfg["small_files"], cfg["small_size"]
    s3n, s3size = cfg["s3_files"], cfg["s3_size"]
    big, s3big = cfg["large_mib"], cfg["s3_large_mib"]

    def mib(m):
        return "1 GiB" if m == 1024 else "%d MiB" % m

    small = f"{n:,} × {size // 1024} KiB"
    s3small = f"{s3n:,} × {s3size // 1024} KiB"
    # name, kind, (data directory, count, size, label), row titles
    specs = [
        ("folder_small", "folder", ("small", n, size, small),
         ["%s to a folder remote" % small,
          "%s back from it (cm: `evict`, then `warm`)" % small]),
        ("folder_large", "folder", ("large", 1, big * MiB, mib(big)),
         ["%s file to a folder remote" % mib(big),
          "%s file back (cm: `evict`, then `download`)" % mib(big)]),
        ("s3_small", "s3", ("s3small", s3n, s3size, s3small),
         ["S3 (moto on loopback), %s up" % s3small,
          "S3, %s down (cm: `evict`, then `warm`)" % s3small,
          "check %s S3 copies (`cm verify` vs `rclone check`)" % f"{s3n:,}"]),
        ("s3_large", "s3", ("s3large", 1, s3big * MiB, mib(s3big)),
         ["S3, %s file up" % mib(s3big),
          "S3, %s file down (cm: `evict`, then `download`)" % mib(s3big)]),
    ]
    # Only the data of the workloads run is made (a full run's is 1.5 GiB).
    return [Group(name, kind, make_data(ws, *data), *titles)
            for name, kind, data, titles in specs if name in (only or GROUP_NAMES)]


def warm_up(env, ws, moto):
    """Each tool once on a few files, untimed: binaries and Python modules read
    from disk before the first timed run."""
    data = make_data(ws, "warmup", 20, 4096, "warm-up")
    results = Results()
    for kind in ("folder", "s3"):
        group = Group("warmup_" + kind, kind, data, "", "", "check" if kind == "s3" else None)
        run_group(env, ws, group, 0, TOOLS, results, moto, log=False)
    if results.errors:
        raise BenchError("warm-up: " + "; ".join(results.errors))


# -- results ------------------------------------------------------------------------------

def _s(seconds):
    return "-" if seconds is None else ("%.3g s" % seconds if seconds < 10 else "%.1f s" % seconds)


def build_rows(groups, results, missing):
    """One :class:`Row` per workload: cm's median beside the fastest peer's."""
    rows = []
    for group in groups:
        for step, label in group.labels.items():
            samples = results.samples.get((group.key, step), {})
            meds = {t: median(v) for t, v in samples.items()}
            peers = {t: s for t, s in meds.items() if t != "cm"}
            fastest = min(peers, key=peers.get) if peers else None
            ours = meds.get("cm")
            theirs = peers.get(fastest) if fastest else None
            ratio = theirs / ours if ours and theirs else None
            target = 1.5 if step == "check" else 1.0
            cells, notes = {}, []
            for t in TOOLS:
                if t in meds:
                    cells[t] = _s(meds[t]) if t == "cm" or not ours else \
                        "%s (%.2fx)" % (_s(meds[t]), meds[t] / ours)
                    if len(samples[t]) < max(len(v) for v in samples.values()):
                        notes.append("%s: %d run%s (too slow to repeat)"
                                     % (t, len(samples[t]), "" if len(samples[t]) == 1 else "s"))
                elif t in missing:
                    cells[t] = "skipped: %s" % missing[t]
                elif group.kind not in ALL_TOOLS[t].kinds or (step == "check" and t != "cm"
                                                               and t != "rclone"):
                    cells[t] = "n/a"
                else:
                    cells[t] = "failed"
            row = Row(label, ours, theirs, "s", ratio, target, ">=", fastest or "",
                      "; ".join(notes), samples=samples)
            row.cells = cells
            rows.append(row)
    return rows


def _met(row):
    return {True: "yes", False: "NO", None: "-"}[row.met]


def _ratio(row):
    return "-" if row.ratio is None else "%.2fx" % row.ratio


def print_table(rows):
    widths = [62, 9] + [20] * len(PEERS) + [10, 7, 6, 4]
    head = ["workload", "cm"] + PEERS + ["fastest", "ratio", "target", "met"]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        cols = [r.name, r.cells["cm"]] + [r.cells[p] for p in PEERS] + [
            r.baseline_name or "-", _ratio(r), "≥ %.1f" % r.target, _met(r)]
        print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))


#: How each tool was driven, for the Markdown section.
DRIVEN = [
    ("cm", "`python -m cloudmanager --config F upload DIR`; down: `cm evict`, then `cm warm "
     "HASH...` (many files, into the cache) or `cm download HASH DEST` (one file); "
     "check: `cm verify`. A fresh pool per round, one host, redundancy 1, `fsync = false` "
     "(the folder host's too)"),
    ("rclone", "`rclone copy DIR REMOTE` and back into an empty directory; check: "
     "`rclone check DIR REMOTE`; defaults (4 transfers, 8 checkers); S3 as a `type = s3` "
     "remote in a config file of the run's"),
    ("restic", "`restic init` (untimed), `restic backup DIR`; down: `restic restore latest "
     "--target EMPTY`; it encrypts, deduplicates into pack files and fsyncs them"),
    ("git-annex", "`git init`, `git annex init`, `initremote type=directory` and a copy of "
     "the data into the work tree (untimed); `git annex add` + `git annex copy --to`; down: "
     "`git annex drop --force` (untimed), `git annex get`; folder only"),
    ("dvc", "`git init`, `dvc init`, `dvc remote add -d` and a copy of the data (untimed); "
     "`dvc add` + `dvc push`; down: work tree and cache moved aside (untimed), `dvc pull`; "
     "folder only"),
]


def markdown(rows, facts, end_load, versions, missing, cfg, args, seconds, errors):
    cmd = "python bench/peers.py%s%s --markdown bench/RESULTS.md" % (
        " --quick" if args.quick else "",
        " --rounds %d" % args.rounds if args.rounds else "")
    lines = [
        "<!-- peers -->", "## Against the peers", "",
        "Produced by `%s` in %.0f s: the wall time of whole processes on the same generated "
        "data, median of %d round%s%s; within a round each tool runs once per workload, "
        "their order rotated every round. The ratio in each peer's cell is its time over "
        "cm's: **above 1, cm is faster**. The last columns compare cm with the fastest "
        "peer of the row (issue 16's targets: 1.0x on every row, 1.5x rclone on the "
        "check)." % (cmd, seconds, cfg["rounds"], "" if cfg["rounds"] == 1 else "s",
                     ", after an untimed warm-up" if cfg["warm_up"] else ""), "",
        "Machine: %s, %s cores, SHA-NI %s, %s GiB, %s on %s, Python %s; %s. Load average "
        "(1, 5, 15 min) at the start %s, at the end %s." % (
            facts["cpu"], facts["cores"], facts["sha_ni"], facts["memory_gib"],
            facts["filesystem"], facts["kernel"], facts["python"], facts["date"],
            _load(facts["load_average"]), _load(end_load)), "",
        "Tools: %s." % "; ".join("%s" % v for v in versions.values()), "",
        "| workload | cm | rclone | restic | git-annex | DVC | fastest peer | cm vs it | target "
        "| met |", "|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append("| %s |" % " | ".join(
            [r.name, r.cells["cm"]] + [r.cells[p] for p in PEERS]
            + [r.baseline_name or "-", _ratio(r), "≥ %.1f" % r.target, _met(r)]))
    notes = ["%s: %s" % (r.name, r.note) for r in rows if r.note]
    if notes or errors:
        lines += [""] + ["- %s" % n for n in notes] + ["- FAILED: %s" % e for e in errors]
    lines += ["", "How each tool was driven:", ""]
    lines += ["- **%s**: %s." % (name, text) for name, text in DRIVEN]
    lines += ["", "<!-- /peers -->"]
    return "\n".join(lines) + "\n"


def _load(load):
    return "-" if not load else "%.1f, %.1f, %.1f" % tuple(load)


def write_markdown(path, section):
    """Put ``section`` into ``path`` between its markers, or append it: bench/run.py
    rewrites what comes before ``<!-- notes -->`` and keeps the rest, this section
    included. Text after the end marker (the notes on the peers) is kept."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    start, end = "<!-- peers -->", "<!-- /peers -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section.rstrip("\n") + after
    elif text:
        if "<!-- notes -->" not in text:
            text = text.rstrip("\n") + "\n\n<!-- notes -->\n"
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = section
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -- main -----------------------------------------------------------------------------------

def find_missing(env):
    """name -> why a peer is skipped; exits 2 when CI requires it (CM_REQUIRE_PEERS=1)."""
    missing = {n: ALL_TOOLS[n].missing() for n in PEERS}
    missing = {n: why for n, why in missing.items() if why}
    required = [n for n in REQUIRED if n in missing]
    if required and os.environ.get("CM_REQUIRE_PEERS") == "1":
        sys.exit("CM_REQUIRE_PEERS=1 but %s %s not installed (apt-get install %s)"
                 % (" and ".join(required), "is" if len(required) == 1 else "are",
                    " ".join(required)))
    for n, why in missing.items():
        print("%s: %s, skipped" % (n, why), file=sys.stderr)
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--workdir", help="where the fresh directories go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark files")
    parser.add_argument("--only", nargs="+", choices=GROUP_NAMES, metavar="GROUP",
                        help="run only these workloads: %s" % ", ".join(GROUP_NAMES))
    parser.add_argument("--json", metavar="FILE", help="write every figure and sample as JSON")
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the 'Against the peers' section into FILE")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        cfg["rounds"] = args.rounds
    ws = Workspace(args.workdir, keep=args.keep)
    # Bytecode first: a checkout under PYTHONDONTWRITEBYTECODE would time
    # the compiler in every cm process (see bench/run.py).
    compileall.compile_dir(os.path.join(REPO, "cloudmanager"), quiet=1)
    env = Env(ws.fresh("env"))
    missing = find_missing(env)
    facts = machine_facts(ws.root)
    started = time.perf_counter()
    results = Results()
    moto = Moto(os.path.join(ws.root, "moto.log"))
    versions, groups = {}, []
    try:
        moto.start()
        for name in TOOLS:
            if name not in missing:
                versions[name] = ALL_TOOLS[name].version(env)
        groups = make_groups(ws, cfg, args.only)
        if cfg["warm_up"]:
            print("warming up...", file=sys.stderr, flush=True)
            warm_up(env, ws, moto)
        for rnd in range(1, cfg["rounds"] + 1):
            k = (rnd - 1) % len(TOOLS)
            order = TOOLS[k:] + TOOLS[:k]
            print("round %d of %d (load %s): %s" % (rnd, cfg["rounds"], _load(os.getloadavg()),
                                                   ", ".join(order)), file=sys.stderr, flush=True)
            for group in groups:
                run_group(env, ws, group, rnd, order, results, moto)
    except BenchError as exc:
        results.errors.append(str(exc))
        print("FAILED: %s" % exc, file=sys.stderr)
    finally:
        # Timed before the clean-up, which takes minutes after a full run.
        seconds = time.perf_counter() - started
        end_load = os.getloadavg()
        moto.stop()
        ws.cleanup()
    rows = build_rows(groups, results, missing)
    print()
    print_table(rows)
    print("\n%d rows, %d targets met, %d missed, %d failures; %.0f s; load %s at the end"
          % (len(rows), sum(1 for r in rows if r.met), sum(1 for r in rows if r.met is False),
             len(results.errors), seconds, _load(end_load)))
    for e in results.errors:
        print("FAILED: %s" % e)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"quick": args.quick, "rounds": cfg["rounds"], "machine": facts,
                       "load_at_end": end_load, "seconds": seconds, "versions": versions,
                       "missing": missing,
                       "rows": [dict(r.as_dict(), cells=r.cells) for r in rows],
                       "errors": results.errors}, f, indent=2)
    if args.markdown:
        write_markdown(args.markdown, markdown(rows, facts, end_load, versions, missing, cfg,
                                               args, seconds, results.errors))
    # Ratios vary with the machine and its load: only a broken workload fails.
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
