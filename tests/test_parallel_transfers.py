"""Parallel transfers per host (issue 16): ``upload_many``, ``cm upload DIR``
(the scheduler) and ``sync`` keep up to ``max_connections`` uploads in flight
on each host, never more, S3 included; a host failing some of them under
parallelism leaves no file short of its redundancy.

Real pools (SQLite catalogs), real S3 hosts on moto's server over loopback.
The one stand-in: host subclasses defined here that count the calls in
flight around a real host's ``upload``. No timing assertions: the first
calls wait (at most :data:`WAIT` seconds) until the bound is reached, so
reaching it does not depend on how fast the machine is.
"""

import contextlib
import hashlib
import os
import threading
import time

import pytest

from cloudmanager.errors import TransientHostError
from cloudmanager.hosts.s3 import S3Host
from cloudmanager.scheduler import upload_files

from hosts.s3_server import aws_env, moto_endpoint, s3_admin  # noqa: F401  (fixtures)

#: Seconds the first uploads wait for the others before going on anyway
#: (the bound then shows as not reached: a failure, never a hang).
WAIT = 30.0


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Gauge:
    """Uploads in flight on one host: how many at most, and how many in all.

    Until ``expect`` run at once, each new call waits for the others (at most
    :data:`WAIT` seconds, once); from then on none waits.
    """

    def __init__(self, expect):
        self.expect = expect
        self.cond = threading.Condition()
        self.running = 0
        self.most = 0
        self.calls = 0
        self.reached = False

    @contextlib.contextmanager
    def track(self):
        with self.cond:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            if self.running >= self.expect:
                self.reached = True
                self.cond.notify_all()
            deadline = time.monotonic() + WAIT
            while not self.reached and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            # Not reached in time: the gate opens for good (the test fails
            # on ``most``, it does not wait again for every call).
            self.reached = True
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1


class CountingS3Host(S3Host):
    """An S3 host whose uploads are counted by its :class:`Gauge`; with
    ``fail_every``, every that-many-th upload fails (transient) after the
    real upload was counted, before it is sent."""

    def __init__(self, *args, fail_every=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gauge = Gauge(self.max_connections)
        self.fail_every = fail_every
        self.failed = 0

    def upload(self, local_path, name):
        with self.gauge.track():
            if self.fail_every:
                with self.gauge.cond:
                    fail = self.gauge.calls % self.fail_every == 0
                    self.failed += fail
                if fail:
                    raise TransientHostError(self.name, "chosen failure of %s" % name)
            return super().upload(local_path, name)


@pytest.fixture
def s3_hosts(moto_endpoint, s3_admin):  # noqa: F811
    """``make(max_connections...)``: counting S3 hosts, each on a bucket of its own."""
    made, buckets = [], []

    def make(*connections, options=None):
        hosts = []
        for n, limit in enumerate(connections):
            bucket = "par-%d-%s" % (n, os.urandom(6).hex())
            s3_admin.create_bucket(Bucket=bucket)
            buckets.append(bucket)
            host = CountingS3Host(bucket, "pool", endpoint_url=moto_endpoint,
                                  region="us-east-1", addressing_style="path",
                                  name="s3-%d" % n, max_connections=limit,
                                  **(options or {}).get(n, {}))
            hosts.append(host)
        made.extend(hosts)
        return hosts

    yield make
    for bucket in buckets:
        for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if keys:
                s3_admin.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        s3_admin.delete_bucket(Bucket=bucket)


def stored(s3_admin, host):  # noqa: F811
    """The object names in a host's bucket."""
    names = set()
    for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=host.bucket,
                                                                   Prefix="pool/"):
        names.update(item["Key"][len("pool/"):] for item in page.get("Contents", ()))
    return names


def small_files(write_file, count):
    return [write_file("f%03d" % i, b"%d:" % i + os.urandom(200)) for i in range(count)]


def assert_bounds_held_and_reached(hosts):
    for host in hosts:
        assert host.gauge.most == host.max_connections, (host.name, host.gauge.most)


def test_upload_many_keeps_each_host_at_its_max_connections(make_pool, write_file, s3_hosts,
                                                            s3_admin):  # noqa: F811
    hosts = s3_hosts(3, 2)
    cm = make_pool(1 << 22, hosts=hosts, redundancy=2)
    files = small_files(write_file, 120)
    results = cm.upload_many(files)
    assert results == [sha(f.read_bytes()) for f in files]
    assert_bounds_held_and_reached(hosts)
    for host in hosts:
        assert stored(s3_admin, host) == set(results)
    assert cm.stats()["queued"] == 0


def test_the_upload_scheduler_keeps_each_host_at_its_max_connections(make_pool, write_file,
                                                                     s3_hosts):
    # cm upload DIR: batches down one stream, each an upload_many.
    hosts = s3_hosts(4, 2)
    cm = make_pool(1 << 22, hosts=hosts, redundancy=2)
    files = small_files(write_file, 150)
    with contextlib.closing(upload_files(cm, files, batch_files=70)) as batches:
        uploaded = [u for batch in batches for u in batch]
    assert sorted(u.hash for u in uploaded) == sorted(sha(f.read_bytes()) for f in files)
    assert_bounds_held_and_reached(hosts)
    assert cm.stats()["queued"] == 0


def test_sync_keeps_each_host_at_its_max_connections(make_pool, write_file, s3_hosts):
    hosts = s3_hosts(3, 4)
    cm = make_pool(1 << 22, hosts=hosts, redundancy=2)
    files = small_files(write_file, 100)
    assert all(cm.upload_many(files, defer=True))
    assert sum(h.gauge.calls for h in hosts) == 0  # deferred: nothing sent yet
    summary = cm.sync()
    assert summary["complete"] == len(files)
    assert_bounds_held_and_reached(hosts)


def test_failures_under_parallelism_fail_over_and_every_file_reaches_its_redundancy(
        make_pool, write_file, s3_hosts, s3_admin):  # noqa: F811
    # Three hosts, redundancy 2; one fails every third upload while all run
    # in parallel: its files go to the third host instead, and each file
    # ends with two good copies on two hosts.
    hosts = s3_hosts(3, 3, 2, options={0: {"fail_every": 3}})
    flaky = hosts[0]
    flaky.weight = 10.0  # tried first for every file
    hosts[1].weight = 5.0
    cm = make_pool(1 << 22, hosts=hosts, redundancy=2)
    files = small_files(write_file, 90)
    results = cm.upload_many(files)
    assert all(results)
    assert flaky.failed > 0
    for host in hosts:
        assert host.gauge.most <= host.max_connections
    held = {h.name: stored(s3_admin, h) for h in hosts}
    for digest in results:
        good = [u["host_name"] for u in cm.info(digest)["uploads"] if not u.get("error")]
        assert len(set(good)) == 2, (digest, good)
        for name in good:
            assert digest in held[name]
    assert cm.stats()["queued"] == 0


def test_hosts_with_many_connections_get_them_all(make_pool, write_file, s3_hosts):
    # More connections in all than the batch's usual groups in flight (16):
    # each host still gets as many uploads at once as it allows.
    hosts = s3_hosts(16, 12)
    cm = make_pool(1 << 23, hosts=hosts, redundancy=2)
    files = small_files(write_file, 400)
    assert all(cm.upload_many(files))
    assert_bounds_held_and_reached(hosts)
