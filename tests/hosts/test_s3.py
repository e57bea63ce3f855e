"""S3Host against a real moto S3 server over HTTP on loopback (no in-process mocks)."""

import base64
import concurrent.futures
import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from cloudmanager import meter
from cloudmanager.errors import (
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from cloudmanager.hosts import from_spec
from cloudmanager.hosts.s3 import S3Host

from .conformance import ForwardStream, HostConformance, sha
from . import s3_server
from .s3_server import free_port

# The server fixtures, made visible to pytest in this module.
moto_endpoint = s3_server.moto_endpoint
aws_env = s3_server.aws_env
s3_admin = s3_server.s3_admin
bucket = s3_server.bucket
error_server = s3_server.error_server

MiB = 1 << 20
PREFIX = "pool/x"
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"


def make_host(endpoint, bucket_name, prefix=PREFIX, **options):
    options.setdefault("multipart_threshold", 5 * MiB)
    options.setdefault("multipart_chunksize", 5 * MiB)
    return S3Host(bucket_name, prefix, endpoint_url=endpoint, region="us-east-1",
                  addressing_style="path", **options)


@pytest.fixture
def host(moto_endpoint, bucket):
    h = make_host(moto_endpoint, bucket)
    yield h
    h.close()


@pytest.fixture
def unreachable_host(aws_env):
    # Nothing listens on the port: connections are refused at once.
    h = make_host("http://127.0.0.1:%d" % free_port(), "no-such-bucket", timeout=2,
                  max_attempts=2)
    yield h
    h.close()


class TestS3Host(HostConformance):
    large_size = 12 * MiB  # three parts of 5 MiB and less

    @pytest.fixture
    def raw_names(self, bucket, s3_admin):
        def names():
            listed = s3_admin.list_objects_v2(Bucket=bucket, Prefix=PREFIX + "/")
            return sorted(o["Key"][len(PREFIX) + 1:] for o in listed.get("Contents", ()))

        return names

    @pytest.fixture
    def tamper(self, host, bucket, s3_admin):
        def tamper(location, data):
            # No SHA-256 declared: an object written by another tool.
            s3_admin.put_object(Bucket=bucket, Key=PREFIX + "/" + host.object_name(location.url),
                                Body=data)

        return tamper


def write(tmp_path, data, filename="src.bin"):
    path = tmp_path / filename
    path.write_bytes(data)
    return str(path)


def count_calls(host, *operations):
    """A dict operation → calls the host's client makes from now on."""
    counts = dict.fromkeys(operations, 0)

    def counter(event_name, **kwargs):
        counts[event_name.rsplit(".", 1)[1]] += 1

    for operation in operations:
        host.client.meta.events.register("before-call.s3." + operation, counter)
    return counts


# -- what lands on the server -------------------------------------------------

def test_objects_are_stored_under_the_prefix(host, bucket, s3_admin, tmp_path):
    data = b"where does it go"
    location = host.upload(write(tmp_path, data), sha(data))
    assert location.url == "s3://%s/pool/x/%s" % (bucket, sha(data))
    assert location.host_name == host.name == "s3://%s/pool/x" % bucket
    body = s3_admin.get_object(Bucket=bucket, Key="pool/x/" + sha(data))["Body"]
    assert body.read() == data


def test_single_part_upload_stores_a_sha256_that_stat_returns(host, bucket, s3_admin, tmp_path):
    data = os.urandom(300_000)
    location = host.upload(write(tmp_path, data), sha(data))
    head = s3_admin.head_object(Bucket=bucket, Key="pool/x/" + sha(data), ChecksumMode="ENABLED")
    assert "-" not in head["ETag"]
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    info = host.stat(location.url)
    assert info.size == len(data) and info.sha256 == sha(data)


def test_a_large_file_goes_up_in_parts(host, bucket, s3_admin, tmp_path):
    data = os.urandom(12 * MiB)
    calls = count_calls(host, "PutObject", "CreateMultipartUpload", "UploadPart")
    location = host.upload(write(tmp_path, data), sha(data))
    assert calls == {"PutObject": 0, "CreateMultipartUpload": 1, "UploadPart": 3}
    key = "pool/x/" + sha(data)
    assert s3_admin.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")
    assert s3_admin.head_object(Bucket=bucket, Key=key, PartNumber=1)["PartsCount"] == 3
    # The checksum of a multipart object is of its parts: not the file's SHA-256.
    info = host.stat(location.url)
    assert info.size == len(data) and info.sha256 is None
    got = tmp_path / "got"
    host.download(location.url, str(got), max_bytes=len(data))
    assert got.read_bytes() == data


def test_an_object_already_there_is_not_sent_again(host, bucket, s3_admin, tmp_path):
    data = b"already there"
    path = write(tmp_path, data)
    host.upload(path, sha(data))
    before = s3_admin.head_object(Bucket=bucket, Key="pool/x/" + sha(data))
    calls = count_calls(host, "PutObject", "CreateMultipartUpload", "HeadObject")
    location = host.upload(path, sha(data))
    # The conditional PutObject (If-None-Match: *) is refused, a HEAD finds
    # the file's SHA-256: nothing is written.
    assert calls == {"PutObject": 1, "CreateMultipartUpload": 0, "HeadObject": 1}
    after = s3_admin.head_object(Bucket=bucket, Key="pool/x/" + sha(data))
    assert after["LastModified"] == before["LastModified"] and after["ETag"] == before["ETag"]
    assert location.url == "s3://%s/pool/x/%s" % (bucket, sha(data))


def test_a_new_small_object_takes_one_conditional_put_and_no_head(host, bucket, s3_admin,
                                                                   tmp_path):
    data = os.urandom(20_000)
    sent = {}

    def headers(request, **kwargs):
        sent.update(request.headers)

    host.client.meta.events.register("before-send.s3.PutObject", headers)
    calls = count_calls(host, "PutObject", "HeadObject", "CreateMultipartUpload")
    host.upload(write(tmp_path, data), sha(data))
    assert calls == {"PutObject": 1, "HeadObject": 0, "CreateMultipartUpload": 0}
    assert sent["If-None-Match"] == b"*" or sent["If-None-Match"] == "*"
    key = "pool/x/" + sha(data)
    assert s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_the_bytes_of_a_put_are_metered_once(host, tmp_path):
    # Signing reads the body to hash it (plain HTTP): those reads are not
    # reported, the sending is, once.
    data = os.urandom(300_000)
    seen = []
    with meter.metering(meter.Meter(seen.append)):
        host.upload(write(tmp_path, data), sha(data))
    assert sum(seen) == len(data)


def test_a_server_without_conditional_writes_gets_a_head_before_each_put(error_server,
                                                                         aws_env, tmp_path):
    error_server.answers = {"PUT": (501, "NotImplemented"), "HEAD": (404, "NotFound")}
    h = make_host(error_server.url, "bkt", max_attempts=1)
    try:
        data = b"no conditions here"
        with pytest.raises(PermanentHostError, match="NotImplemented"):
            h.upload(write(tmp_path, data), sha(data))
        assert [m for m, _ in error_server.requests] == ["PUT", "HEAD", "PUT"]
        del error_server.requests[:]
        with pytest.raises(PermanentHostError, match="NotImplemented"):
            h.upload(write(tmp_path, data), sha(data))
        assert [m for m, _ in error_server.requests] == ["HEAD", "PUT"]
    finally:
        h.close()


def test_same_size_without_a_sha256_is_sent_again(host, bucket, s3_admin, tmp_path):
    # The reported case: wrong bytes of the right size, stored with no
    # SHA-256 (boto3 declares a CRC32 at most), were taken for the object.
    data = b"the right bytes, 23 b.."
    key = "pool/x/" + sha(data)
    s3_admin.put_object(Bucket=bucket, Key=key, Body=b"same size, wrong bytes!")
    assert "ChecksumSHA256" not in s3_admin.head_object(Bucket=bucket, Key=key,
                                                        ChecksumMode="ENABLED")
    calls = count_calls(host, "PutObject")
    host.upload(write(tmp_path, data), sha(data))
    assert calls == {"PutObject": 2}  # the conditional one refused, then the replacement
    assert s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_a_multipart_object_has_no_sha256_to_match_and_is_sent_again(host, tmp_path):
    # Its checksum is of the parts: nothing proves the bytes, so no skip.
    data = os.urandom(6 * MiB)
    path = write(tmp_path, data)
    host.upload(path, sha(data))
    calls = count_calls(host, "PutObject", "CreateMultipartUpload")
    host.upload(path, sha(data))
    assert calls == {"PutObject": 0, "CreateMultipartUpload": 1}


@pytest.mark.parametrize("stored", [b"truncated", b"same size, wrong bytes!"])
def test_a_wrong_object_under_the_name_is_replaced(host, bucket, s3_admin, tmp_path, stored):
    data = b"the right bytes, 23 b.."
    assert len(data) == 23 == len(b"same size, wrong bytes!")
    key = "pool/x/" + sha(data)
    s3_admin.put_object(Bucket=bucket, Key=key, Body=stored, ChecksumAlgorithm="SHA256")
    calls = count_calls(host, "PutObject")
    host.upload(write(tmp_path, data), sha(data))
    assert calls == {"PutObject": 2}  # the conditional one refused, then the replacement
    assert s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_list_sees_only_hash_names_directly_under_the_prefix(host, bucket, s3_admin, tmp_path):
    data = b"listed"
    host.upload(write(tmp_path, data), sha(data))
    for key in ("pool/x/not-a-hash", "pool/x/deeper/" + sha(b"x"), "pool/" + sha(b"y"),
                "pool/xy/" + sha(b"z"), sha(b"w")):
        s3_admin.put_object(Bucket=bucket, Key=key, Body=b"other")
    assert list(host.list()) == [(sha(data), len(data))]


def test_list_pages_through_many_objects(host, bucket, s3_admin):
    names = sorted(sha(str(i).encode()) for i in range(1005))  # a page holds 1000
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: s3_admin.put_object(Bucket=bucket, Key="pool/x/" + name,
                                                       Body=b""), names))
    assert sorted(n for n, _ in host.list()) == names


