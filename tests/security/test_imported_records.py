"""SECURITY.md, "Records imported from untrusted nodes": one test per claim."""

import json
import os

from helpers import sha


def record(file_hash, size=10, filename="f", uploads=()):
    return {"version": "0.2", "datetime": "1391212800", "filename": filename,
            "filesize": str(size), "filehash": file_hash, "uploads": list(uploads)}


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


def test_claim_import_hash_must_be_sha256(make_pool, tmp_path):
    cm = make_pool()
    before = tree(tmp_path)
    bad = ["../../etc/passwd", "A" * 63, "g" * 64, "/tmp/x", 64 * "0" + "/..", None, 7]
    assert cm.data_load(json.dumps([record(h) for h in bad])) == 0
    assert json.loads(cm.data_dump()) == []
    assert tree(tmp_path) == before


def test_claim_import_filename_is_reduced_to_a_safe_basename(make_pool, write_file, tmp_path):
    cm = make_pool()
    data = b"named by a stranger"
    digest = cm.upload(write_file("orig", data))
    other = make_pool(name="other")
    doc = json.loads(cm.data_dump())
    doc[0]["filename"] = "../../../escaped\x00-name"
    assert other.data_load(json.dumps(doc)) == 1
    assert other.info(digest)["filename"] == "escaped-name"
    out = tmp_path / "out"
    out.mkdir()
    assert other.download(digest, out) == str(out / "escaped-name")
    assert open(out / "escaped-name", "rb").read() == data
    assert not (tmp_path / "escaped-name").exists()


def test_claim_import_url_that_is_an_option_or_unknown_scheme_is_refused(make_pool):
    cm = make_pool()
    digest = sha(b"x")
    uploads = [{"host_name": "mediafire", "url": "--run-after=/bin/sh"},
               {"host_name": "mediafire", "url": "javascript:alert(1)"},
               {"host_name": "mediafire", "url": "http://a b/"},
               {"host_name": "--run-after=x", "url": "http://example.org/f"},
               {"host_name": "ok", "url": "http://example.org/f"}]
    assert cm.data_load(json.dumps([record(digest, uploads=uploads)])) == 1
    assert cm.info(digest)["uploads"] == [{"host_name": "ok", "url": "http://example.org/f"}]


def test_claim_imported_copies_do_not_unpin_a_file_only_this_node_holds(make_pool, write_file):
    cm = make_pool()
    data = b"only here" * 50
    digest = cm.upload(write_file("f", data), defer=True)  # cached, pinned, queued
    claim = record(digest, size=len(data), uploads=[
        {"host_name": h, "url": "http://%s.example/%s" % (h, digest)} for h in "abc"])
    assert cm.data_load(json.dumps([claim])) == 1
    assert cm.evict(0) == 0 and cm.on_cache(digest)  # still pinned: claims are not copies
    assert digest in cm.db.queue.hashes() or cm.db.files.verified(digest) == 0


def test_claim_imported_size_never_overrides_a_measured_one(make_pool, write_file):
    cm = make_pool()
    data = b"measured" * 10
    digest = cm.upload(write_file("f", data))
    assert cm.data_load(json.dumps([record(digest, size=10**12)])) == 0
    assert cm.info(digest)["filesize"] == str(len(data))


def test_claim_hostile_documents_never_raise(make_pool, tmp_path):
    cm = make_pool()
    before = tree(tmp_path)
    hostile = ["[" * 100000 + "]" * 100000, "\ud800", b"\xff\xfe", "null", "{}", "[[[]]]",
               json.dumps([{"filehash": {"$ne": 1}}]), json.dumps([record(sha(b"y"), size=-1)]),
               json.dumps([record(sha(b"y"), size="1e9999")]), 12, None]
    for text in hostile:
        assert cm.data_load(text) in (None, 0)
    assert tree(tmp_path) == before


def test_claim_remove_cannot_be_aimed_at_another_files_copy(make_pool, tmp_path, write_file):
    """A record that lists another file's object under its hash (a hostile dump)
    does not make remove() delete that object: only objects named by the hash
    removed are deleted."""
    import json

    (tmp_path / "nas").mkdir()
    spec = "dir:%s" % (tmp_path / "nas")
    cm = make_pool(hosts=[spec], redundancy=1)
    victim = cm.upload(write_file("victim", b"the only copy of another file"))
    target = cm.upload(write_file("target", b"the file being removed"))
    record = cm.info(target)
    victim_url = cm.status(victim)["uploads"][0]["url"]
    record["uploads"].append({"host_name": spec, "url": victim_url})
    cm.data_load(json.dumps([record]))
    assert (spec, victim_url) in cm.remove(target)["kept"]
    assert (tmp_path / "nas" / victim).read_bytes() == b"the only copy of another file"
    assert not (tmp_path / "nas" / target).exists()  # its own copy went
    cm.evict(0)
    assert open(cm.warm_up(victim), "rb").read() == b"the only copy of another file"


def test_claim_hostile_streamed_documents_never_raise(make_pool, tmp_path, write_file):
    """load_from (the streaming import) skips junk inside a known file's record
    as data_load does: a list or an object where a URL or host name goes."""
    import io
    import json

    (tmp_path / "nas").mkdir()
    cm = make_pool(hosts=["dir:%s" % (tmp_path / "nas")], redundancy=1)
    digest = cm.upload(write_file("f", b"known"))
    record = cm.info(digest)
    hostile = [dict(record, uploads=[{"host_name": "h", "url": ["a", "list"]}]),
               dict(record, uploads=[{"host_name": {"an": "object"}, "url": "http://x/y"}]),
               dict(record, filehash=["not", "a", "hash"])]
    assert cm.load_from(io.StringIO(json.dumps(hostile))) == 0
    assert cm.data_load(json.dumps(hostile)) == 0
