"""The in-memory host: the conformance suite, its shared stores and its faults."""

import uuid

import pytest

from cloudmanager.errors import HostUnavailableError
from cloudmanager.hosts import from_spec
from cloudmanager.hosts.memory import MemoryHost, store

from .conformance import HostConformance, sha


@pytest.fixture
def host():
    return MemoryHost(uuid.uuid4().hex)


@pytest.fixture
def unreachable_host():
    down = MemoryHost(uuid.uuid4().hex)
    down.faults["down"] = True
    return down


class TestMemoryHost(HostConformance):
    @pytest.fixture
    def raw_names(self, host):
        return lambda: sorted(host.objects)

    @pytest.fixture
    def tamper(self, host):
        def tamper(location, data):
            host.objects[host.object_name(location.url)] = data

        return tamper


def test_hosts_of_one_store_share_objects(tmp_path):
    name = uuid.uuid4().hex
    a, b = from_spec("memory:" + name), from_spec("memory:" + name, name="other")
    path = tmp_path / "f"
    path.write_bytes(b"shared")
    location = a.upload(str(path), sha(b"shared"))
    assert b.accepts(location.url)
    b.download(location.url, str(tmp_path / "g"))
    assert (tmp_path / "g").read_bytes() == b"shared"
    assert store(name) == {sha(b"shared"): b"shared"}


def test_corrupt_fault_flips_a_byte(host, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    location = host.upload(str(path), sha(b"abc"))
    host.faults["corrupt"] = True
    host.download(location.url, str(tmp_path / "g"))
    assert (tmp_path / "g").read_bytes() == b"`bc"


def test_down_fault_is_unavailable(unreachable_host, tmp_path):
    with pytest.raises(HostUnavailableError):
        unreachable_host.stat("memory://%s/%s" % (unreachable_host.store_name, "0" * 64))
