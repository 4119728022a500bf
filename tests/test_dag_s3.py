"""Object-store landing: persona_daily's ingest reads ``s3://`` landing files through fsspec (s3fs).

A real S3-compatible HTTP server on loopback (moto in server mode, ``ThreadedMotoServer`` on 127.0.0.1), a real
s3fs client pointed at it through the standard AWS environment (``AWS_ENDPOINT_URL_S3``, credentials,
region): the same configuration a MinIO / Ceph / S3 deployment uses, with no persona-etl setting beyond
``[orchestration] landing_dir = "s3://bucket/prefix"``. The day's files are listed, copied to the run's work folder
and ingested; the raw gate reconciles them; the rows equal an ingest of the same file from a local folder.
"""

from __future__ import annotations

import pytest

pytest.importorskip("s3fs", reason="s3fs is pinned in requirements/lock.txt; install the lock")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is pinned in requirements/lock.txt")

DAY, OTHER_DAY = "2006-03-01", "2006-03-02"
BUCKET = "persona-landing"


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 (free port) and the AWS environment pointing at it; yields the endpoint URL."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in {"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield url
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _settings(tmp_path, name, landing_dir):
    from persona_tasks.config import DbtSettings, OrchestrationSettings, Settings

    return Settings(warehouse=tmp_path / name / "warehouse.duckdb", dbt=DbtSettings(target_path=tmp_path / "t"),
                    orchestration=OrchestrationSettings(landing_dir=landing_dir))


def test_ingest_landing_from_s3_through_fsspec(tmp_path, s3_endpoint):
    import boto3
    import duckdb

    from persona_tasks import daily

    # the landing day, written by the local-folder helper, then uploaded with a plain S3 client
    local = _settings(tmp_path, "local", str(tmp_path / "landing"))
    path = daily.sample_landing_day(local, DAY)
    s3 = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL_S3
    assert s3.meta.endpoint_url == s3_endpoint
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(path), BUCKET, f"landing/{DAY}/{path.name}")
    s3.put_object(Bucket=BUCKET, Key=f"landing/{DAY}/.upload-in-progress", Body=b"ignored")  # hidden: skipped
    s3.put_object(Bucket=BUCKET, Key=f"landing/{OTHER_DAY}/other.tsv", Body=b"another day")

    remote = _settings(tmp_path, "remote", f"s3://{BUCKET}/landing")
    files = daily.landing_files(remote, DAY)
    assert [f.name for f in files] == [path.name]
    assert files[0].read_bytes() == path.read_bytes()
    assert files[0].is_relative_to(daily.run_dir(remote, DAY))  # copied to the run's work folder
    assert daily.landing_files(remote, "2006-03-09") == []  # a day with no prefix: no files

    got = daily.ingest_landing(remote, DAY)
    gate = daily.gate_raw(remote, DAY, got)
    assert gate["rows_read"] > 1000 and gate["rows_rejected"] == 0
    rerun = daily.ingest_landing(remote, DAY)  # same content, same batch: nothing added
    assert rerun["batch_ids"] == got["batch_ids"] and all(f["events_new"] == 0 for f in rerun["files"])

    want = daily.ingest_landing(local, DAY)
    assert want["batch_ids"] == got["batch_ids"]  # content-addressed batches: same file, same batch
    counts = {}
    for name in ("local", "remote"):
        con = duckdb.connect(str(tmp_path / name / "warehouse.duckdb"), read_only=True)
        try:
            counts[name] = con.execute("SELECT count(*), count(DISTINCT event_id), count(DISTINCT user_id) "
                                       "FROM raw.events").fetchall()[0]
        finally:
            con.close()
    assert counts["remote"] == counts["local"] and counts["remote"][0] == sum(f["events_new"] for f in got["files"])
