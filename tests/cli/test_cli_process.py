"""``cm`` as a real process: exit codes, stderr, terminals, re-runs, Ctrl-C."""

import hashlib
import json
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest


def test_the_installed_cm_script_and_python_m_agree(home):
    script = shutil.which("cm", path=os.path.dirname(sys.executable)) or shutil.which("cm")
    assert script, "the cm console script is not installed"
    home.file("a.txt", "via the script\n")
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    result = subprocess.run([script, "upload", "a.txt"], cwd=home.work, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    digest = result.stdout.split()[0]
    listed = home.run("ls", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["hash"] == digest


def test_exit_codes_and_one_line_errors(home):
    usage = home.run("upload")
    assert usage.returncode == 2
    assert usage.stderr == "cm: error: Missing argument 'PATHS...'. (see 'cm upload --help')\n"
    failed = home.run("info", "0" * 64)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert "Traceback" not in failed.stderr

    (home.work / "cloudmanager.toml").write_text("[pool]\nstorage = 'cache'\nfrobs = 1\n")
    broken = home.run("status")
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1
    assert "unknown setting pool.frobs" in broken.stderr
    verbose = home.run("-v", "status")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1].startswith("cm: error: ")


def test_rerunning_an_upload_skips_files_once_they_are_settled(home):
    for i in range(5):
        home.file("dir/f%d" % i, "file %d\n" % i)
    first = home.run("upload", "--json", "dir")
    assert json.loads(first.stdout)["uploaded"] == 5
    # Files written less than two seconds before they were read are read
    # again next time (a same-tick rewrite could hide behind an equal stat).
    time.sleep(2.2)
    home.run("upload", "--rehash", "dir")  # remembered now that they are settled
    again = home.run("upload", "--json", "dir")
    report = json.loads(again.stdout)
    assert (report["uploaded"], report["skipped"]) == (0, 5), again.stderr


def run_on_a_terminal(home, *args):
    """Run ``python -m cloudmanager ARGS`` with stdout and stderr on a pty."""
    master, slave = pty.openpty()
    env = dict(os.environ, **home.env, COLUMNS="120")
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager"] + list(args), cwd=home.work,
                            env=env, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return proc.wait(timeout=120), output.decode("utf-8", "replace")


def test_a_progress_bar_on_a_terminal_and_none_in_a_pipe(home):
    for i in range(3):
        home.file("big/f%d.bin" % i, os.urandom(2 * 2**20))
    status, output = run_on_a_terminal(home, "upload", "big")
    assert status == 0
    assert "uploading" in output and "files" in output and "MiB" in output
    piped = home.run("upload", "--rehash", "big")
    assert "uploading" not in piped.stderr and "\x1b[" not in piped.stderr + piped.stdout
    quiet_status, quiet = run_on_a_terminal(home, "-q", "upload", "--rehash", "big")
    assert quiet_status == 0 and "uploading" not in quiet


def test_ctrl_c_stops_an_upload_and_leaves_a_consistent_pool(home):
    for i in range(1500):
        home.file("many/f%04d" % i, os.urandom(64 * 1024))
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", "upload", "--jobs", "2",
                             "many"], cwd=home.work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # one file is in: interrupt the rest
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = first + out
    if proc.returncode == 0:
        pytest.skip("the upload finished before the interrupt arrived")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    fsck = home.run("fsck", "--json")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert json.loads(fsck.stdout)["clean"]
    # Every hash printed before the interrupt is in the pool: on the host, or
    # cached (pinned) and queued for the next sync.
    # (The interrupt may cut the last line short: whole lines only.)
    printed = [line[:64] for line in out.splitlines() if re.match(r"[0-9a-f]{64}  ", line)]
    assert 1 <= len(printed) < 1500
    pooled = {f["hash"]: f for f in json.loads(home.run("ls", "--json").stdout)}
    assert all(pooled[h]["copies"] >= 1 or pooled[h]["cached"] for h in printed)
    finish = home.run("upload", "--json", "many")
    assert finish.returncode == 0 and json.loads(finish.stdout)["failed"] == 0


