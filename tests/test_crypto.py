"""The pool's key (cloudmanager/crypto.py), checked against the real ``age`` command.

age is a standard: a copy cloudmanager encrypts must open with
``age -d -i KEY``, and a file ``age`` encrypts must open here. The ``age``
binary comes from Debian's package (``.ci/run`` installs it); without it
these tests skip, unless ``CM_REQUIRE_AGE=1`` (CI), where they fail.
"""

import hashlib
import io
import os
import shutil
import subprocess

import pytest

from cloudmanager.crypto import AGE_BINARY_MIN, PoolKey, SealingStream, ciphertext_size_max, \
    key_from_settings, new_identity_file
from cloudmanager.errors import ConfigError, IntegrityError

pytest.importorskip("pyrage")


@pytest.fixture
def age():
    """The ``age`` and ``age-keygen`` commands."""
    found = shutil.which("age"), shutil.which("age-keygen")
    if not all(found):
        if os.environ.get("CM_REQUIRE_AGE") == "1":
            pytest.fail("the age command is required here (CM_REQUIRE_AGE=1)")
        pytest.skip("no age command (apt-get install age)")
    return found


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "pool.key"
    recipient = new_identity_file(str(path))
    return path, recipient


def test_a_new_key_is_private_and_age_keygen_reads_it(key_file, age):
    path, recipient = key_file
    assert os.stat(path).st_mode & 0o777 == 0o600 and recipient.startswith("age1")
    shown = subprocess.run([age[1], "-y", str(path)], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert shown == recipient
    with pytest.raises(ConfigError, match="never overwritten"):
        new_identity_file(str(path))
    assert [p.name for p in path.parent.iterdir()] == ["pool.key"]  # no temp left


def test_copies_open_with_age_and_age_files_open_here(key_file, age, tmp_path):
    path, recipient = key_file
    key = PoolKey(str(path))
    data = os.urandom(200_000) + b"a known plaintext sentence"
    (tmp_path / "plain").write_bytes(data)
    digest, size = key.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "object"))
    stored = (tmp_path / "object").read_bytes()
    assert (digest, size) == (hashlib.sha256(stored).hexdigest(), len(stored))
    assert b"a known plaintext sentence" not in stored
    assert len(data) < size <= ciphertext_size_max(len(data))
    opened = subprocess.run([age[0], "-d", "-i", str(path), str(tmp_path / "object")],
                            capture_output=True, check=True).stdout
    assert opened == data
    # And the other way: age encrypts, the pool's key decrypts.
    subprocess.run([age[0], "-r", recipient, "-o", str(tmp_path / "by-age"),
                    str(tmp_path / "plain")], check=True)
    out = io.BytesIO()
    with open(tmp_path / "by-age", "rb") as f:
        key.decrypt(f, out)
    assert out.getvalue() == data


def test_every_recipient_can_read(key_file, age, tmp_path):
    path, _ = key_file
    other = tmp_path / "reader.key"
    reader = new_identity_file(str(other))
    key = PoolKey(str(path), [reader])
    assert key.recipients == [key.recipient, reader]
    (tmp_path / "plain").write_bytes(b"for two readers")
    key.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "object"))
    for identity in (path, other):
        opened = subprocess.run([age[0], "-d", "-i", str(identity), str(tmp_path / "object")],
                                capture_output=True, check=True).stdout
        assert opened == b"for two readers"


def test_a_wrong_key_or_a_flipped_byte_is_refused(key_file, tmp_path):
    path, _ = key_file
    key = PoolKey(str(path))
    (tmp_path / "plain").write_bytes(os.urandom(150_000))
    key.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "object"))
    stored = (tmp_path / "object").read_bytes()
    new_identity_file(str(tmp_path / "other.key"))
    with pytest.raises(IntegrityError, match="not decryptable with this pool's key"):
        PoolKey(str(tmp_path / "other.key")).decrypt(io.BytesIO(stored), io.BytesIO())
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(IntegrityError, match="authenticate"):
        key.decrypt(io.BytesIO(bytes(flipped)), io.BytesIO())


def test_names_are_the_keys_own_and_reveal_nothing(key_file, tmp_path):
    path, _ = key_file
    digest = hashlib.sha256(b"a file everyone has").hexdigest()
    one, again = PoolKey(str(path)), PoolKey(str(path))
    new_identity_file(str(tmp_path / "other.key"))
    other = PoolKey(str(tmp_path / "other.key"))
    name = one.object_name(digest)
    assert name == again.object_name(digest) != other.object_name(digest)
    assert len(name) == 64 and name != digest and digest not in name
    assert one.key_id == again.key_id != other.key_id
    secret = [line for line in path.read_text().splitlines() if line.startswith("AGE-")][0]
    for shown in (repr(one), one.key_id, name, str(one.recipients)):
        assert secret not in shown and secret[15:40] not in shown


def test_a_key_others_can_read_or_a_bad_setting_is_refused(key_file, tmp_path):
    path, _ = key_file
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        PoolKey(str(path))
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not an age X25519 recipient"):
        key_from_settings(str(path), ["ssh-ed25519 AAAA"])
    with pytest.raises(ConfigError, match="no encryption_key"):
        key_from_settings(None, ["age1xyz"])
    assert key_from_settings(None) is None
    (tmp_path / "junk.key").write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(ConfigError, match="malformed") as info:
        PoolKey(str(tmp_path / "junk.key"))
    assert "NOTAKEY" not in str(info.value)


