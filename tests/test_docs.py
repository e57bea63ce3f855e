"""The docs are part of the product: the README quick start must run as written."""

import ast
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from hosts.s3_server import aws_env, moto_endpoint, s3_admin  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_quick_start_runs_as_written(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    quick_start = next(b for b in blocks if "CloudManager(" in b)
    result = subprocess.run([sys.executable, "-c", quick_start], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    digest, exists, cached = out[0].split()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and exists == "True" and cached == "True"
    assert "hello, pool" in result.stdout
    assert "'short': 0" in result.stdout


def test_readme_walkthrough_runs_on_a_real_s3_server(tmp_path, s3_admin, moto_endpoint):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    walkthrough = next(b for b in blocks if "s3://walkthrough-east" in b)
    for name in ("walkthrough-east", "walkthrough-west"):
        s3_admin.create_bucket(Bucket=name)
    env = dict(os.environ, AWS_ENDPOINT_URL_S3=moto_endpoint)
    result = subprocess.run([sys.executable, "-c", walkthrough], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['east', 'nas', 'west']"
    assert lines[1] == "False True"
    first, after_loss, synced, last = (ast.literal_eval(line) for line in lines[2:6])
    assert (first["checked"], first["good"]) == (3, 3)
    assert (after_loss["missing"], after_loss["good"]) == (1, 2)
    assert synced["uploads"] == 1 and synced["complete"] == 1
    assert (last["checked"], last["good"]) == (3, 3)
    for name in ("walkthrough-east", "walkthrough-west"):
        keys = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=name)["Contents"]]
        assert len(keys) == 1 and keys[0].startswith("pool/")


def test_readme_names_the_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install -e '.[develop]'" in readme and "\ntox" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install --quiet -e '.[develop]'" in ci and "\ntox" in ci


def test_every_public_name_has_a_docstring():
    import cloudmanager
    from cloudmanager import (cache, config, db, engine, errors, hosts, serializers,
                              validation)
    from cloudmanager.db import (cache_index, connection, copies, files, health, queue,
                                 records, sessions, sources)
    from cloudmanager.db import migrate as db_migrate
    from cloudmanager.hosts import base, folder, fsspec, memory, plowshare, s3
    from cloudmanager import cli, manager, scheduler
    from cloudmanager.cache import fsck, layout, store
    from cloudmanager import sources as source_files
    from cloudmanager.cli import app, configure, maintain, output, share, show, transfer
    from cloudmanager import crypto, migrate
    from cloudmanager.cli import migrate as cli_migrate
    from cloudmanager.db import leases, postgres
    from cloudmanager import legacy, setup_db
    from cloudmanager.db import published, state
    from cloudmanager import meter

    missing = []
    for module in (cloudmanager, cache, config, db, engine, errors, hosts, serializers,
                   validation, base, folder, fsspec, memory, plowshare, s3,
                   cache_index, connection, copies, files, health, queue, records, sessions,
                   sources, manager, scheduler, source_files, cli, app, configure, maintain,
                   output, share, show, transfer, fsck, layout, store, migrate, db_migrate,
                   cli_migrate, crypto, leases, postgres, legacy, setup_db, published,
                   state, meter):
        if not module.__doc__:
            missing.append(module.__name__)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if callable(obj) and not obj.__doc__:
                missing.append("%s.%s" % (module.__name__, name))
            if isinstance(obj, type):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and callable(member) and not member.__doc__:
                        missing.append("%s.%s.%s" % (module.__name__, name, attr))
    assert missing == []


def shell_blocks(markdown):
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.S)


def test_readme_main_job_runs_as_written_on_embedded_defaults(tmp_path):
    """The README's first block: upload, evict, download, status, as a real shell."""
    block = shell_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[0]
    assert block.startswith("pip install -e .")
    script = "set -euo pipefail\n" + block.split("\n", 1)[1]  # installed already
    work = tmp_path / "work"
    work.mkdir()
    (work / "README.md").write_text("a file to keep\n")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    env.pop("CLOUDMANAGER_CONFIG", None)
    result = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (work / "README.copy.md").read_text() == "a file to keep\n"
    assert "evicted 1 file;" in result.stdout
    assert "embedded defaults" in result.stdout and "1 in the pool" in result.stdout
    digest = hashlib.sha256(b"a file to keep\n").hexdigest()
    assert (tmp_path / "data" / "cloudmanager" / "hosts" / "local" / digest).is_file()


