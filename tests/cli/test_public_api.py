"""The command line uses the library's public API only.

Every module of ``cloudmanager/cli/`` is parsed, and the test fails on:

- an attribute ``.db``, ``.cache``, ``.engine`` or ``.pool``, on anything
  (the facade's internals; ``getattr(x, "db")`` too);
- any other private attribute (``x._name``; dunders are public);
- importing ``cloudmanager.db``, ``cloudmanager.pool``, ``cloudmanager.cache``
  or ``cloudmanager.engine`` (or anything in them), however it is spelled;
- importing a name that starts with ``_`` from anything in ``cloudmanager``.

What the CLI needs and the facade lacks gets a public method on
:class:`~cloudmanager.CloudManager` instead.
"""

import ast
from pathlib import Path

import pytest

import cloudmanager.cli

CLI_DIR = Path(cloudmanager.cli.__file__).resolve().parent
INTERNAL_ATTRIBUTES = {"db", "cache", "engine", "pool"}
INTERNAL_MODULES = {"cloudmanager.db", "cloudmanager.pool", "cloudmanager.cache",
                    "cloudmanager.engine"}


def is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_internal_module(dotted):
    return any(dotted == m or dotted.startswith(m + ".") for m in INTERNAL_MODULES)


def violations(source, module):
    """What in ``source`` (the text of module ``module``, e.g.
    ``cloudmanager.cli.app``) reaches past the public API, as ``[(line, what)]``."""
    # What relative imports start from: the package itself for an __init__.
    package = module[:-len(".__init__")] if module.endswith(".__init__") \
        else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if node.attr in INTERNAL_ATTRIBUTES:
                found.append((node.lineno, "attribute .%s" % node.attr))
            elif is_private(node.attr):
                found.append((node.lineno, "private attribute .%s" % node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) \
                and (node.args[1].value in INTERNAL_ATTRIBUTES or is_private(node.args[1].value)):
            found.append((node.lineno, "%s(..., %r)" % (node.func.id, node.args[1].value)))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if is_internal_module(alias.name):
                    found.append((node.lineno, "import %s" % alias.name))
                elif alias.name.startswith("cloudmanager.") and any(
                        is_private(part) for part in alias.name.split(".")):
                    found.append((node.lineno, "import %s" % alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin != "cloudmanager" and not origin.startswith("cloudmanager."):
                continue
            if is_internal_module(origin):
                found.append((node.lineno, "from %s import ..." % origin))
            elif any(is_private(part) for part in origin.split(".")):
                found.append((node.lineno, "from %s import ..." % origin))
            for alias in node.names:
                if is_private(alias.name):
                    found.append((node.lineno, "from %s import %s" % (origin, alias.name)))
                elif is_internal_module("%s.%s" % (origin, alias.name)):
                    found.append((node.lineno, "from %s import %s" % (origin, alias.name)))
    return found


def cli_modules():
    for path in sorted(CLI_DIR.rglob("*.py")):
        parts = path.relative_to(CLI_DIR.parent.parent).with_suffix("").parts
        yield path, ".".join(parts)


def test_the_cli_package_is_walked():
    names = {module for _, module in cli_modules()}
    assert {"cloudmanager.cli.__init__", "cloudmanager.cli.app", "cloudmanager.cli.output"} \
        <= names and len(names) >= 5


@pytest.mark.parametrize("path,module", list(cli_modules()),
                         ids=[m for _, m in cli_modules()])
def test_the_cli_uses_only_the_public_api(path, module):
    found = violations(path.read_text(encoding="utf-8"), module)
    assert not found, "%s reaches past the public API:\n%s" % (
        path, "\n".join("  line %d: %s" % hit for hit in found))


@pytest.mark.parametrize("source", [
    "cm.db.path",
    "cm.cache.capacity",
    "x = manager.engine",
    "session.pool()",
    "getattr(cm, 'db')",
    "cm._closed",
    "from cloudmanager.db import FileDatabase",
    "from ..db import FileDatabase",
    "from ..db.sources import SourceIndex",
    "from .. import db",
    "from .. import pool",
    "import cloudmanager.cache",
    "import cloudmanager.engine as engine",
    "from cloudmanager.manager import _checked",
    "from ..manager import _FAILURES",
    "from ..errors import _FailuresError",
    "from .output import _helper",
    "from cloudmanager import _private",
])
def test_the_check_catches_what_it_forbids(source):
    assert violations(source, "cloudmanager.cli.app"), source


@pytest.mark.parametrize("source", [
    "from cloudmanager import CloudManager",
    "from ..manager import CloudManager",
    "from .. import __version__",
    "from ..sources import walk",
    "from ..scheduler import upload_files",
    "from .app import Session",
    "import click",
    "from os import path",
    "cm.settings()['database']",
    "type(exc).__name__",
])
def test_the_check_lets_the_public_api_through(source):
    assert violations(source, "cloudmanager.cli.app") == []
