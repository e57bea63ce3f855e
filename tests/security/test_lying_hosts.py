"""SECURITY.md, "Hosts that return wrong data": one test per claim."""

import os
import uuid

from cloudmanager.hosts.memory import MemoryHost


def test_claim_wrong_bytes_from_a_host_are_never_served(make_pool, write_file, tmp_path):
    liar = MemoryHost("liar-" + uuid.uuid4().hex, name="liar")
    cm = make_pool(hosts=[liar], redundancy=1)
    digest = cm.upload(write_file("f", b"truth" * 100))
    cm.evict(0)
    liar.faults["corrupt"] = True
    assert cm.warm_up(digest) is False
    dest = tmp_path / "dest"
    assert cm.download(digest, dest) is False and not dest.exists()
    assert cm.db.copies.of(digest)[0].error  # marked bad: never tried again
    assert os.listdir(cm.cache.tmp_dir) == []


def test_claim_a_host_sending_more_bytes_than_recorded_is_cut_off(make_pool, write_file,
                                                                  tmp_path):
    cm = make_pool(hosts=["dir:%s" % (tmp_path / "nas")], redundancy=1)
    digest = cm.upload(write_file("f", b"small"))
    cm.evict(0)
    with open(tmp_path / "nas" / digest, "wb") as f:
        f.write(b"x" * (4 << 20))  # the host now serves 4 MiB for a 5-byte file
    assert cm.warm_up(digest) is False
    assert os.listdir(cm.cache.tmp_dir) == [] and cm.usage_ratio() == 0


def test_claim_a_path_printed_by_plowdown_outside_its_directory_is_ignored(
        make_pool, write_file, fake_plowshare, tmp_path):
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"not the file")
    fake_plowshare.faults("locker", print_path=str(decoy))
    cm = make_pool(hosts=["plowshare:locker"], redundancy=1)
    data = b"the real bytes" * 20
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    with open(cm.warm_up(digest), "rb") as f:
        assert f.read() == data
    assert decoy.read_bytes() == b"not the file"
