"""The ``cm`` surface as a user meets it: progress on a real terminal, dry runs,
filters, config, completion and the smaller points of issue 15 (items 5, 6)."""

import hashlib
import itertools
import json
import os
import re

from .test_cli_process import run_on_a_terminal

HASH_LINE = re.compile(r"[0-9a-f]{64}  \S")
FRAME_WORDS = ("uploading", "downloading", "warming", "syncing", "verifying")


def screen(output):
    """What a terminal shows after ``output``: carriage returns, erase-line
    and newlines applied, colours dropped (lines as wide as they get)."""
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif token.endswith("K") and token.startswith("\x1b["):  # erase to the end
            del lines[row][col:]
        elif token.startswith("\x1b"):
            continue  # colours, cursor visibility
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            line[col:col + 1] = [token]
            col += 1
    return ["".join(line) for line in lines]


def percents(output, word):
    return [int(p) for p in re.findall(r"%s  \[[#-]+\]\s+(\d+)%%" % word, output)]


def test_progress_moves_while_bytes_move_and_never_breaks_an_output_line(home):
    """A real terminal (pty) and real ``cm`` processes: upload, download,
    warm, sync and deep verify each draw a bar, the bar moves while the
    bytes move (held back by --bwlimit so that it must), and every output
    line on the screen is whole, with no frame left behind."""
    for i in range(3):
        home.file("big/f%d.bin" % i, os.urandom(3 * 2**20 + i))
    status, upload = run_on_a_terminal(home, "upload", "--defer", "big")
    assert status == 0 and "uploading" in upload
    status, sync = run_on_a_terminal(home, "sync", "--bwlimit", "4M")
    assert status == 0 and "syncing" in sync
    lines = [line for line in screen(upload) if HASH_LINE.match(line)]
    assert lines[-1].rstrip().endswith("  big/")  # the directory's tree, last
    hashes = [line[:64] for line in lines[:-1]]
    assert len(hashes) == 3
    assert run_on_a_terminal(home, "evict")[0] == 0
    (home.work / "out").mkdir()
    status, download = run_on_a_terminal(home, "download", "--bwlimit", "1M", hashes[0],
                                         "out/")
    assert status == 0
    # 3 MiB at 1 MiB/s after a 1 MiB burst: the bar shows the bytes arriving.
    assert any(0 < p < 100 for p in percents(download, "downloading")), download
    status, warm = run_on_a_terminal(home, "warm", "--bwlimit", "8M", *hashes[1:])
    assert status == 0 and "warming" in warm
    status, verify = run_on_a_terminal(home, "verify", "--deep", "-q")
    assert (status, verify) == (0, "")  # -q after the command: no bar, no summary
    status, verify = run_on_a_terminal(home, "verify", "--deep", "--bwlimit", "4M")
    # The totals come once the copies are chosen: then a percentage and "N/4
    # files" (the three and the directory's tree).
    assert status == 0 and percents(verify, "verifying") and "/4 files" in verify, verify

    for output in (upload, sync, download, warm, verify):
        shown = screen(output)
        assert not any(word in line for line in shown for word in FRAME_WORDS), shown
        for line in shown:
            if re.search(r"[0-9a-f]{64}", line):
                assert HASH_LINE.match(line), line
    assert screen(download)[0] == str(home.work / "out" / "f0.bin")
    assert [line[:64] for line in screen(warm) if line] == hashes[1:]
    assert screen(sync)[0].startswith("sync: 4 checked, 4 uploads")
    assert open(home.work / "out" / "f0.bin", "rb").read() == \
        open(home.work / "big" / "f0.bin", "rb").read()

    # Log messages while a bar is drawn: a second host whose folder is gone
    # fails every upload (a warning each), beside the one that works.
    gone = home.root / "gone"
    assert home.run("init", "--host", "ok=dir:%s" % (home.root / "ok"),
                    "--host", "gone=dir:%s" % gone, "--redundancy", "2").returncode == 0
    gone.rmdir()
    for i in range(4):
        home.file("small/s%d.txt" % i, "small %d\n" % i)
    # (The first frame is drawn before any file is read: each warning comes after it.)
    status, warned = run_on_a_terminal(home, "upload", "small")
    shown = [line for line in screen(warned) if line]
    assert "uploading" in warned and any(line.startswith("cm: warning: ") for line in shown)
    for line in shown:
        assert HASH_LINE.match(line) or line.startswith(("cm: ", "uploaded 4")), line


def colliding_contents():
    """Two contents whose SHA-256 share their first 4 hex digits."""
    seen = {}
    for i in itertools.count():
        data = b"collide %d\n" % i
        prefix = hashlib.sha256(data).hexdigest()[:4]
        if prefix in seen:
            return seen[prefix], data, prefix
        seen[prefix] = data


