"""``cm`` as a user meets it: safe downloads, Ctrl-C, and mistakes that get one
clear line and a consistent exit status (2 for usage and config, 1 for a
failed operation). Every test drives real ``cm`` processes in a fresh home."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


def sha(data):
    return hashlib.sha256(data).hexdigest()


def one_line_error(result, status, *needles):
    """``result`` exited ``status`` with one ``cm: error:`` line holding every needle."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("cm: error: ")]
    assert result.returncode == status, result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, result.stderr)
    return errors[0]


def test_download_never_clobbers_and_reads_dest_as_a_user_means_it(home):
    data = b"the pool's notes\n"
    home.file("src/notes.txt", data)
    uploaded = home.run("upload", "src/notes.txt")
    assert uploaded.returncode == 0, uploaded.stderr
    digest = uploaded.stdout.split()[0]
    assert digest == sha(data)

    # The user's own file of the same name, in the directory named.
    mine = home.file("dl/notes.txt", b"my own text\n")
    refused = home.run("download", digest, "dl/")
    line = one_line_error(refused, 1, str(mine), "--force")
    assert ".tmp" not in line and refused.stdout == ""
    assert mine.read_bytes() == b"my own text\n"
    assert os.listdir(home.work / "dl") == ["notes.txt"]  # no temp file left behind
    # The same bytes already there: nothing to do, and no error.
    home.file("same/notes.txt", data)
    same = home.run("download", digest, "same")
    assert same.returncode == 0 and same.stdout.strip() == str(home.work / "same/notes.txt")
    # --force replaces it.
    forced = home.run("download", "--force", digest, "dl/notes.txt")
    assert forced.returncode == 0, forced.stderr
    assert mine.read_bytes() == data

    # A trailing slash is a directory, made if missing (not a file named newdir).
    fresh = home.run("download", digest, "newdir/deeper/")
    assert fresh.returncode == 0, fresh.stderr
    assert (home.work / "newdir/deeper/notes.txt").read_bytes() == data
    assert fresh.stdout.strip() == str(home.work / "newdir/deeper/notes.txt")

    # - is stdout: the bytes and nothing else; no file named "-".
    piped = home.run("download", digest, "-", text=False)
    assert piped.returncode == 0 and piped.stdout == data
    assert not os.path.lexists(home.work / "-")

    # A missing directory: the user's path in the message, never a temp name.
    missing = home.run("download", digest, "nowhere/sub/x.txt")
    line = one_line_error(missing, 1, "nowhere/sub/x.txt", "does not exist")
    assert ".tmp" not in line and not (home.work / "nowhere").exists()


def test_config_input_and_usage_mistakes_are_one_line_each(home):
    (home.work / "nodb.toml").write_text('[pool]\nstorage = "cache"\n')
    one_line_error(home.run("--config", "nodb.toml", "status"), 2,
                   str(home.work / "nodb.toml"), "[pool] database is not set")
    (home.work / "nostorage.toml").write_text('[pool]\ndatabase = "p.sqlite3"\n')
    one_line_error(home.run("--config", "nostorage.toml", "ls"), 2,
                   str(home.work / "nostorage.toml"), "[pool] storage is not set")
    (home.work / "badhost.toml").write_text(
        '[pool]\ndatabase = "p.sqlite3"\nstorage = "cache"\n[hosts.x]\nspec = "dir:rel"\n')
    one_line_error(home.run("--config", "badhost.toml", "status"), 2,
                   str(home.work / "badhost.toml"), "absolute")

    twice = home.run("init", "--host", "a=dir:/tmp/one", "--host", "a=dir:/tmp/two")
    one_line_error(twice, 2, "'a' is given twice")
    assert not (home.work / "cloudmanager.toml").exists()

    (home.work / "garbage.bin").write_bytes(bytes(range(128, 256)) * 4)
    one_line_error(home.run("load", "garbage.bin"), 1, "garbage.bin", "not UTF-8")
    (home.work / "text.txt").write_text("hello world\n")
    one_line_error(home.run("load", "text.txt"), 1, "text.txt", "not JSON")
    bad = [{"version": "0.2", "filehash": "../../etc/passwd"}, {"version": "9"}]
    (home.work / "bad.json").write_text(json.dumps(bad))
    result = home.run("load", "bad.json")
    one_line_error(result, 1, "bad.json", "none of its 2 records is valid")
    assert result.stderr.count("skipping record") == 2  # each reason, then the verdict
    assert "merged" not in result.stderr
    # Loading nothing new is still a success.
    assert home.run("load", input="[]").returncode == 0

    # The same kind of mistake, the same status, whichever the command.
    one_line_error(home.run("verify", "--host", "nope"), 2, "no host named 'nope'")
    one_line_error(home.run("hosts", "--retry", "nope"), 2, "no host named 'nope'")
    line = one_line_error(home.run("dump", "missing/dir/pool.json"), 1,
                          "cannot write missing/dir/pool.json")
    assert ".tmp" not in line



