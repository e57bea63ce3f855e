"""SECURITY.md, "URLs and filenames that reach external tools": one test per claim."""

import json

from helpers import sha


def test_claim_plowup_never_sees_the_users_path(make_pool, write_file, fake_plowshare):
    cm = make_pool(hosts=["plowshare:locker"], redundancy=1)
    path = write_file("-rf --run-after=x:dest name", b"payload")
    digest = cm.upload(path)
    assert digest == sha(b"payload")
    (call,) = [c for c in fake_plowshare.log() if c["tool"] == "plowup"]
    assert call["argv"][-2] == "locker"
    assert call["argv"][-1].endswith("/" + digest)  # a private link named by the hash
    assert all(str(path) not in arg for arg in call["argv"])


def test_claim_plowdown_never_gets_an_option_as_its_url(make_pool, fake_plowshare, tmp_path):
    cm = make_pool(hosts=["plowshare:locker"], redundancy=1)
    digest = sha(b"z")
    pwned = tmp_path / "pwned"
    doc = [{"version": "0.2", "datetime": "1", "filename": "z", "filesize": "1",
            "filehash": digest,
            "uploads": [{"host_name": "locker", "url": "--run-after=touch %s" % pwned},
                        {"host_name": "locker", "url": "-ohttp://locker.fake/dl/x"}]}]
    cm.data_load(json.dumps(doc))
    assert cm.warm_up(digest) is False
    assert [c for c in fake_plowshare.log() if c["tool"] == "plowdown"] == []
    assert not pwned.exists()


def test_claim_no_shell_ever_runs_a_url(make_pool, fake_plowshare, tmp_path):
    cm = make_pool(hosts=["plowshare:locker"], redundancy=1)
    digest = sha(b"q")
    pwned = tmp_path / "pwned"
    url = "http://locker.fake/dl/$(touch${IFS}%s)`touch${IFS}%s`;touch${IFS}%s" % (
        pwned, pwned, pwned)
    doc = [{"version": "0.2", "datetime": "1", "filename": "q", "filesize": "1",
            "filehash": digest, "uploads": [{"host_name": "locker", "url": url}]}]
    assert cm.data_load(json.dumps(doc)) == 1
    assert cm.warm_up(digest) is False  # the fake locker has no such object
    calls = [c for c in fake_plowshare.log() if c["tool"] == "plowdown"]
    assert calls and calls[0]["argv"][0] == url  # one argv element, never a shell line
    assert not pwned.exists()