def test_a_host_without_prefix_uses_the_top_of_the_bucket(moto_endpoint, bucket, s3_admin,
                                                           tmp_path):
    s3_admin.put_object(Bucket=bucket, Key="pool/x/" + sha(b"elsewhere"), Body=b"elsewhere")
    with_spec = from_spec("s3://%s?endpoint_url=%s&addressing_style=path"
                          % (bucket, moto_endpoint))
    try:
        assert with_spec.prefix == "" and with_spec.name == "s3://" + bucket
        data = b"at the top"
        location = with_spec.upload(write(tmp_path, data), sha(data))
        assert location.url == "s3://%s/%s" % (bucket, sha(data))
        assert with_spec.accepts(location.url)
        assert not with_spec.accepts("s3://%s/pool/x/%s" % (bucket, sha(b"elsewhere")))
        assert list(with_spec.list()) == [(sha(data), len(data))]
        assert with_spec.stat(location.url).sha256 == sha(data)
    finally:
        with_spec.close()


# -- specs and options --------------------------------------------------------

def test_spec_with_query_parameters(aws_env):
    h = from_spec("s3://my-bucket/a/b/c/?endpoint_url=http%3A%2F%2F127.0.0.1%3A9000"
                  "&region=eu-west-3&addressing_style=virtual", timeout=7, max_connections=3,
                  weight=2.5, multipart_threshold=8 * MiB, multipart_chunksize=6 * MiB,
                  max_attempts=4)
    try:
        assert (h.bucket, h.prefix, h.name) == ("my-bucket", "a/b/c", "s3://my-bucket/a/b/c")
        assert h.endpoint_url == "http://127.0.0.1:9000"
        assert h.client.meta.endpoint_url == "http://127.0.0.1:9000"
        assert h.client.meta.region_name == "eu-west-3"
        config = h.client.meta.config
        assert config.s3["addressing_style"] == "virtual"
        assert config.connect_timeout == 7 and config.read_timeout == 7
        assert config.max_pool_connections >= 3
        assert config.retries == {"mode": "standard", "total_max_attempts": 4}
        assert (h.timeout, h.max_connections, h.weight) == (7.0, 3, 2.5)
        assert h.accepts("s3://my-bucket/a/b/c/" + "0" * 64)
    finally:
        h.close()


