"""upload_many sent at once in an encrypted pool: what each copy holds (the
ciphertext's hash, size and key) is recorded with the publish."""
import hashlib
import os

import pytest

from cloudmanager.crypto import new_identity_file, AGE_BINARY_MIN


def sha(b):
    return hashlib.sha256(b).hexdigest()


def objects_in(root):
    return {p.name: p.read_bytes() for p in root.iterdir() if not p.name.startswith(".")}


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "pool.key"
    path.parent.mkdir()
    new_identity_file(str(path))
    return str(path)


@pytest.mark.parametrize("big", [False, True])
def test_encrypted_upload_many_records_object_meta(make_pool, write_file, key, tmp_path, big):
    roots = [tmp_path / "hosts" / n for n in ("h1", "h2")]
    for r in roots:
        r.mkdir(parents=True)
    extra = os.urandom(AGE_BINARY_MIN + 10) if big else b""
    node_a = make_pool(name="a", capacity=64 << 20, hosts=["dir:%s" % roots[0]],
                       redundancy=1, encryption_key=key)
    datas = [extra + b"secret %d" % i for i in range(3 if not big else 1)]
    files = [write_file("f%d" % i, d) for i, d in enumerate(datas)]
    digests = node_a.upload_many(files)
    assert digests == [sha(d) for d in datas]
    objs = objects_in(roots[0])
    assert len(objs) == len(datas)
    for d in digests:
        (e,) = node_a.info(d)["uploads"]
        assert e["key_id"] and e["url"][-64:] in objs
        assert e["object_sha256"] == sha(objs[e["url"][-64:]])
        assert int(e["object_size"]) == len(objs[e["url"][-64:]])
    assert node_a.evict(0) == len(datas)
    for d, data in zip(digests, datas):
        assert open(node_a.warm_up(d), "rb").read() == data
    assert node_a.verify(deep=True)["good"] == len(datas)
    # another node with the key: the objects are kept (vet), their meta recorded
    node_b = make_pool(name="b", capacity=64 << 20, hosts=["dir:%s" % roots[0]],
                       redundancy=1, encryption_key=key)
    files_b = [write_file("g%d" % i, d) for i, d in enumerate(datas)]
    assert node_b.upload_many(files_b) == digests
    assert objects_in(roots[0]) == objs
    for d in digests:
        (e,) = node_b.info(d)["uploads"]
        assert e["object_sha256"] == sha(objs[e["url"][-64:]])
    assert node_b.evict(0) == len(datas)
    for d, data in zip(digests, datas):
        assert open(node_b.warm_up(d), "rb").read() == data
