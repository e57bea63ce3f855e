"""Fixtures for the ``cm`` tests: a private home (user dirs under tmp_path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudmanager import cli as cli_module


class Home:
    """A user whose config, data and cache dirs live under ``tmp_path``."""

    def __init__(self, root, work):
        self.root = root
        self.work = work  # the current directory of every command
        self.env = {
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "data"),
            "XDG_CACHE_HOME": str(root / "cache"),
        }

    def database(self, path):
        """What ``cm status`` shows as the database of a pool configured with ``path``."""
        return self.database_url or str(path)

    def own_catalog(self):
        """From now on, commands use a catalog of their own (another node with
        a catalog apart), when the catalog comes from the environment."""
        if self.database_url is not None:
            self.database_url = self.server.new_database()
            self.env["CLOUDMANAGER_DATABASE"] = self.database_url
            self.monkeypatch.setenv("CLOUDMANAGER_DATABASE", self.database_url)

    @property
    def data(self):
        return Path(self.env["XDG_DATA_HOME"]) / "cloudmanager"

    @property
    def local_host(self):
        """The embedded defaults' folder host."""
        return self.data / "hosts" / "local"

    def file(self, name, data):
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def cm(self, *args, input=None):
        """Run ``cm ARGS`` in this process (click's runner)."""
        result = CliRunner().invoke(cli_module.cli, [str(a) for a in args], input=input, prog_name="cm",
                                    catch_exceptions=False)
        return result

    def cm_json(self, *args):
        result = self.cm(*args, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    def run(self, *args, input=None, env=None, text=True):
        """Run ``python -m cloudmanager ARGS`` as a real subprocess (``text=False``:
        stdout and stderr as bytes)."""
        full_env = dict(os.environ)
        full_env.pop("CLOUDMANAGER_CONFIG", None)
        full_env.pop("CLOUDMANAGER_DATABASE", None)
        full_env.update(self.env, **(env or {}))
        return subprocess.run([sys.executable, "-m", "cloudmanager"] + [str(a) for a in args],
                              cwd=self.work, env=full_env, input=input, capture_output=True,
                              text=text, timeout=120)


@pytest.fixture
def home(tmp_path, monkeypatch, pool_catalog):
    """A fresh user home; in-process commands run in ``home.work``. In the
    suites run on both catalogs, its pools' catalog is a new PostgreSQL
    database, given as ``$CLOUDMANAGER_DATABASE`` (over any config file)."""
    work = tmp_path / "work"
    work.mkdir()
    h = Home(tmp_path, work)
    h.database_url = None
    h.monkeypatch = monkeypatch
    h.server = pool_catalog.server
    if pool_catalog.server is not None:
        h.database_url = pool_catalog.server.new_database()
        h.env["CLOUDMANAGER_DATABASE"] = h.database_url
    for key, value in h.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CLOUDMANAGER_CONFIG", raising=False)
    if h.database_url is None:
        monkeypatch.delenv("CLOUDMANAGER_DATABASE", raising=False)
    monkeypatch.chdir(work)
    # Files written by the test a moment ago count as stable, so a re-run may
    # skip them (the subprocess tests keep the real window).
    monkeypatch.setattr("cloudmanager.sources.RACY_WINDOW_NS", 0)
    return h