def test_large_files_go_through_the_age_command_which_never_sees_the_key(
        key_file, age, tmp_path, caplog):
    """From AGE_BINARY_MIN bytes, sealing and opening run the ``age`` command
    (on another core while this process hashes). What it makes opens with
    ``age -d`` and pyrage alike; the identity reaches it through a descriptor,
    never its arguments; a flipped byte, a wrong key or a plaintext longer
    than recorded are refused as with pyrage; a broken command falls back."""
    path, recipient = key_file
    # The command, through a wrapper that records the arguments it is given.
    argv_log = tmp_path / "argv"
    wrapper = tmp_path / "age-wrapper"
    wrapper.write_text('#!/bin/sh\nprintf "%%s\\n" "$@" >> %s\nexec %s "$@"\n'
                       % (argv_log, age[0]))
    wrapper.chmod(0o700)
    key = PoolKey(str(path), age_binary=str(wrapper))
    data = os.urandom(AGE_BINARY_MIN + 70_000) + b"a known plaintext sentence"
    (tmp_path / "plain").write_bytes(data)
    caplog.set_level("INFO", logger="cloudmanager")
    digest, size = key.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "object"))
    stored = (tmp_path / "object").read_bytes()
    assert (digest, size) == (hashlib.sha256(stored).hexdigest(), len(stored))
    assert b"a known plaintext sentence" not in stored
    assert len(data) < size <= ciphertext_size_max(len(data))
    opened = subprocess.run([age[0], "-d", "-i", str(path), str(tmp_path / "object")],
                            capture_output=True, check=True).stdout
    assert opened == data
    out = io.BytesIO()
    with open(tmp_path / "object", "rb") as f:
        PoolKey(str(path), age_binary=None).decrypt(f, out)  # pyrage reads it too
    assert out.getvalue() == data
    assert key.decrypt_file(str(tmp_path / "object"), str(tmp_path / "back"),
                            limit=len(data)) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "back").read_bytes() == data
    args = argv_log.read_text().split("\n")
    assert "--encrypt" in args and recipient in args and "--decrypt" in args
    assert any(a.startswith("/dev/fd/") for a in args)
    secret = [line for line in path.read_text().splitlines() if line.startswith("AGE-")][0]
    assert secret not in argv_log.read_text() and str(path) not in args
    assert "pyrage" not in caplog.text  # no fallback was needed
    # Refusals: a plaintext longer than recorded (the record or the copy is
    # wrong: not a proof), a flipped byte, another key.
    with pytest.raises(OverflowError, match="more than"):
        key.decrypt_file(str(tmp_path / "object"), str(tmp_path / "back"), limit=len(data) - 1)
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 1
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="authenticate"):
        key.decrypt_file(str(tmp_path / "flipped"), str(tmp_path / "back"), limit=len(data))
    new_identity_file(str(tmp_path / "other.key"))
    with pytest.raises(IntegrityError, match="not decryptable with this pool's key"):
        PoolKey(str(tmp_path / "other.key"), age_binary=str(wrapper)).decrypt_file(
            str(tmp_path / "object"), str(tmp_path / "back"), limit=len(data))
    # A command that cannot run: pyrage does the work, and says so.
    broken = PoolKey(str(path), age_binary=str(tmp_path / "no-such-age"))
    broken.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "object2"))
    assert broken.decrypt_file(str(tmp_path / "object2"), str(tmp_path / "back"))[1] \
        == len(data)
    assert "using pyrage" in caplog.text and "trying pyrage" in caplog.text


@pytest.mark.parametrize("binary", ["age", None, "missing"])
def test_a_sealing_stream_is_age_made_as_it_is_read(key_file, age, tmp_path, binary):
    """SealingStream (a large file sealed as a host reads it): by the ``age``
    command, by pyrage, or by pyrage when the command has gone; the bytes read
    are what the spool holds, open with ``age -d``, and the source is hashed
    on the way."""
    path, _ = key_file
    chosen = {"age": age[0], None: None, "missing": str(tmp_path / "gone" / "age")}[binary]
    key = PoolKey(str(path), age_binary=chosen)
    data = os.urandom(AGE_BINARY_MIN + 33_333)
    (tmp_path / "plain").write_bytes(data)
    with open(tmp_path / "plain", "rb") as raw, \
            SealingStream(key, raw, len(data), str(tmp_path / "spool")) as stream:
        chunks = []
        while True:
            chunk = stream.read(100_000)
            if not chunk:
                break
            chunks.append(chunk)
    sealed = b"".join(chunks)
    assert (tmp_path / "spool").read_bytes() == sealed
    assert stream.source.count == len(data)
    assert stream.source.hexdigest() == hashlib.sha256(data).hexdigest()
    (tmp_path / "object").write_bytes(sealed)
    opened = subprocess.run([age[0], "-d", "-i", str(path), str(tmp_path / "object")],
                            capture_output=True, check=True).stdout
    assert opened == data
    # Closed before its end: the work stops, nothing hangs.
    with open(tmp_path / "plain", "rb") as raw:
        stream = SealingStream(key, raw, len(data))
        assert stream.read(10)
        stream.close()