def test_files_left_short_or_on_no_host_are_said_and_nothing_checked_is_a_failure(home):
    nas = home.root / "nas"
    nas.mkdir()
    (home.work / "cloudmanager.toml").write_text(
        '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "4 MiB"\n'
        'redundancy = 2\n[hosts.nas]\nspec = "dir:%s"\n' % nas)
    for i in range(3):
        home.file("docs/d%d.txt" % i, "doc %d\n" % i)
    # One host for a target of two: every file is short, but on a host.
    short = home.run("upload", "docs")
    assert short.returncode == 0, short.stderr
    assert "3 files are below the target of 2 copies" in short.stderr
    assert len(short.stdout.splitlines()) == 3 + 1  # and the tree of docs/, last

    # The only host gone (an unmounted disk): no host takes the new file.
    nas.rename(home.root / "nas-unmounted")
    home.file("docs/new.txt", "written while the disk was away\n")
    alone = home.run("upload", "--json", "docs/new.txt")
    one_line_error(alone, 1, "no host took 1 file", "queued")
    report = json.loads(alone.stdout)
    assert (report["uploaded"], report["on_no_host"], report["below_target"]) == (1, 1, 1)
    digest = report["files"][0]["hash"]
    assert home.run("info", digest).returncode == 0  # in the pool all the same: pinned
    deferred = home.run("upload", "--defer", "docs/new.txt")  # asked for: no error
    assert deferred.returncode == 0, deferred.stderr
    synced = home.run("sync")
    one_line_error(synced, 1, "below the target of 2 copies")

    # Every copy is on a host that failed or cools down: nothing was checked.
    verify = home.run("verify", "--json")
    one_line_error(verify, 1, "nothing could be checked")
    assert json.loads(verify.stdout)["checked"] == 0


def test_ctrl_c_on_upload_prints_what_reached_the_pool_and_a_rerun_skips_it(home,
                                                                             fake_plowshare):
    # A slow host (each plowup takes 1.5 s) and large files, one at a time: the
    # first file is in when its line comes, the second is then in flight.
    (home.work / "cloudmanager.toml").write_text(
        '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "64 MiB"\n'
        'redundancy = 1\n[hosts.slow]\nspec = "plowshare:slowmod"\n')
    fake_plowshare.faults("slowmod", slow=1.5)
    for i in range(4):
        home.file("big/b%d.bin" % i, os.urandom(8 * 2**20))  # large: a batch each
    time.sleep(2.2)  # settled, so that a re-run may trust the remembered hashes
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", "upload", "--jobs", "1",
                             "big"], cwd=home.work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the upload finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "cm: error" not in err
    printed = [line[:64] for line in (first + out).splitlines()]
    assert 2 <= len(printed) < 4  # the first, and the one in flight when Ctrl-C came
    last = err.strip().splitlines()[-1]
    assert last.startswith("cm: interrupted: uploaded %d, skipped 0" % len(printed)), err
    assert "not started %d" % (4 - len(printed)) in last
    pooled = {f["hash"]: f for f in json.loads(home.run("ls", "--json").stdout)}
    assert all(pooled[h]["copies"] == 1 for h in printed)
    assert home.run("fsck").returncode == 0

    # The re-run reads only what was not committed.
    fake_plowshare.clear()
    again = home.run("upload", "--json", "big")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["skipped"], report["uploaded"]) == (len(printed), 4 - len(printed))
    skipped = {f["hash"] for f in report["files"] if f["state"] == "skipped"}
    assert skipped == set(printed)


