"""The docs are part of the product: the README quick start must run as written."""

import re
import subprocess
import sys
from pathlib import Path

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


def test_readme_names_the_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install -e '.[develop]'" in readme and "\ntox" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install --quiet -e '.[develop]'" in ci and "\ntox" in ci


def test_every_public_name_has_a_docstring():
    import cloudmanager
    from cloudmanager import cache, database, engine, errors, hosts, serializers, validation
    from cloudmanager.hosts import base, folder, plowshare

    missing = []
    for module in (cloudmanager, cache, database, engine, errors, hosts, serializers,
                   validation, base, folder, plowshare):
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
