"""A hypothesis state machine over real folder hosts: what the pool believes
about its copies must come true after ``verify(deep=True)`` and ``sync()``.

The hosts lose objects, get them corrupted (same size, wrong bytes), get the
right bytes back, are unmounted (their folder renamed away, an empty mount
point left in its place) and remounted. At any moment the ``heal`` rule runs
``verify(deep=True)`` then ``sync()`` and checks, for every host that is
mounted:

- a copy the pool calls good holds the right bytes;
- a copy it calls bad or missing does not;
- every file that can still be had (cached, or right on a mounted host
  where the pool recorded a copy)
  has its target of good copies, as far as the mounted hosts allow (a good
  copy on an unmounted disk still counts: nothing disproved it);

and, for every host, that nothing was ever written onto an empty mount point.
"""

import hashlib
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, rule

import cloudmanager.replication as replication
from cloudmanager import CloudManager
from reliability.figures import FUZZ, add

HOSTS = ("a", "b", "c")
REDUNDANCY = 2


class CopyBeliefs(RuleBasedStateMachine):
    files = Bundle("files")

    def __init__(self):
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="cm-beliefs-")
        self.roots = {n: os.path.join(self.base, "hosts", n) for n in HOSTS}
        self.aside = {n: os.path.join(self.base, "unmounted", n) for n in HOSTS}
        os.makedirs(os.path.join(self.base, "unmounted"))
        for root in self.roots.values():
            os.makedirs(root)
        self.mounted = {n: True for n in HOSTS}
        self.data = {}  # hash -> bytes
        self.saved_base = replication.RECHECK_BASE
        replication.RECHECK_BASE = 0.0  # condemned copies are due again at once
        # A pool that has used every host: a first file on all three. (A
        # folder the pool never used is adopted as it is found: an unmounted
        # disk at first use cannot be told from a new empty folder.)
        self.cm = self.open(redundancy=len(HOSTS))
        self.upload(b"seed")
        self.cm.close()
        self.cm = self.open()

    def open(self, redundancy=REDUNDANCY):
        return CloudManager(os.path.join(self.base, "db.sqlite3"),
                            os.path.join(self.base, "cache"), 1 << 20,
                            hosts=["dir:" + self.roots[n] for n in HOSTS],
                            redundancy=redundancy, fsync=False)

    def disk(self, name):
        """Where host ``name``'s objects really are now."""
        return self.roots[name] if self.mounted[name] else self.aside[name]

    def right(self, name, h):
        path = os.path.join(self.disk(name), h)
        try:
            with open(path, "rb") as f:
                return f.read() == self.data[h]
        except FileNotFoundError:
            return False

    # -- rules -----------------------------------------------------------------------

    @initialize()
    def count_example(self):
        add(FUZZ)

    @rule(target=files, data=st.binary(min_size=1, max_size=2000))
    def upload(self, data):
        path = os.path.join(self.base, "src")
        with open(path, "wb") as f:
            f.write(data)
        h = hashlib.sha256(data).hexdigest()
        assert self.cm.upload(path) == h
        self.data[h] = data
        return h

    @rule(h=files, host=st.sampled_from(HOSTS))
    def lose(self, h, host):
        path = os.path.join(self.disk(host), h)
        if os.path.exists(path):
            os.unlink(path)

    @rule(h=files, host=st.sampled_from(HOSTS))
    def corrupt(self, h, host):
        path = os.path.join(self.disk(host), h)
        if os.path.exists(path):
            with open(path, "wb") as f:
                f.write(bytes(b ^ 0xFF for b in self.data[h]))

    @rule(h=files, host=st.sampled_from(HOSTS))
    def restore(self, h, host):
        with open(os.path.join(self.disk(host), h), "wb") as f:
            f.write(self.data[h])

    @rule(host=st.sampled_from(HOSTS))
    def unmount(self, host):
        if self.mounted[host]:
            os.rename(self.roots[host], self.aside[host])
            os.mkdir(self.roots[host])  # the empty mount point
            self.mounted[host] = False

    @rule(host=st.sampled_from(HOSTS))
    def remount(self, host):
        if not self.mounted[host]:
            assert os.listdir(self.roots[host]) == [], "written onto an empty mount point"
            os.rmdir(self.roots[host])
            os.rename(self.aside[host], self.roots[host])
            self.mounted[host] = True

    @rule()
    def evict(self):
        self.cm.evict(0)

    @rule()
    def reopen(self):
        self.cm.close()
        self.cm = self.open()

    @rule()
    def heal(self):
        self.cm.verify(deep=True)
        self.cm.sync()
        mounted = [n for n in HOSTS if self.mounted[n]]
        for h in self.data:
            status = self.cm.status(h)
            for copy in status["uploads"]:
                if not copy["url"]:
                    continue
                name = next(n for n in HOSTS if copy["host_name"] == "dir:" + self.roots[n])
                if not self.mounted[name]:
                    continue
                if copy["state"] == "good":
                    assert self.right(name, h), (h, name, copy)
                elif copy["state"] in ("bad", "missing"):
                    assert not self.right(name, h), (h, name, copy)
            # Can be had: cached, or right where the pool knows a copy is (a
            # copy put back by hand where none was ever recorded is unknown).
            recorded = {c["host_name"] for c in status["uploads"] if c["url"]}
            can_be_had = self.cm.on_cache(h) or any(
                self.right(n, h) for n in mounted if "dir:" + self.roots[n] in recorded)
            if can_be_had:
                # A good copy on an unmounted disk is still believed (nothing
                # disproved it; after three failed looks it turns suspect and
                # stops counting), so the target counts every good copy.
                good = {c["host_name"] for c in status["uploads"] if c["state"] == "good"}
                assert len(good) >= min(REDUNDANCY, len(mounted)), (h, status)
        for name in HOSTS:
            if not self.mounted[name]:
                assert os.listdir(self.roots[name]) == [], "written onto an empty mount point"

    def teardown(self):
        replication.RECHECK_BASE = self.saved_base
        self.cm.close()
        shutil.rmtree(self.base, ignore_errors=True)


CopyBeliefs.TestCase.settings = settings(
    max_examples=int(os.environ.get("CM_BELIEF_EXAMPLES", "40")), stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_copy_beliefs_come_true_after_verify_and_sync = CopyBeliefs.TestCase
