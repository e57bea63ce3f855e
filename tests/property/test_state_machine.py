"""A hypothesis state machine drives CloudManager against a small model.

The model keeps the files, the cached set in LRU order, the pins and the
capacity, and predicts what each call does: uploads and fetches reserve room
by evicting the least recently used unpinned files (all or nothing), hits
move a file to the most recent end, ``evict(target)`` evicts as far as it
can. After every step the pool must agree with the model, hold no more than
its capacity, and check clean.

The hosts are two in-memory hosts that are always up, so every uploaded file
has verified copies and may be evicted unless pinned.
"""

import hashlib
import os
import shutil
import tempfile
import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from cloudmanager import CloudManager
from cloudmanager.hosts.memory import MemoryHost
from reliability.figures import FUZZ, add

CAPACITY = 4096


class PoolModel(RuleBasedStateMachine):
    files = Bundle("files")

    def __init__(self):
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="cm-model-")
        tag = uuid.uuid4().hex
        hosts = [MemoryHost("model-a-" + tag, name="a"), MemoryHost("model-b-" + tag, name="b")]
        self.cm = CloudManager(os.path.join(self.base, "db.sqlite3"),
                               os.path.join(self.base, "cache"), CAPACITY, hosts=hosts,
                               redundancy=2, fsync=False)
        self.data = {}       # hash -> bytes
        self.lru = []        # cached hashes, least recently used first
        self.pinned = set()
        self.src = os.path.join(self.base, "src")

    # -- the model's rules -----------------------------------------------------

    def used(self):
        return sum(len(self.data[h]) for h in self.lru)

    def make_room(self, size):
        """Evict for a ``size``-byte reservation, all or nothing; False if it cannot."""
        excess = self.used() + size - CAPACITY
        victims, freed = [], 0
        for h in self.lru:
            if freed >= excess:
                break
            if h not in self.pinned:
                victims.append(h)
                freed += len(self.data[h])
        if freed < excess:
            return False
        for h in victims:
            self.lru.remove(h)
        return True

    def use(self, h):
        if h in self.lru:
            self.lru.remove(h)
        self.lru.append(h)

    # -- rules -------------------------------------------------------------------

    @initialize()
    def count_example(self):
        add(FUZZ)

    @rule(target=files, data=st.binary(max_size=CAPACITY + 512) | st.sampled_from(
        [b"", b"x" * 3000, b"y" * 1500, b"z" * CAPACITY]))
    def upload(self, data):
        with open(self.src, "wb") as f:
            f.write(data)
        h = hashlib.sha256(data).hexdigest()
        assert self.cm.upload(self.src) == h
        self.data[h] = data
        if len(data) <= CAPACITY and self.make_room(len(data)):
            self.use(h)
        return h

    @rule(h=files)
    def warm_up(self, h):
        if h not in self.data:
            assert self.cm.warm_up(h) is None
            return
        path = self.cm.warm_up(h)
        if h in self.lru:
            self.use(h)
        elif len(self.data[h]) <= CAPACITY and self.make_room(len(self.data[h])):
            self.use(h)
        else:
            assert path is False
            return
        with open(path, "rb") as f:
            assert f.read() == self.data[h]

    @rule(h=files)
    def download(self, h):
        dest = os.path.join(self.base, "out")
        before = None
        if os.path.exists(dest):
            with open(dest, "rb") as f:
                before = f.read()
        if h not in self.data:
            assert self.cm.download(h, dest) is None
            return
        if before is not None and before != self.data[h]:
            # Other bytes are never replaced unless asked, and nothing is fetched.
            assert self.cm.download(h, dest) is False
            with open(dest, "rb") as f:
                assert f.read() == before
        got = self.cm.download(h, dest, overwrite=True)
        assert got == dest
        with open(dest, "rb") as f:
            assert f.read() == self.data[h]
        if before == self.data[h]:
            return  # the destination held the file already: nothing was fetched
        if h in self.lru:
            self.use(h)
        elif len(self.data[h]) <= CAPACITY and self.make_room(len(self.data[h])):
            self.use(h)

    @rule(target_bytes=st.integers(0, CAPACITY))
    def evict(self, target_bytes):
        expected = 0
        excess = self.used() - target_bytes
        for h in list(self.lru):
            if excess <= 0:
                break
            if h not in self.pinned:
                self.lru.remove(h)
                excess -= len(self.data[h])
                expected += 1
        assert self.cm.evict(target_bytes) == expected

    @rule(h=files, pinned=st.booleans())
    def pin(self, h, pinned):
        assert self.cm.pin(h, pinned) == (h in self.data)
        if h in self.data:
            (self.pinned.add if pinned else self.pinned.discard)(h)

    @rule(h=consumes(files))
    def remove(self, h):
        result = self.cm.remove(h)
        if h not in self.data:
            assert result is None
            return
        assert result["kept"] == []
        del self.data[h]
        self.pinned.discard(h)
        if h in self.lru:
            self.lru.remove(h)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        for h in self.data:
            assert self.cm.exists(h)
            assert self.cm.on_cache(h) == (h in self.lru), h
        assert self.cm.stats()["cached_bytes"] == self.used() <= CAPACITY

    @invariant()
    def checks_clean(self):
        report = self.cm.check()
        # A pin on a file that is not cached is the one finding plain use
        # can make (pin() does not fetch); it must be exactly the model's.
        assert report["pins_without_file"] == sorted(self.pinned - set(self.lru)), report
        assert report["unrepaired"] in ([], ["pins_without_file"]), report

    def teardown(self):
        self.cm.close()
        shutil.rmtree(self.base, ignore_errors=True)


PoolModel.TestCase.settings = settings(
    max_examples=20, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_pool_agrees_with_its_model = PoolModel.TestCase
