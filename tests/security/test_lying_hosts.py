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


def test_claim_plowdown_cannot_fill_the_disk(make_pool, write_file, fake_plowshare):
    """A file locker that sends far more than the file has: plowdown is killed
    once it writes past the reserved size, so the cache never holds more than
    its capacity (a 1 MiB cache once reached 53 MB this way)."""
    import threading
    import time

    cm = make_pool(capacity=1 << 20, hosts=["plowshare:locker"], redundancy=1)
    digest = cm.upload(write_file("f", b"small file on a locker"))
    cm.evict(0)
    fake_plowshare.faults("locker", grow_download=64 << 20)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            for root, _, names in os.walk(cm.cache.root):
                for name in names:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_size
                    except FileNotFoundError:
                        pass
            peak[0] = max(peak[0], total)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert cm.warm_up(digest) is False
    finally:
        done.set()
        sampler.join()
    # The watch polls every 20 ms: what the tool writes between two polls is
    # the most it can overshoot by (a few MiB at this machine's disk speed).
    assert peak[0] <= (1 << 20) + (4 << 20), peak[0]
    assert os.listdir(cm.cache.tmp_dir) == [] and cm.usage_ratio() == 0
