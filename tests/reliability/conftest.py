"""Prints the reliability figures (see ``figures.py``) after the test run."""

from . import figures


def pytest_terminal_summary(terminalreporter):
    if not figures.FIGURES:
        return
    terminalreporter.section("reliability figures")
    names = [n for n in figures.ORDER if n in figures.FIGURES]
    names += [n for n in figures.FIGURES if n not in names]
    for name in names:
        terminalreporter.write_line("%8d  %s" % (figures.FIGURES[name], name))