def test_spec_options_can_come_as_keywords(aws_env):
    h = from_spec("s3://my-bucket/p", endpoint_url="http://127.0.0.1:9000", region="eu-west-1",
                  addressing_style="path", name="archive")
    try:
        assert h.name == "archive" and h.client.meta.region_name == "eu-west-1"
        assert repr(h) == "<S3Host archive>"
    finally:
        h.close()


def test_profile_from_the_aws_config(monkeypatch, tmp_path, aws_env, moto_endpoint, bucket):
    config = tmp_path / "aws-config"
    config.write_text("[profile archive]\nregion = eu-central-1\n"
                      "aws_access_key_id = fromprofile\naws_secret_access_key = fromprofile\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    h = from_spec("s3://%s/p?profile=archive&addressing_style=path&endpoint_url=%s"
                  % (bucket, moto_endpoint))
    try:
        assert h.client.meta.region_name == "eu-central-1"
        data = b"through a profile"
        location = h.upload(write(tmp_path, data), sha(data))
        assert h.exists(location.url)
    finally:
        h.close()
    with pytest.raises(InvalidInputError, match="profile 'nobody' not found"):
        from_spec("s3://%s/p?profile=nobody" % bucket)


@pytest.mark.parametrize("spec, options, message", [
    ("s3://bkt/p", {"colour": "blue"}, "unknown S3 option 'colour'"),
    ("s3://bkt/p?colour=blue", {}, "unknown S3 spec parameter 'colour'"),
    ("s3://bkt/p?timeout=3", {}, "unknown S3 spec parameter 'timeout'"),
    ("s3://bkt/p?region=eu-west-1", {"region": "eu-west-2"}, "both"),
    ("s3://bkt/p?region=a&region=b", {}, "twice"),
    ("s3://bkt/p?region", {}, "needs a value"),
    ("s3://bkt/p", {"addressing_style": "sideways"}, "addressing_style"),
    ("s3://bkt/p", {"timeout": -1}, "timeout"),
    ("s3://bkt/p", {"max_connections": "many"}, "max_connections"),
    ("s3://bkt/p", {"multipart_chunksize": 1024}, "multipart_chunksize"),
    ("s3://bkt/p", {"endpoint_url": "ftp://example.com"}, "endpoint_url"),
    ("s3:bkt/p", {}, "s3://BUCKET/PREFIX"),
    ("s3://b/p", {}, "bucket"),
    ("s3://bkt/a/../b", {}, "prefix"),
    ("s3://bkt/a//b", {}, "prefix"),
    ("s3://bkt/a b", {}, "prefix"),
    ("s3://bkt/a%2Fb", {}, "prefix"),
    ("s3://bkt/p#frag", {}, "fragment"),
])
def test_bad_specs_and_options_are_refused(aws_env, spec, options, message):
    with pytest.raises(InvalidInputError, match=message):
        from_spec(spec, **options)


