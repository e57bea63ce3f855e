"""CloudManager is a thin facade: it logs and returns the seed's values over the
core Pool, which does the work (the architecture issue: "about 300 lines",
when it had the seed's API and ours; it has since gained the original's
wider API and trees, so the bound is per public method).

Docstrings are not counted: ``help(CloudManager)`` is part of the product, so
the facade's methods keep the whole contract in theirs.
"""

import ast
from pathlib import Path

import cloudmanager
from cloudmanager import CloudManager

PACKAGE = Path(cloudmanager.__file__).parent
#: The facade's modules: the seed's API and ours, and the original's wider API.
FACADE = ("manager.py", "original_methods.py")
#: Lines of code per public method, on average: a call to the core and the
#: mapping of its errors to False/None, plus the constructor's settings.
MAX_LINES_PER_METHOD = 8
#: Statements in one method's body: enough to map errors to False/None, not
#: enough to hold logic of its own.
MAX_STATEMENTS = 15


def _docstring_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def test_the_facade_is_a_few_lines_of_code_per_method():
    methods = [n for n in dir(CloudManager)
               if not n.startswith("_") and callable(getattr(CloudManager, n))]
    total = 0
    for name in FACADE:
        text = (PACKAGE / name).read_text(encoding="utf-8")
        docs = _docstring_lines(ast.parse(text))
        total += sum(1 for number, line in enumerate(text.splitlines(), 1)
                     if number not in docs and line.strip()
                     and not line.strip().startswith("#"))
    assert total <= MAX_LINES_PER_METHOD * len(methods), \
        "the facade has %d lines of code for %d methods" % (total, len(methods))


def test_each_facade_method_delegates():
    """No method of the facade holds a loop over work or a long body: those
    belong in the core (pool.py and the modules below it)."""
    for name in FACADE:
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for method in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                body = method.body
                if body and isinstance(body[0], ast.Expr) \
                        and isinstance(body[0].value, ast.Constant):
                    body = body[1:]
                statements = [s for b in body for s in ast.walk(b) if isinstance(s, ast.stmt)]
                assert len(statements) <= MAX_STATEMENTS, "%s.%s" % (cls.name, method.name)
                loops = [s for s in statements if isinstance(s, (ast.For, ast.While))]
                # upload_many's one loop maps the core's outcomes to the seed's values.
                assert len(loops) <= 1, "%s.%s" % (cls.name, method.name)


def test_every_public_facade_method_has_a_docstring():
    """help(CloudManager) is part of the product."""
    for name in dir(CloudManager):
        if not name.startswith("_"):
            attr = getattr(CloudManager, name)
            if callable(attr):
                assert (attr.__doc__ or "").strip(), name
