"""The figures the reliability, security and property tests print at the end
of a run (README, "Reliability"): kill points survived, stress operations,
fuzz examples, faults injected, data lost.

Tests add to them; ``tests/reliability/conftest.py`` prints them in the
terminal summary. They count what this run did, so a partial run prints
partial figures.
"""

import collections

#: ``{figure name: number}``, in the order figures were first added.
FIGURES = collections.OrderedDict()

#: The names, in the order they are printed.
KILL_POINTS = "kill points survived (SIGKILL, reopen, check clean)"
CRASH_FILES = "files verified byte for byte after kills"
STRESS_OPS = "stress operations run (4 processes, one pool)"
CHAOS_PROCS = "cm processes run in the chaos test (one pool)"
CHAOS_KILLS = "cm processes SIGKILLed at random in the chaos test"
CHAOS_FILES = "files verified byte for byte after the chaos test"
FUZZ = "fuzz examples tried (hypothesis)"
FAULTS = "faults injected"
DATA_LOST = "data lost (files upload() returned whose bytes did not come back)"
ORDER = (KILL_POINTS, CRASH_FILES, STRESS_OPS, CHAOS_PROCS, CHAOS_KILLS, CHAOS_FILES, FUZZ,
         FAULTS, DATA_LOST)


def add(name, count=1):
    """Add ``count`` to a figure (creating it at 0)."""
    FIGURES[name] = FIGURES.get(name, 0) + count