def test_ctrl_c_on_sync_is_one_line_and_exit_130_and_the_next_sync_goes_on(home,
                                                                          fake_plowshare):
    (home.work / "cloudmanager.toml").write_text(
        '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "8 MiB"\n'
        'redundancy = 1\n[hosts.slow]\nspec = "plowshare:slowmod"\n')
    for i in range(3):
        home.file("q/f%d.txt" % i, "queued %d\n" % i)
    assert home.run("upload", "--defer", "q").returncode == 0
    fake_plowshare.faults("slowmod", slow=1.5)
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", "sync"], cwd=home.work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(entry["tool"] == "plowup" for entry in fake_plowshare.log()):
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # polling for the first upload to start, not timing it
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("sync finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    assert err.strip().splitlines()[-1].startswith("cm: interrupted: ")
    fake_plowshare.clear()
    synced = home.run("sync", "--json")
    assert synced.returncode == 0, synced.stderr
    assert json.loads(home.run("status", "--json").stdout)["queued"] == 0


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum here")
def test_upload_lines_escape_names_as_sha256sum_does(home):
    names = ["odd/new\nline.txt", "odd/back\\slash.txt", "odd/cr\rhere.txt", "odd/plain.txt"]
    for name in names:
        home.file(name, "contents of %r\n" % name)
    result = home.run("upload", *names)  # by name: a tree refuses a backslash in a path
    assert result.returncode == 0, result.stderr
    reference = subprocess.run(["sha256sum", "--"] + names, cwd=home.work, capture_output=True,
                               text=True, check=True).stdout
    assert sorted(result.stdout.splitlines()) == sorted(reference.splitlines())
    # So sha256sum reads cm's lines back, one file each.
    check = subprocess.run(["sha256sum", "-c"], input=result.stdout, cwd=home.work,
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4, check.stdout


def test_ctrl_c_on_warm_finishes_the_files_in_flight_and_says_what_is_left(home,
                                                                           fake_plowshare):
    (home.work / "cloudmanager.toml").write_text(
        '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "8 MiB"\n'
        'redundancy = 1\n[hosts.slow]\nspec = "plowshare:slowmod"\n')
    for i in range(8):
        home.file("w/f%d.txt" % i, "warm me %d\n" % i)
    digests = [line[:64] for line in home.run("upload", "w").stdout.splitlines()[:8]]
    assert home.run("evict").returncode == 0
    fake_plowshare.faults("slowmod", slow=1.5)  # each plowdown takes 1.5 s
    env = dict(os.environ, **home.env)
    env.pop("CLOUDMANAGER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudmanager", "warm"] + digests,
                            cwd=home.work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    # Two at a time (plowshare's two connections): the first two are cached
    # together, and the next two start at once. Read straight from the pipe
    # (a buffered readline would keep a second line from communicate()).
    first = b""
    while b"\n" not in first:
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, "warm ended before it printed a line"
        first += chunk
    time.sleep(0.5)  # well inside their 1.5 s plowdowns: surely in flight now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    first, out, err = first.decode(), out.decode(), err.decode()
    if proc.returncode == 0:
        pytest.skip("warm finished before the interrupt arrived")
    assert proc.returncode == 130 and "Traceback" not in err, err
    printed = [line[:64] for line in (first + out).splitlines()]
    # In the order asked: the first ones, and those in flight when Ctrl-C came.
    assert printed == digests[:len(printed)] and 2 <= len(printed) < 8, err
    assert err.strip().splitlines()[-1] == \
        "cm: interrupted: warmed %d, failed 0, not started %d" % (len(printed), 8 - len(printed))
    cached = {f["hash"] for f in json.loads(home.run("ls", "--cached", "--json").stdout)}
    assert cached == {line[:64] for line in (first + out).splitlines()}
