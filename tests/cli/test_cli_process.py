"""``cm`` as a real process: exit codes, stderr, terminals, re-runs, Ctrl-C."""

import json
import os
import pty
import re
import shutil
import signal
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
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1
    assert "unknown setting pool.frobs" in broken.stderr
    verbose = home.run("-v", "status")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
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
    assert proc.returncode == 1 and "aborted" in err and "Traceback" not in err
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