def test_readme_back_up_a_folder_walkthrough_runs_as_written(tmp_path):
    """README, "Back up a folder, restore it elsewhere": two pools on one
    folder host, a dump and a load between them, and the folder restored on
    the second byte for byte, with its modes and mtimes, as a real shell."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in shell_blocks(readme) if 'cm restore "$tree" photos/' in b)
    photos = tmp_path / "laptop" / "photos"
    files = {"2024/a.jpg": (b"a picture", 0o644, 1_700_000_000),
             "2024/raw/b.raw": (os.urandom(3000), 0o600, 1_700_000_100),
             "notes.txt": (b"notes\n", 0o640, 1_600_000_000)}
    for rel, (data, mode, mtime) in files.items():
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(data)
        os.chmod(photos / rel, mode)
        os.utime(photos / rel, (mtime, mtime))
    (tmp_path / "desktop").mkdir()
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    env.pop("CLOUDMANAGER_CONFIG", None)
    env.pop("CLOUDMANAGER_DATABASE", None)
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    restored = tmp_path / "desktop" / "photos"
    for rel, (data, mode, mtime) in files.items():
        st = os.stat(restored / rel)
        assert ((restored / rel).read_bytes(), st.st_mode & 0o777, st.st_mtime) == (
            data, mode, mtime), rel
    assert sorted(p.name for p in restored.rglob("*") if p.is_file()) == [
        "a.jpg", "b.raw", "notes.txt"]
    assert "restored 0 files (0 B), 3 unchanged" in result.stderr
    assert result.stdout.count("photos") == 1  # the one line of `cm trees`


def test_readme_documents_every_cm_subcommand():
    from cloudmanager.cli import cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in cli.commands if "`cm %s" % name not in readme]
    assert not missing, "README lacks: %s" % ", ".join(missing)
    documented = set(re.findall(r"^\| `cm ([a-z][a-z-]*)", readme, flags=re.M))
    assert documented == set(cli.commands), documented ^ set(cli.commands)


def command_tree(command, path=("cm",)):
    """``(path, command)`` for ``cm`` and every command below it, groups' subcommands included."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from command_tree(sub, path + (name,))


def test_readme_documents_every_option_of_every_command():
    """README, "Every option": a row per command (group subcommands too),
    naming each of its options; the per-command -v/-q are the global ones,
    named in the row of `cm` itself."""
    import click

    from cloudmanager.cli import cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Every option", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(cm[a-z -]*)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    everywhere = {"--help", "--verbose", "--quiet"}
    missing = []
    for path, command in command_tree(cli):
        name = " ".join(path)
        if isinstance(command, click.Group) and path != ("cm",):
            continue  # a group runs nothing itself: its subcommands have rows
        if name not in rows:
            missing.append("a row for `%s`" % name)
            continue
        options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
        for option in options:
            longest = max(option.opts, key=len)
            if path != ("cm",) and longest in everywhere:
                continue
            if "`%s" % longest not in rows[name]:
                missing.append("%s %s" % (name, longest))
    assert not missing, "README's \"Every option\" lacks: %s" % ", ".join(missing)
    assert "`-v`/`--verbose`" in rows["cm"] and "`-q`/`--quiet`" in rows["cm"]
    assert "_CM_COMPLETE=bash_source cm" in readme


def test_readme_several_nodes_walkthrough_runs_on_a_real_postgresql(tmp_path, pg_url):
    """README, "Several nodes, one pool": two nodes on one catalog, an upload
    on one and a download on the other, as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in python_blocks(readme) if 'os.environ["POOL_URL"]' in b)
    env = dict(os.environ, POOL_URL=pg_url)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True False", "made on node A", "report.txt"]
    assert (tmp_path / "node-b" / "cache.index.sqlite3").is_file()
    assert not (tmp_path / "node-a" / "db.sqlite3").exists()


def test_readme_encryption_walkthrough_runs_as_written(tmp_path):
    """README, "Encryption": a key, an upload, a look at the host, and the copy
    opened with the real age command."""
    import shutil

    import pytest

    if shutil.which("age") is None:
        if os.environ.get("CM_REQUIRE_AGE") == "1":
            pytest.fail("the age command is required here (CM_REQUIRE_AGE=1)")
        pytest.skip("no age command")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in python_blocks(readme) if "new_identity_file(\"pool.key\")" in b)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True False", "only for the board",
                                          "only for the board"]
    assert oct(os.stat(tmp_path / "pool.key").st_mode & 0o777) == "0o600"
