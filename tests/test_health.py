"""The one circuit breaker (cloudmanager/health.py), on a real database, with the
clocks under the test's control."""

import pytest

from cloudmanager.health import MAX_COOLDOWN, Fact, Health


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


class Host:
    def __init__(self, name, weight=1.0):
        self.name, self.weight = name, weight


@pytest.fixture
def clocks():
    return Clock(1000.0), Clock(1_700_000_000.0)


@pytest.fixture
def health(db, clocks):
    mono, wall = clocks
    return Health(db, threshold=3, cooldown=10.0, clock=mono, wall_clock=wall)


def fail(health, name, n=1):
    for _ in range(n):
        health.record([Fact(name, False, error="down")])


def test_one_failure_per_host_per_operation_or_batch(health, db):
    health.record([Fact("h", False, error="x")] * 40)  # a batch of 40 files, one host
    assert db.health.all()["h"].consecutive_failures == 1
    health.record([Fact("h", False, error="x"), Fact("h", True, latency_ms=5.0)])
    assert db.health.all()["h"].consecutive_failures == 0  # any success in a batch closes it


def test_local_errors_never_count(health, db):
    health.record([Fact("h", False, error="disk full here", counts=False)] * 5)
    assert db.health.all().get("h") is None or db.health.all()["h"].consecutive_failures == 0
    assert not health.cooling("h")


def test_the_breaker_opens_doubles_and_caps(health, clocks):
    mono, wall = clocks
    fail(health, "h", 3)
    assert health.cooling("h")
    assert health.retry_after("h") == pytest.approx(wall.now + 10)
    mono.now += 10.5
    wall.now += 10.5
    assert not health.cooling("h")  # half-open: this probe may go
    fail(health, "h")  # the probe failed: open again, twice as long
    assert health.retry_after("h") == pytest.approx(wall.now + 20)
    fail(health, "h", 30)
    assert health.retry_after("h") == pytest.approx(wall.now + MAX_COOLDOWN)


def test_a_clock_stepped_back_does_not_stretch_the_cool_down(db, clocks):
    mono, wall = clocks
    # The last failure was stamped by a clock a day ahead of this one.
    Health(db, cooldown=60.0, clock=mono, wall_clock=Clock(wall.now + 86400)).record(
        [Fact("h", False, error="x")] * 1)
    ahead = Health(db, cooldown=60.0, clock=mono, wall_clock=Clock(wall.now + 86400))
    fail(ahead, "h", 2)
    health = Health(db, cooldown=60.0, clock=mono, wall_clock=wall)
    assert health.cooling("h")
    mono.now += 61  # one window of this process's monotonic time, whatever the wall says
    assert not health.cooling("h")


def test_a_half_open_host_takes_one_probe_at_a_time(health, clocks):
    mono, wall = clocks
    fail(health, "h", 3)
    mono.now += 11
    wall.now += 11
    hosts = [Host("h")]
    usable, cooling = health.ranked(hosts)
    assert [h.name for h in usable] == ["h"]  # the probe
    usable, cooling = health.ranked(hosts)
    assert usable == [] and [h.name for h in cooling] == ["h"]  # others wait for its outcome
    health.record([Fact("h", True, latency_ms=1.0)])
    assert [h.name for h in health.ranked(hosts)[0]] == ["h"]  # closed


def test_a_probe_given_back_lets_the_next_operation_try(health, clocks):
    mono, wall = clocks
    fail(health, "h", 3)
    mono.now += 11
    wall.now += 11
    assert health.admit(["h"], {"h": (3, wall.now - 11)}) == ["h"]
    health.release(["h"])
    assert health.admit(["h"], {"h": (3, wall.now - 11)}) == ["h"]


def test_an_explicit_command_probes_a_cooling_host_at_once(health):
    fail(health, "h", 3)
    assert health.cooling("h")
    health.probe_now(["h"])
    assert not health.cooling("h")  # one try, now
    fail(health, "h")
    assert health.cooling("h")  # it failed: cooling again, no more free tries


def test_reset_forgets_the_streak_for_everyone(health, db, clocks):
    mono, wall = clocks
    fail(health, "h", 5)
    health.reset(["h"])
    assert db.health.all()["h"].consecutive_failures == 0
    other = Health(db, cooldown=10.0, clock=mono, wall_clock=wall)  # another process
    assert not other.cooling("h")


def test_ranking_puts_the_healthiest_and_heaviest_first(health):
    fail(health, "sick")
    hosts = [Host("sick", 5.0), Host("light", 0.5), Host("heavy", 5.0)]
    for _ in range(10):
        usable, cooling = health.ranked(hosts)
        assert [h.name for h in usable] == ["heavy", "light", "sick"] and cooling == []


def test_facts_fill_the_transfer_meter(health, db):
    health.record([Fact("a", True, 1.0, uploaded=10), Fact("b", True, 2.0, downloaded=7)])
    health.record([Fact("a", False, error="x", uploaded=0)])
    (up, down), = db.health.transfers().values()
    assert (up, down) == (10, 7)
