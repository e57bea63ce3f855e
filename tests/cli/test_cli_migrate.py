"""``cm migrate``: the pool's database to PostgreSQL and back, from the command line.

The destination is a database on the real server of ``tests/pg_server.py``,
owned by a role with a password, given in the URL: it must never be shown.
"""

import json

from cloudmanager.config import load_config, shown_database

PASSWORD_FREE = "cm_secret_user:***@"


def upload_one(home, name="notes.txt", data=b"hello, pool\n"):
    home.file(name, data)
    result = home.cm("upload", name)
    assert result.exit_code == 0, result.stderr
    return result.stdout.split()[0]


def shown(*results):
    return "".join(r.stdout + r.stderr for r in results)


def test_migrate_to_postgresql_and_back_writing_the_config(home, postgres_server, caplog):
    from pg_server import PASSWORD

    url = postgres_server.password_url()
    assert home.cm("init", "--host", "nas=dir:%s" % (home.root / "nas"),
                   "--capacity", "4 MiB").exit_code == 0
    digest = upload_one(home)
    config = home.work / "cloudmanager.toml"

    there = home.cm("migrate", "--to", url, "--write-config")
    assert there.exit_code == 0, there.stderr
    assert PASSWORD_FREE in there.stdout and "1 file," in there.stdout
    assert "cache index: 1 entry" in there.stdout and ".index.sqlite3" in there.stdout
    # The password is in the (private) config file, as given, and nowhere shown.
    assert load_config(config).pool["database"] == url
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    status = home.cm("status", "--json")
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["database"] == shown_database(url)
    listing = home.cm_json("ls")
    assert [(f["hash"], f["cached"]) for f in listing] == [(digest, True)]
    assert home.cm("download", digest, home.root / "out.txt").exit_code == 0
    assert (home.root / "out.txt").read_bytes() == b"hello, pool\n"

    back = home.cm("migrate", "--to", "back.sqlite3", "--write-config")
    assert back.exit_code == 0, back.stderr
    assert load_config(config).pool["database"] == str(home.work / "back.sqlite3")
    assert home.cm_json("status")["database"] == str(home.work / "back.sqlite3")
    assert [(f["hash"], f["cached"]) for f in home.cm_json("ls")] == [(digest, True)]
    assert PASSWORD not in shown(there, status, back) + caplog.text


def test_migrate_refuses_a_catalog_in_use_and_never_shows_the_password(home, postgres_server,
                                                                         caplog):
    from pg_server import PASSWORD

    url = postgres_server.password_url()
    upload_one(home)  # on the embedded defaults: no config file
    first = home.cm("migrate", "--to", url)
    assert first.exit_code == 0, first.stderr
    assert 'database = "%s' % shown_database(url) in first.stdout
    assert "the password is not shown" in first.stdout

    again = home.cm("migrate", "--to", url)
    assert again.exit_code == 1 and "not empty" in again.stderr and PASSWORD_FREE in again.stderr
    wrong = home.cm("migrate", "--to", url.replace(PASSWORD, "not-" + PASSWORD))
    assert wrong.exit_code == 1 and "password" in wrong.stderr
    verbose = home.cm("-v", "migrate", "--to", url)
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr
    assert PASSWORD not in shown(first, again, wrong, verbose) + caplog.text

    # --write-config needs a config file; nothing is moved without one.
    no_file = home.cm("migrate", "--to", "x.sqlite3", "--write-config")
    assert no_file.exit_code == 2 and "cm init" in no_file.stderr
    assert not (home.work / "x.sqlite3").exists()
    report = home.cm_json("migrate", "--to", "copy.sqlite3")
    assert report["rows"]["files"] == 1 and report["config_written"] is False
    assert report["destination"] == str(home.work / "copy.sqlite3")
