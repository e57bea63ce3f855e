"""The upload scheduler: small files in batches down one stream, large ones
``jobs`` at a time, progress, and stopping early. Real files, a real pool on
folder hosts."""

import contextlib
import hashlib
import os
import threading
import time

import pytest

from cloudmanager import scheduler
from cloudmanager.errors import InvalidInputError
from cloudmanager.scheduler import Uploaded, batches, upload_files
from cloudmanager.sources import SourceFile, walk


def sha(data):
    return hashlib.sha256(data).hexdigest()


def tree(write_file, sizes):
    """Files of the given sizes, with distinct contents: ``{path: bytes}``."""
    made = {}
    for n, size in enumerate(sizes):
        data = (b"%d:" % n + os.urandom(size))[:size] if size else b""
        made[str(write_file("f%03d" % n, data))] = data
    return made


def run(cm, files, **kwargs):
    """Every outcome, and the batches they came in."""
    with contextlib.closing(upload_files(cm, files, **kwargs)) as results:
        got = list(results)
    return {u.file.path: u for batch in got for u in batch}, got


class Recorder:
    """Wraps ``cm.upload_many`` to see which thread ran each batch and how
    many ran at once."""

    def __init__(self, cm, wait_for_large=None):
        self.cm = cm
        self.real = cm.upload_many
        self.lock = threading.Lock()
        self.running = {"small": 0, "large": 0}
        self.most = {"small": 0, "large": 0}
        self.calls = []
        self.barrier = wait_for_large
        cm.upload_many = self

    def __call__(self, paths, **kwargs):
        kind = "small" if threading.current_thread().name.startswith("cm-upload-small") \
            else "large"
        with self.lock:
            self.calls.append((kind, list(paths)))
            self.running[kind] += 1
            self.most[kind] = max(self.most[kind], self.running[kind])
        try:
            if kind == "large" and self.barrier is not None:
                self.barrier.wait()  # times out unless enough run at once
            return self.real(paths, **kwargs)
        finally:
            with self.lock:
                self.running[kind] -= 1


def test_batches_split_by_count_and_bytes(write_file):
    files = [SourceFile(str(p), os.stat(p)) for p in
             (write_file("b%d" % n, b"x" * size) for n, size in enumerate([1, 2, 3, 9, 1, 0]))]
    assert [[f.size for f in b] for b in batches(files, 2, 5)] == [[1, 2], [3], [9], [1, 0]]
    assert [[f.size for f in b] for b in batches(files, 10, 100)] == [[1, 2, 3, 9, 1, 0]]
    assert [len(b) for b in batches(files, 1, 100)] == [1] * 6
    assert list(batches([], 10, 100)) == []


def test_every_file_lands_on_the_hosts_with_its_hash(make_pool, write_file):
    cm = make_pool(capacity=1 << 22)
    made = tree(write_file, [0, 10, 100, 5000, 20_000, 70_000, 150_000, 3])
    outcomes, got = run(cm, walk(sorted(made)), jobs=2, large_file=60_000, batch_files=3)
    assert set(outcomes) == set(made)
    for path, data in made.items():
        u = outcomes[path]
        assert isinstance(u, Uploaded) and u.hash == sha(data)
        assert cm.status(u.hash)["copies"] == 3  # on every folder host
        assert open(cm.warm_up(u.hash), "rb").read() == data
    # The two large files alone, the six small ones in threes.
    assert sorted(len(b) for b in got) == [1, 1, 3, 3]


def test_paths_are_accepted_and_stat_ed(make_pool, write_file):
    cm = make_pool()
    made = tree(write_file, [10, 20])
    outcomes, _ = run(cm, [os.path.relpath(p) for p in made])
    assert {u.hash for u in outcomes.values()} == {sha(d) for d in made.values()}
    assert set(outcomes) == set(made)  # made absolute
    with pytest.raises(FileNotFoundError):
        upload_files(cm, [os.path.join(os.path.dirname(next(iter(made))), "gone")])


def test_progress_adds_up_to_the_bytes_and_files(make_pool, write_file):
    cm = make_pool(capacity=1 << 23)
    made = tree(write_file, [100] * 7 + [3 * 2**20, 2 * 2**20])
    seen = {"bytes": 0, "files": 0, "threads": set()}
    lock = threading.Lock()

    def advance(nbytes, nfiles):
        with lock:
            seen["bytes"] += nbytes
            seen["files"] += nfiles
            seen["threads"].add(threading.current_thread().name)

    run(cm, walk(sorted(made)), jobs=2, advance=advance, large_file=2**20, batch_files=4)
    assert seen["bytes"] == sum(len(d) for d in made.values())
    assert seen["files"] == len(made)
    assert all(name.startswith("cm-upload") for name in seen["threads"])