@pytest.mark.parametrize("spec, options", [
    ("s3://bkt/p?aws_secret_access_key=" + SECRET, {}),
    ("s3://bkt/p?aws_access_key_id=AKIA&aws_secret_access_key=" + SECRET, {}),
    ("s3://bkt/p?secret=" + SECRET, {}),
    ("s3://bkt/p?password=" + SECRET, {}),
    ("s3://bkt/p?region=eu-west-1&token=" + SECRET, {}),
    ("s3://AKIAEXAMPLE:%s@bkt/p" % SECRET, {}),
    ("s3://bkt/p", {"aws_secret_access_key": SECRET}),
    ("s3://bkt/p", {"aws_session_token": SECRET}),
    ("s3://bkt/p", {"secret_key": SECRET}),
    ("s3://bkt/p", {"access_key": SECRET}),
    ("s3://bkt/p", {"key": SECRET}),
    ("s3://bkt/p", {"endpoint_url": "https://AKIA:%s@s3.example.com" % SECRET}),
    ("s3://bkt/p?endpoint_url=https://s3.example.com/?X-Amz-Security-Token=" + SECRET, {}),
])
def test_credentials_are_refused_and_never_shown(aws_env, caplog, spec, options):
    with pytest.raises(InvalidInputError) as info:
        from_spec(spec, **options)
    message = str(info.value)
    assert SECRET not in message and SECRET not in repr(info.value)
    assert "endpoint_url" in message or ("AWS_ACCESS_KEY_ID" in message and "profile" in message)
    assert SECRET not in caplog.text