def test_a_closed_pipe_ends_quietly(home):
    records = [{"version": "0.2", "datetime": "1", "filename": "r%d" % i, "filesize": "1",
                "filehash": "%064x" % i, "uploads": []} for i in range(3000)]
    assert home.run("load", input=json.dumps(records)).returncode == 0
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", "ls"], cwd=home.work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `cm ls | head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == ""


# -- trees: back up a folder on one node, restore it on another ------------------------------

def test_a_tree_is_restored_on_another_node_and_a_killed_restore_resumes(home, tmp_path):
    """Node one uploads a folder; node two (its own catalog and cache, the
    same host) loads the dump, lists the tree, restores it byte for byte
    with modes and mtimes; a restore killed with SIGKILL mid-way is re-run
    and fetches only the file it lacked; a third run does nothing."""
    import urllib.parse

    shared = tmp_path / "shared-host"
    shared.mkdir()
    configs = {}
    for node in ("one", "two"):
        (tmp_path / node).mkdir()
        configs[node] = tmp_path / node / "cloudmanager.toml"
        configs[node].write_text(
            '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "4 MiB"\n'
            'redundancy = 1\n[hosts.shared]\nspec = "dir:%s"\n' % shared)
    one, two = ("--config", configs["one"]), ("--config", configs["two"])
    src = home.work / "photos"
    files = {"f%03d.txt" % i: (b"file %d\n" % i * (i + 1), 0o644, 1_600_000_000 + i)
             for i in range(20)}
    files["bin/run.sh"] = (b"#!/bin/sh\n", 0o755, 1_500_000_000)
    files["private/key"] = (b"secret", 0o600, 1_400_000_000)
    files["zz-last.bin"] = (os.urandom(5000), 0o640, 1_300_000_000)
    for rel, (data, mode, mtime) in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))

    up = home.run(*one, "upload", "photos/")
    assert up.returncode == 0, up.stderr
    tree, shown = up.stdout.splitlines()[-1].split("  ")
    assert shown == "photos/" and len(tree) == 64
    assert home.run(*one, "dump", tmp_path / "pool.json").returncode == 0

    home.own_catalog()  # node two's catalog is apart: the dump is how it learns
    assert home.run(*two, "load", tmp_path / "pool.json").returncode == 0
    listed = home.run(*two, "trees").stdout.split()
    assert listed[0] == tree and listed[-1] == "photos"
    paths = [line.split()[-1] for line in home.run(*two, "ls", tree[:12]).stdout.splitlines()]
    assert paths == sorted(files)

    # The last file's object on the host becomes a FIFO: a download of it
    # blocks, so the restore is caught mid-way whatever the machine's speed.
    last = hashlib.sha256(files["zz-last.bin"][0]).hexdigest()
    url = json.loads(home.run(*two, "whereis", "--json", last).stdout)["copies"][0]["url"]
    obj = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    kept = open(obj, "rb").read()
    os.unlink(obj)
    os.mkfifo(obj)
    dest = tmp_path / "restored"
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", *map(str, two), "restore",
                             "--jobs", "1", tree, str(dest)], cwd=home.work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if dest.is_dir() and len([n for _, _, names in os.walk(dest) for n in names
                                  if not n.startswith(".")]) == len(files) - 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()  # blocked on the last file
    proc.kill()
    proc.wait()
    os.unlink(obj)
    with open(obj, "wb") as f:
        f.write(kept)

    again = home.run(*two, "restore", "--json", tree, dest)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["fetched"], summary["unchanged"]) == (1, len(files) - 1)
    got = {}
    for dirpath, _, names in os.walk(dest):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            got[os.path.relpath(path, dest)] = (open(path, "rb").read(),
                                                stat.S_IMODE(st.st_mode), st.st_mtime)
    assert got == files  # byte for byte, modes, mtimes; no temp file left
    third = home.run(*two, "restore", "--json", tree, dest)
    assert json.loads(third.stdout)["fetched"] == 0
    assert {a for a, _ in json.loads(third.stdout)["actions"]} == {"keep"}