def test_small_files_go_down_one_stream_and_large_ones_jobs_at_a_time(make_pool,
                                                                      write_file):
    cm = make_pool(capacity=1 << 22)
    made = tree(write_file, [10] * 30 + [5000] * 3)
    # The three large uploads must all be running at once to pass the barrier.
    recorder = Recorder(cm, threading.Barrier(3, timeout=30))
    outcomes, _ = run(cm, walk(sorted(made)), jobs=3, large_file=1000, batch_files=4)
    assert all(u.hash for u in outcomes.values()) and len(outcomes) == 33
    assert recorder.most == {"small": 1, "large": 3}
    small = [paths for kind, paths in recorder.calls if kind == "small"]
    large = [paths for kind, paths in recorder.calls if kind == "large"]
    assert len(small) == 8 and max(map(len, small)) == 4 and len(large) == 3
    assert all(len(paths) == 1 for paths in large)


def test_large_files_wait_their_turn_with_one_job(make_pool, write_file, monkeypatch):
    monkeypatch.setattr(scheduler, "LARGE_FILE", 1000)  # the default is read at each call
    cm = make_pool(capacity=1 << 22)
    made = tree(write_file, [5000] * 4)
    recorder = Recorder(cm)
    outcomes, got = run(cm, walk(sorted(made)), jobs=1)
    assert len(got) == 4 and recorder.most["large"] == 1 and recorder.most["small"] == 0
    assert {u.hash for u in outcomes.values()} == {sha(d) for d in made.values()}


def test_defer_only_caches_and_queues(make_pool, write_file, tmp_path):
    cm = make_pool()
    made = tree(write_file, [10, 20, 30])
    outcomes, _ = run(cm, walk(sorted(made)), defer=True)
    assert cm.stats()["queued"] == 3
    assert all(cm.on_cache(u.hash) and cm.status(u.hash)["copies"] == 0
               for u in outcomes.values())
    assert not any((tmp_path / "hosts" / h).exists() and os.listdir(tmp_path / "hosts" / h)
                   for h in ("h1", "h2", "h3"))
    assert cm.sync()["short"] == 0
    assert all(cm.status(u.hash)["copies"] == 3 for u in outcomes.values())


def test_a_file_that_fails_does_not_stop_the_others(make_pool, write_file):
    cm = make_pool()
    made = tree(write_file, [10, 20, 30])
    files = list(walk(sorted(made)))
    gone = files[1].path
    os.unlink(gone)  # vanished between the walk and the upload
    outcomes, _ = run(cm, files)
    assert outcomes[gone].hash is False and outcomes[gone].rememberable is False
    assert [outcomes[f.path].hash for f in files if f.path != gone] == [
        sha(made[f.path]) for f in files if f.path != gone]


def test_stopping_early_starts_no_new_batch(make_pool, write_file):
    cm = make_pool()
    made = tree(write_file, [10] * 40)
    recorder = Recorder(cm)
    results = upload_files(cm, walk(sorted(made)), batch_files=1)
    first = next(results)
    assert len(first) == 1 and first[0].hash
    results.close()  # what Ctrl-C in the caller does, through contextlib.closing
    started = len(recorder.calls)
    assert started < 40  # at most the batch that was running when it stopped
    time.sleep(0.2)
    assert len(recorder.calls) == started  # and nothing starts afterwards
    landed = [p for p, data in made.items() if cm.exists(sha(data))]
    assert len(landed) == started


def test_an_error_in_a_batch_stops_the_rest(make_pool, write_file):
    cm = make_pool()
    made = tree(write_file, [10] * 20)

    def advance(nbytes, nfiles):
        raise RuntimeError("the progress bar broke")

    with pytest.raises(RuntimeError, match="progress bar broke"):
        run(cm, walk(sorted(made)), batch_files=1, advance=advance)
    # The batches queued behind the failed one were never started.
    assert sum(cm.exists(sha(d)) for d in made.values()) < 20


def test_rememberable_only_when_the_file_settled_before_it_was_read(make_pool, write_file,
                                                                    monkeypatch):
    cm = make_pool()
    made = tree(write_file, [10, 20])
    fresh, _ = run(cm, walk(sorted(made)))  # written a moment ago: racy
    assert not any(u.rememberable for u in fresh.values())
    monkeypatch.setattr("cloudmanager.sources.RACY_WINDOW_NS", 0)
    settled, _ = run(cm, walk(sorted(made)))
    assert all(u.rememberable for u in settled.values())
    cm.remember((u.file, u.hash) for u in settled.values())
    assert cm.remembered(walk(sorted(made))) == {p: u.hash for p, u in settled.items()}


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "4"])
def test_jobs_must_be_a_positive_integer(make_pool, jobs):
    with pytest.raises(InvalidInputError):
        upload_files(make_pool(), [], jobs=jobs)


def test_nothing_to_do_yields_nothing(make_pool):
    assert run(make_pool(), [])[1] == []