def test_a_host_shows_no_secret(aws_env, caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    h = from_spec("s3://bkt/p?endpoint_url=http://127.0.0.1:9")
    try:
        assert SECRET not in repr(h) and SECRET not in str(vars(h))
        assert SECRET not in caplog.text
    finally:
        h.close()


# -- URLs ---------------------------------------------------------------------

def test_accepts_only_hash_names_under_its_own_bucket_and_prefix(host, bucket):
    name = sha(b"x")
    assert host.accepts("s3://%s/pool/x/%s" % (bucket, name))
    for url in [
        "s3://other-bucket/pool/x/" + name,
        "s3://%s/pool/y/%s" % (bucket, name),
        "s3://%s/pool/%s" % (bucket, name),
        "s3://%s/%s" % (bucket, name),
        "s3://%s/pool/x/deeper/%s" % (bucket, name),
        "s3://%s/pool/x/%s" % (bucket, name.upper()),
        "s3://%s/pool/x/%s" % (bucket, name[:-1]),
        "s3://%s/pool/x/%s.bin" % (bucket, name),
        "s3://%s/pool/x/%s?versionId=1" % (bucket, name),
        "s3://%s/pool/x/../x/%s" % (bucket, name),
        "https://%s/pool/x/%s" % (bucket, name),
        "s3://%s/pool/x/" % bucket,
        None, 42,
    ]:
        assert not host.accepts(url), url


def test_operations_refuse_a_foreign_url(host, bucket, tmp_path):
    url = "s3://other-bucket/pool/x/" + sha(b"x")
    for call in (lambda: host.stat(url), lambda: host.delete(url),
                 lambda: host.download(url, str(tmp_path / "x"))):
        with pytest.raises(PermanentHostError) as info:
            call()
        assert info.value.host == host.name
    assert not (tmp_path / "x").exists()


# -- failures -----------------------------------------------------------------

def test_a_missing_bucket_is_a_permanent_error(moto_endpoint, aws_env, tmp_path):
    h = make_host(moto_endpoint, "never-created-bucket")
    data = b"data"
    url = "s3://never-created-bucket/pool/x/" + sha(data)
    try:
        for call in (lambda: h.upload(write(tmp_path, data), sha(data)),
                     lambda: h.download(url, str(tmp_path / "out")),
                     lambda: h.stat(url),
                     lambda: h.exists(url),
                     lambda: h.delete(url),
                     lambda: list(h.list())):
            with pytest.raises(PermanentHostError) as info:
                call()
            assert info.value.host == h.name and not info.value.transient
        assert not (tmp_path / "out").exists()
    finally:
        h.close()


def test_an_unreachable_host_is_unavailable(aws_env, tmp_path):
    h = make_host("http://127.0.0.1:%d" % free_port(), "bkt", timeout=2, max_attempts=1)
    url = "s3://bkt/pool/x/" + sha(b"x")
    try:
        for call in (lambda: h.stat(url), lambda: list(h.list()), lambda: h.delete(url),
                     lambda: h.download(url, str(tmp_path / "out")),
                     lambda: h.upload(write(tmp_path, b"x"), sha(b"x"))):
            with pytest.raises(HostUnavailableError) as info:
                call()
            assert info.value.transient and info.value.host == h.name
        assert not (tmp_path / "out").exists()
    finally:
        h.close()


@pytest.mark.parametrize("status, code, expected", [
    (503, "SlowDown", TransientHostError),
    (500, "InternalError", TransientHostError),
    (503, "ServiceUnavailable", TransientHostError),
    (400, "RequestTimeout", TransientHostError),
    (429, "SomethingNew", TransientHostError),
    (403, "AccessDenied", PermanentHostError),
    (403, "InvalidAccessKeyId", PermanentHostError),
    (403, "SignatureDoesNotMatch", PermanentHostError),
    (404, "NoSuchBucket", PermanentHostError),
    (400, "SomethingNew", PermanentHostError),
    (404, "NoSuchKey", HostNotFoundError),
])
def test_server_errors_are_classified(error_server, aws_env, tmp_path, status, code, expected):
    error_server.default = (status, code)
    h = make_host(error_server.url, "bkt", max_attempts=1)
    url = "s3://bkt/pool/x/" + sha(b"x")
    try:
        with pytest.raises(expected) as info:
            h.download(url, str(tmp_path / "out"))
        assert type(info.value) is expected and info.value.host == h.name
        assert code in str(info.value)
        assert [m for m, _ in error_server.requests] == ["GET"]  # max_attempts=1: no retry
        if expected is not HostNotFoundError:
            # The upload's HEAD is told "no such object"; the PUT gets the
            # error, which boto3 wraps in an S3UploadFailedError.
            error_server.answers["HEAD"] = (404, "NotFound")
            with pytest.raises(expected) as info:
                h.upload(write(tmp_path, b"x"), sha(b"x"))
            assert type(info.value) is expected and code in str(info.value)
            assert ("PUT", "/bkt/pool/x/" + sha(b"x")) in error_server.requests
        assert not (tmp_path / "out").exists()
    finally:
        h.close()


def test_a_server_that_does_not_answer_times_out(error_server, aws_env, tmp_path):
    error_server.hang.set()
    h = make_host(error_server.url, "bkt", timeout=1, max_attempts=1)
    try:
        with pytest.raises(HostUnavailableError, match="timeout|timed out"):
            h.stat("s3://bkt/pool/x/" + sha(b"x"))
    finally:
        h.close()


def test_missing_credentials_are_a_permanent_error_with_a_hint(moto_endpoint, bucket, aws_env,
                                                               monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    h = make_host(moto_endpoint, bucket)
    try:
        with pytest.raises(PermanentHostError, match="AWS_ACCESS_KEY_ID") as info:
            h.upload(write(tmp_path, b"x"), sha(b"x"))
        assert "profile" in str(info.value)
    finally:
        h.close()


def test_upload_failed_error_is_classified_by_its_message(host):
    from boto3.exceptions import S3UploadFailedError

    for code, expected in [("AccessDenied", PermanentHostError), ("SlowDown", TransientHostError),
                           ("NoSuchKey", HostNotFoundError)]:
        exc = S3UploadFailedError("Failed to upload f to b/k: An error occurred (%s) when "
                                  "calling the UploadPart operation: no" % code)
        error = host._error(exc, "upload to", "s3://b/k")
        assert type(error) is expected and error.host == host.name
    assert type(host._error(S3UploadFailedError("odd"), "upload to", "u")) is TransientHostError


def test_a_closed_host_refuses_work(host, tmp_path):
    host.close()
    with pytest.raises(PermanentHostError, match="closed"):
        host.upload(write(tmp_path, b"x"), sha(b"x"))


def test_an_upload_is_logged_without_secrets(host, caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="cloudmanager")
    data = b"logged"
    host.upload(write(tmp_path, data), sha(data))
    host.upload(write(tmp_path, data), sha(data))
    assert "already there" in caplog.text
    assert "testing" not in caplog.text


# -- the optional dependency --------------------------------------------------

def test_without_boto3_the_error_says_what_to_install():
    code = textwrap.dedent("""
        import sys
        sys.modules["boto3"] = None
        from cloudmanager.errors import MissingDependencyError
        from cloudmanager.hosts import from_spec, host_class
        for call in (lambda: host_class("s3"), lambda: from_spec("s3://bkt/p")):
            try:
                call()
            except MissingDependencyError as exc:
                print(exc)
            else:
                raise SystemExit("no MissingDependencyError")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "pip install 'cloudmanager[s3]'" in line and "boto3" in line


def test_an_oversized_object_is_refused_before_its_bytes_are_read(host, tmp_path):
    data = os.urandom(5000)
    location = host.upload(write(tmp_path, data), sha(data))
    calls = count_calls(host, "GetObject")
    with pytest.raises(TransientHostError, match="has 5000 bytes, not the 4999 expected"):
        host.download(location.url, str(tmp_path / "out"), max_bytes=4999)
    assert calls == {"GetObject": 1} and not (tmp_path / "out").exists()


def test_bytes_that_do_not_match_the_stored_checksum_are_refused(host, bucket, s3_admin,
                                                                 tmp_path):
    # moto keeps the checksum a client declares without checking it (real
    # S3 would answer BadDigest): a stand-in for bytes damaged at rest.
    data = b"these bytes were damaged"
    wrong = base64.b64encode(hashlib.sha256(b"the original bytes").digest()).decode()
    s3_admin.put_object(Bucket=bucket, Key="pool/x/" + sha(data), Body=data,
                        ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong)
    with pytest.raises(TransientHostError, match="(?i)checksum"):
        host.download("s3://%s/pool/x/%s" % (bucket, sha(data)), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
    # stat reports the stored checksum as it is: the caller sees the mismatch.
    assert host.stat("s3://%s/pool/x/%s" % (bucket, sha(data))).sha256 != sha(data)


# -- in a pool: a same-size corruption is found, replaced, and stays replaced ----------


def test_a_pool_repairs_a_same_size_corruption_on_s3(host, bucket, s3_admin, tmp_path):
    """Wrong bytes of the right size, with no stored checksum (written by another
    client): deep verify finds them bad, sync sends the right bytes again (a size
    alone no longer skips the upload), and the next verify finds them good."""
    from cloudmanager import CloudManager

    cm = CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 1 << 20, hosts=[host],
                      redundancy=1, fsync=False)
    try:
        data = b"the right bytes " * 100
        digest = cm.upload(write(tmp_path, data))
        key = "%s/%s" % (PREFIX, digest)
        s3_admin.put_object(Bucket=bucket, Key=key, Body=b"X" * len(data))
        summary = cm.verify(deep=True)
        assert summary["bad"] == 1
        assert cm.sync()["uploads"] == 1
        assert s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert cm.verify(deep=True)["good"] == 1
        assert cm.verify(hashes=[digest])["good"] == 1  # the stored SHA-256 matches now
    finally:
        cm.close()


# -- staged uploads ---------------------------------------------------------------


def keys_of(s3_admin, bucket):
    return sorted(o["Key"] for o in s3_admin.list_objects_v2(Bucket=bucket).get("Contents", ()))


def test_a_staged_object_is_published_with_the_sha256_an_upload_stores(host, bucket, s3_admin):
    data = os.urandom(300_000)
    staged = host.stage(ForwardStream(data), len(data))
    assert staged.temp.startswith("pool/x/.cloudmanager-staging-")  # under the prefix
    calls = count_calls(host, "CopyObject", "UploadPartCopy", "HeadObject", "DeleteObject")
    location = staged.publish(sha(data))
    assert calls["CopyObject"] == 1 and calls["UploadPartCopy"] == 0  # on the server
    assert calls["DeleteObject"] == 1  # the staging key
    assert keys_of(s3_admin, bucket) == ["pool/x/" + sha(data)]
    head = s3_admin.head_object(Bucket=bucket, Key="pool/x/" + sha(data), ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    # So a verify can still compare the server's SHA-256 with the hash, without a download.
    assert host.stat(location.url) == (len(data), sha(data))


def test_a_large_staged_object_goes_up_and_is_copied_in_parts(host, bucket, s3_admin, tmp_path):
    data = os.urandom(12 * MiB)
    calls = count_calls(host, "PutObject", "UploadPart", "UploadPartCopy", "CopyObject")
    location = host.stage(ForwardStream(data), len(data)).publish(sha(data))
    assert calls == {"PutObject": 0, "UploadPart": 3, "UploadPartCopy": 3, "CopyObject": 0}
    assert keys_of(s3_admin, bucket) == ["pool/x/" + sha(data)]
    # As for a multipart upload: no SHA-256 of the whole object is kept.
    assert host.stat(location.url) == (len(data), None)
    got = tmp_path / "got"
    host.download(location.url, str(got), max_bytes=len(data))
    assert got.read_bytes() == data


def test_a_publish_under_a_name_the_server_hashes_otherwise_is_refused(host, bucket, s3_admin):
    staged = host.stage(ForwardStream(b"the staged bytes"), 16)
    with pytest.raises(TransientHostError, match="hash to"):
        staged.publish(sha(b"other bytes"))
    staged.abort()
    assert keys_of(s3_admin, bucket) == []  # neither the wrong name nor the staging key


def test_a_pool_streams_a_large_file_to_s3_once_and_verify_trusts_it(host, moto_endpoint,
                                                                     tmp_path, monkeypatch):
    from cloudmanager import CloudManager

    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(tmp_path / "big"):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    cm = CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 1000, hosts=[host],
                      redundancy=1, fsync=False)
    try:
        data = os.urandom(6 * MiB)  # larger than the cache, and in parts
        digest = cm.upload(write(tmp_path, data, "big"))
        assert digest == sha(data) and len(opened) == 1
        assert cm.verify(hashes=[digest], deep=True)["good"] == 1
        assert cm.download(digest, tmp_path / "back") and (tmp_path / "back").read_bytes() == data
    finally:
        cm.close()


# -- ranged, parallel downloads of large objects ------------------------------------


class RangeWatch:
    """The Range of every GetObject a host's client sends, and how many were
    in flight at once at most (from sending to the body's end)."""

    def __init__(self, host):
        self.ranges = []
        self.lock = threading.Lock()
        self.running = self.most = 0
        events = host.client.meta.events
        events.register("provide-client-params.s3.GetObject", self.asked)
        events.register("before-send.s3.GetObject", self.sending)
        events.register("after-call.s3.GetObject", self.answered)

    def asked(self, params, **kwargs):
        with self.lock:
            self.ranges.append(params.get("Range"))

    def sending(self, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def answered(self, parsed, **kwargs):
        # The request is in flight until its body is read: count it off then.
        body = parsed.get("Body")
        close = body.close

        def closed():
            close()
            with self.lock:
                self.running -= 1
        body.close = closed

    def spans(self):
        """The ranges asked for, as sorted (start, end) pairs, end excluded."""
        pairs = []
        for text in self.ranges:
            start, end = text[len("bytes="):].split("-")
            pairs.append((int(start), int(end) + 1))
        return sorted(pairs)


def test_a_large_object_comes_in_parallel_ranges_byte_for_byte(host, tmp_path):
    # 15 MiB and a bit: not a multiple of the range size (a third of it).
    data = os.urandom(15 * MiB + 12_345)
    location = host.upload(write(tmp_path, data), sha(data))
    watch = RangeWatch(host)
    got = tmp_path / "got"
    received = host.download(location.url, str(got), max_bytes=len(data))
    assert got.read_bytes() == data
    assert received == (sha(data), len(data))
    # One range per connection (at most max_connections, each of at least
    # multipart_chunksize: 3 here), covering the object once, in order.
    spans = watch.spans()
    assert len(spans) == 3
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 1 <= watch.most <= host.max_connections
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "src.bin"]  # no temp file


def test_ranged_downloads_at_once_share_the_hosts_connections(moto_endpoint, bucket, tmp_path):
    # Three large downloads at once on a host of 2 connections: never more
    # than 2 ranged reads in flight, and every file whole.
    h = make_host(moto_endpoint, bucket, max_connections=2)
    try:
        blobs = [os.urandom(10 * MiB + n) for n in range(3)]
        urls = [h.upload(write(tmp_path, b, "src%d" % n), sha(b)).url
                for n, b in enumerate(blobs)]
        watch = RangeWatch(h)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda n: h.download(urls[n], str(tmp_path / ("got%d" % n)),
                                                     max_bytes=len(blobs[n])), range(3)))
        assert got == [(sha(b), len(b)) for b in blobs]
        for n, b in enumerate(blobs):
            assert (tmp_path / ("got%d" % n)).read_bytes() == b
        assert len(watch.ranges) == 6 and watch.most == 2
    finally:
        h.close()


def test_a_ranged_download_is_metered_once(host, tmp_path):
    data = os.urandom(11 * MiB + 1)
    location = host.upload(write(tmp_path, data), sha(data))
    seen = []
    with meter.metering(meter.Meter(seen.append)):
        host.download(location.url, str(tmp_path / "got"), max_bytes=len(data))
    assert sum(seen) == len(data)


class Cancelled(Exception):
    pass


def test_a_cancelled_ranged_download_leaves_nothing(host, tmp_path):
    # The progress callback raises once some bytes have come (a user's
    # cancel): every range stops, and no temp file stays beside the destination.
    data = os.urandom(16 * MiB + 7)
    location = host.upload(write(tmp_path, data), sha(data))
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def progress(nbytes):
        seen.append(nbytes)
        if sum(seen) > 3 * MiB:
            raise Cancelled()

    with pytest.raises(Cancelled), meter.metering(meter.Meter(progress)):
        host.download(location.url, str(out / "got"), max_bytes=len(data))
    assert list(out.iterdir()) == []
    assert sum(seen) < len(data)


def test_a_failed_range_leaves_nothing_and_says_not_found(host, s3_admin, bucket, tmp_path):
    # The object goes away after the first range's answer: the other ranges
    # are not found; nothing is left.
    data = os.urandom(12 * MiB)
    location = host.upload(write(tmp_path, data), sha(data))
    key = "pool/x/" + sha(data)
    deleted = []

    def delete_once(params, **kwargs):
        if params.get("Range", "").startswith("bytes=0-") and not deleted:
            return
        if not deleted:
            s3_admin.delete_object(Bucket=bucket, Key=key)
            deleted.append(True)

    host.client.meta.events.register("provide-client-params.s3.GetObject", delete_once)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(HostNotFoundError):
        host.download(location.url, str(out / "got"), max_bytes=len(data))
    assert list(out.iterdir()) == []


def test_an_oversized_large_object_is_refused_after_its_first_range(host, tmp_path):
    data = os.urandom(6 * MiB)
    location = host.upload(write(tmp_path, data), sha(data))
    calls = count_calls(host, "GetObject")
    with pytest.raises(TransientHostError, match="has %d bytes" % len(data)):
        host.download(location.url, str(tmp_path / "out"), max_bytes=len(data) - 1)
    assert calls == {"GetObject": 1} and not (tmp_path / "out").exists()


# -- connections ---------------------------------------------------------------------


class KeepAliveServer:
    """An HTTP/1.1 server on loopback that keeps connections open (moto's
    server closes each one after its answer) and accepts every PUT: it counts
    the TCP connections its clients open."""

    def __init__(self):
        import http.server

        self.connections = 0
        self.puts = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.puts += 1
                self.send_response(200)
                self.send_header("ETag", '"0"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_uploads_reuse_the_clients_connections(aws_env, tmp_path):
    # 60 small uploads on 3 threads, as the engine runs them: one request
    # each, over at most 3 connections (one client shared by the threads,
    # its pool at least max_connections), not one connection per request.
    server = KeepAliveServer()
    h = make_host(server.url, "bkt", max_connections=3)
    try:
        blobs = [b"object %d" % n for n in range(60)]
        paths = [write(tmp_path, b, "f%d" % n) for n, b in enumerate(blobs)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            locations = list(pool.map(h.upload, paths, [sha(b) for b in blobs]))
        assert [loc.url.rsplit("/", 1)[1] for loc in locations] == [sha(b) for b in blobs]
        assert server.puts == 60
        assert 1 <= server.connections <= 3
    finally:
        h.close()
        server.close()


def test_a_ranged_download_with_no_temp_file_gives_its_connection_back(host, tmp_path):
    """The temp file cannot be made (its directory is gone): the first range's
    connection slot and body are given back (they leaked, and a host whose
    slots all leaked would block every later large download)."""
    data = os.urandom(11 * MiB)
    location = host.upload(write(tmp_path, data), sha(data))
    for _ in range(host.max_connections + 1):  # more failures than slots
        with pytest.raises(TransientHostError):
            host.download(location.url, str(tmp_path / "gone" / "got"), max_bytes=len(data))
    got = tmp_path / "got"
    assert host.download(location.url, str(got), max_bytes=len(data)) == (sha(data), len(data))
    assert got.read_bytes() == data
