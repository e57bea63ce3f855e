"""cloudmanager.toml: parsing, checking, and building a pool from it."""

import json
import logging
import textwrap

import pytest

from cloudmanager import CloudManager
from cloudmanager.config import load_config, parse_size, shown_database
from cloudmanager.errors import ConfigError, MissingDependencyError


def write_config(tmp_path, text):
    path = tmp_path / "cloudmanager.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_pool_built_from_a_config_file(tmp_path, write_file):
    path = write_config(tmp_path, """
        [pool]
        database = "state/pool.sqlite3"
        storage = "state/cache"
        capacity = "1 MiB"
        redundancy = 2
        fsync = false

        [hosts.nas]
        spec = "dir:%s"

        [hosts.usb]
        spec = "dir:%s"
        weight = 3

        [hosts.gone]
        spec = "plowshare:mediafire"
        enabled = false
        """ % (tmp_path / "nas", tmp_path / "usb"))
    with CloudManager(config=path) as cm:
        assert cm.cache.capacity == 1 << 20 and cm.redundancy == 2
        assert sorted(cm.engine.hosts) == ["nas", "usb"]  # the disabled one is not built
        assert cm.engine.hosts["usb"].weight == 3.0
        digest = cm.upload(write_file("f", b"configured"))
        assert sorted(u["host_name"] for u in cm.info(digest)["uploads"]) == ["nas", "usb"]
    # Relative paths start at the file's directory, not the working directory.
    assert (tmp_path / "state" / "pool.sqlite3").exists()
    assert (tmp_path / "state" / "cache").is_dir()


def test_explicit_arguments_win_over_the_file(tmp_path):
    path = write_config(tmp_path, """
        [pool]
        database = "a.sqlite3"
        storage = "cache"
        capacity = 1000
        redundancy = 3
        [hosts.h]
        spec = "memory:cfg-explicit"
        """)
    with CloudManager(config=path, storage_size=5000, redundancy=1,
                      hosts=["dir:%s" % (tmp_path / "other")]) as cm:
        assert cm.cache.capacity == 5000 and cm.redundancy == 1
        assert list(cm.engine.hosts) == ["dir:%s" % (tmp_path / "other")]


def test_weight_orders_equally_healthy_hosts(tmp_path):
    path = write_config(tmp_path, """
        [pool]
        database = "db"
        storage = "c"
        capacity = 1000
        [hosts.light]
        spec = "memory:cfg-light"
        weight = 0.5
        [hosts.heavy]
        spec = "memory:cfg-heavy"
        weight = 5
        """)
    with CloudManager(config=path, redundancy=1) as cm:
        hosts = list(cm.engine.hosts.values())
        for _ in range(10):
            usable, _cooling = cm.engine.health.ranked(hosts)
            assert [h.name for h in usable] == ["heavy", "light"]


@pytest.mark.parametrize("text, message", [
    ("[pool]\ncapacity = 'lots'\n", "not a size"),
    ("[pool]\nredundancy = '2'\n", "pool.redundancy has the wrong type"),
    ("[pool]\ncolour = 'blue'\n", "unknown setting pool.colour"),
    ("[extra]\n", "unknown table extra"),
    ("[hosts.a]\nweight = 1\n", "hosts.a needs a spec"),
    ("[hosts.a]\nspec = 'dir:/x'\nweight = 0\n", "weight must be a positive number"),
    ("[hosts.a]\nspec = 'dir:/x'\nenabled = 'yes'\n", "enabled must be true or false"),
    ("[hosts.a]\nspec = 'dir:/x'\nspeed = 1\n", "unknown setting hosts.a.speed"),
    ("[hosts.'-rf']\nspec = 'dir:/x'\n", "not a valid host name"),
    ("[pool\n", "not valid TOML"),
])
def test_bad_settings_are_refused_with_the_file_and_setting_named(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        CloudManager(config=tmp_path / "nope.toml")


def test_an_unknown_host_kind_is_refused_at_construction(tmp_path):
    path = write_config(tmp_path, """
        [pool]
        database = "db"
        storage = "c"
        capacity = 1000
        [hosts.x]
        spec = "carrier-pigeon:coop"
        """)
    with pytest.raises(Exception, match="unknown host kind 'carrier-pigeon'"):
        CloudManager(config=path)


def test_size_units():
    assert parse_size("1 KiB") == 1024 and parse_size("2GB") == 2 * 10**9
    assert parse_size(" 3 tib ") == 3 * 2**40 and parse_size("10") == 10


def test_secrets_in_options_never_show(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = write_config(tmp_path, """
        [pool]
        database = "db"
        storage = "c"
        capacity = 1000
        [hosts.dav]
        spec = "memory:cfg-secret"
        options = { latency = 0.0 }
        [hosts.locked]
        spec = "plowshare:mediafire"
        enabled = false
        options = { password = "hunter2-secret", api_token = "tok-secret" }
        """)
    config = load_config(path)
    described = json.dumps([h.describe() for h in config.hosts]) + repr(config)
    assert "hunter2-secret" not in described and "tok-secret" not in described
    assert '"password": "***"' in described


def test_a_missing_optional_dependency_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['boto3'] = None\n"
            "from cloudmanager.hosts import host_class\n"
            "try:\n    host_class('s3')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert out.startswith(MissingDependencyError.__name__)
    assert "pip install 'cloudmanager[s3]'" in out


def test_secrets_in_specs_and_nested_options_never_show(tmp_path):
    path = write_config(tmp_path, """
        [hosts.dav]
        spec = "fsspec:webdav+https://alice:hunter2-secret@dav.example.org/pool"
        [hosts.dav.options]
        storage_options = { password = "nested-secret", headers = { X-Api-Token = "hdr-secret" } }
        """)
    described = json.dumps([h.describe() for h in load_config(path).hosts])
    for secret in ("hunter2-secret", "nested-secret", "hdr-secret"):
        assert secret not in described
    assert "alice:***@dav.example.org" in described


@pytest.mark.parametrize("options, message", [
    ('{ fsynk = false }', "hosts.nas: .*fsynk"),
    ('{ weight = 2 }', "set it as hosts.nas.weight"),
    ('{ name = "x" }', "options.name"),
])
def test_bad_host_options_are_config_errors(tmp_path, options, message):
    path = write_config(tmp_path, """
        [pool]
        database = "db"
        storage = "c"
        capacity = 1000
        [hosts.nas]
        spec = "dir:%s"
        options = %s
        """ % (tmp_path / "nas", options))
    with pytest.raises(ConfigError, match=message):
        CloudManager(config=path)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_database_url_is_not_taken_for_a_relative_path(tmp_path, monkeypatch, scheme):
    """Once, `postgresql://...` became a folder named `postgresql:` in the
    working directory, and each node its own SQLite file."""
    url = "%s://cm:hunter2@db.example:5432/pool" % scheme
    cfg = tmp_path / "cloudmanager.toml"
    cfg.write_text('[pool]\ndatabase = "%s"\nstorage = "cache"\ncapacity = "1 MiB"\n' % url)
    config = load_config(cfg)
    assert config.pool["database"] == url
    assert config.pool["storage"] == str(tmp_path / "cache")
    assert shown_database(url) == "%s://cm:***@db.example:5432/pool" % scheme
    assert shown_database(str(tmp_path / "x.sqlite3")) == str(tmp_path / "x.sqlite3")