def test_the_command_line_surface_in_a_fresh_home(home, tmp_path):
    # -- upload: filters and a dry run; -q and -v after the command
    for name in ("a.jpg", "b.png", "notes.txt", "thumbs/t.jpg", "deep/x/c.jpg"):
        home.file("photos/" + name, "content of %s\n" % name)
    args = ("--include", "*.jpg", "--include", "*.png", "--exclude", "thumbs/")
    dry = home.run("upload", "--dry-run", "--json", *args, "photos")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert sorted(os.path.relpath(f["path"], home.work / "photos") for f in planned["files"]) \
        == ["a.jpg", "b.png", "deep/x/c.jpg"]
    assert planned["would_upload"] == 3 and planned["dry_run"]
    assert json.loads(home.run("ls", "--json").stdout) == []  # nothing was sent
    quiet = home.run("upload", *args, "photos", "-q")
    # Three files, then the directory's tree.
    assert quiet.returncode == 0 and quiet.stderr == "" and len(quiet.stdout.splitlines()) == 4
    loud = home.run("upload", "--rehash", "photos/a.jpg", "-vv")
    assert "cm: debug: opening the pool" in loud.stderr

    # -- sync --dry-run lists a deferred file and sends nothing
    home.file("later.txt", "queued for later\n")
    later = home.run("upload", "--defer", "later.txt").stdout[:64]
    dry_sync = home.run("sync", "--dry-run")
    assert dry_sync.returncode == 0
    assert re.match(r"%s\s+\d+ B  copies 0\+1  later.txt  \(queued\)$" % later,
                    dry_sync.stdout.strip()), dry_sync.stdout
    assert "1 file and make up to 1 copy" in dry_sync.stderr
    assert json.loads(home.run("status", "--json").stdout)["queued"] == 1
    below = home.run("ls", "--below-target").stdout
    assert below == home.run("ls", "--short").stdout and later in below
    assert home.run("sync").returncode == 0
    assert home.run("ls", "--below-target").stdout == ""
    assert "0 below the target of 1 copy\n" in home.run("status").stdout  # not "1 copies"

    # -- remove --dry-run removes nothing; then the real one, in good grammar
    dry_remove = home.run("remove", "--dry-run", later[:8])
    assert dry_remove.returncode == 0
    assert dry_remove.stdout.startswith("would remove %s (later.txt): delete 1 copy, keep 0"
                                        % later)
    assert home.run("info", later).returncode == 0
    removed = home.run("remove", "--yes", later)
    assert removed.stdout == "removed %s: 1 copy deleted, 0 kept\n" % later

    # -- an ambiguous prefix lists its candidates; completion offers hashes
    first, second = colliding_contents()[:2]
    home.file("c1", first)
    home.file("c2", second)
    assert home.run("upload", "c1", "c2").returncode == 0
    one, two = sorted(hashlib.sha256(d).hexdigest() for d in (first, second))
    ambiguous = home.run("info", one[:4])
    assert ambiguous.returncode == 2
    assert one in ambiguous.stderr and two in ambiguous.stderr
    complete = home.run(env={"_CM_COMPLETE": "bash_complete", "COMP_WORDS": "cm info %s" % one[:4],
                             "COMP_CWORD": "2"})
    assert complete.returncode == 0
    assert complete.stdout.split() == ["plain,%s" % one, "plain,%s" % two]

    # -- cm unreachable: a record loaded from a node with hosts unknown here
    stranger = "f" * 64
    record = [{"version": "0.2", "datetime": "1", "filename": "theirs.bin", "filesize": "3",
               "filehash": stranger,
               "uploads": [{"host_name": "their-s3", "url": "s3://theirs/%s" % stranger}]}]
    loaded = home.run("load", input=json.dumps(record))
    assert loaded.returncode == 0 and "see cm unreachable" in loaded.stderr
    unreachable = home.run("unreachable")
    assert unreachable.stdout == "%s  their-s3\n" % stranger
    assert "1 file is only on hosts not configured here" in unreachable.stderr
    assert home.run("unreachable", "--json").stdout.count(stranger) == 1
    retried = home.run("hosts", "--retry", "local")
    assert retried.returncode == 0 and "reset local" in retried.stdout

    # -- cm init --host-option, a human capacity; config show hides secrets, check checks
    nas = tmp_path / ("n" * 120) / ("a" * 100)  # a spec wider than 200 columns
    init = home.run("init", "--host", "nas=dir:%s" % nas,
                    "--host", "dav=fsspec:webdav+https://me:hunter2@dav.example.com/pool",
                    "--host-option", "nas.timeout=300",
                    "--host-option", 'dav.storage_options={ token = "s3cr3t", user = "me" }')
    assert init.returncode == 0, init.stderr
    written = (home.work / "cloudmanager.toml").read_text()
    assert re.search(r'^capacity = "\d+(\.\d)? (GiB|MiB)"$', written, re.M), written
    assert "options = { timeout = 300 }" in written
    shown = home.run("config", "show")
    assert shown.returncode == 0
    assert "hunter2" not in shown.stdout and "s3cr3t" not in shown.stdout
    assert "me:***@dav.example.com" in shown.stdout and 'token = "***"' in shown.stdout
    assert "timeout = 300" in shown.stdout
    check = home.run("config", "check")
    assert check.returncode == 0 and "host nas" in check.stdout and "ok" in check.stderr
    hosts = home.run("hosts").stdout.splitlines()
    assert any(line.startswith("nas ") and line.endswith("dir:%s" % nas) for line in hosts)
    (home.work / "cloudmanager.toml").write_text(written.replace("[pool]\n",
                                                                  '[pool]\nbwlimit = "2M"\n'))
    assert "bwlimit   2.0 MiB/s" in home.run("status").stdout
    assert 'bwlimit = "2.0 MiB/s"' in home.run("config", "show").stdout
    (home.work / "cloudmanager.toml").write_text(written + "\n[hosts.bad]\nspec = 'dir:rel'\n")
    broken = home.run("config", "check")
    assert broken.returncode == 1 and "host bad" in broken.stdout and "absolute" in broken.stdout
    (home.work / "cloudmanager.toml").write_text("[pool]\nfrobs = 1\n")
    assert home.run("config", "check").returncode == 2
    undeclared = home.run("init", "--force", "--host-option", "x.y=1")
    assert undeclared.returncode == 2 and "no --host named x" in undeclared.stderr
