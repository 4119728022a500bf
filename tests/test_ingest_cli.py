"""`persona-etl ingest` end to end, as a user runs it (a subprocess, warehouse from PERSONA_ETL_WAREHOUSE)."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
from fixtures.ingest_helpers import AOL_SAMPLE, MOVIELENS, aol_file, write_bytes

CLI = Path(sys.executable).parent / "persona-etl"


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PERSONA_ETL_WAREHOUSE": str(tmp / "wh" / "cli.duckdb")}
    return subprocess.run([str(CLI), "ingest", *args], env=env, capture_output=True, text=True, timeout=300)


def _totals(out: str) -> tuple[int, int, int]:
    m = re.search(r"^total: rows read (\d+), accepted (\d+), rejected (\d+)$", out, re.M)
    assert m, out
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def test_cli_ingest_aol_sample_then_again_then_bad_rows(tmp_path):
    first = _run(tmp_path, "--format", "aol", str(AOL_SAMPLE))
    assert first.returncode == 0, first.stderr
    assert _totals(first.stdout) == (122_930, 122_930, 0)
    assert f"{AOL_SAMPLE}: rows read 122930, accepted 122930, rejected 0" in first.stdout
    assert "rows/s" in first.stderr  # the per-file log line with the rate
    bad = aol_file(tmp_path / "bad.txt", ["1\tprivate words\t2006-03-01 10:00:00\t\t",
                                          "2\tprivate words\tnot a time\t\t",
                                          "3\tprivate words"])
    again = _run(tmp_path, "--format", "aol", str(AOL_SAMPLE), str(bad))
    assert again.returncode == 0, again.stderr
    assert "already ingested in batch" in again.stdout
    assert _totals(again.stdout) == (3, 1, 2)
    assert "raw.events_rejected" in again.stdout
    assert "private words" not in again.stdout + again.stderr  # query text never in output or logs
    with duckdb.connect(str(tmp_path / "wh" / "cli.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*), sum(rows_read) FROM raw.ingest_batches").fetchall() == [(2, 122_933)]


def test_cli_bad_file_exits_2_naming_file_and_problem(tmp_path):
    header = b"AnonID\tQuery\tQueryTime\tItemRank\tClickURL\n"
    data = gzip.compress(header + b"9\tsecret query\t2006-03-01 10:00:00\t\t\n" * 2000)
    cut = write_bytes(tmp_path / "cut.txt.gz", data[: len(data) - 40])
    res = _run(tmp_path, "--format", "aol", str(cut))
    assert res.returncode == 2
    assert f"persona-etl ingest: error: {cut}: truncated gzip" in res.stderr
    assert "secret" not in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "wh" / "cli.duckdb").exists()  # refused before the warehouse was even opened


def test_cli_movielens_folder(tmp_path):
    res = _run(tmp_path, "--format", "movielens", "--source", "ml-small", str(MOVIELENS))
    assert res.returncode == 0, res.stderr
    assert _totals(res.stdout) == (100_023 + 2_488, 100_023 + 2_488, 0)
    with duckdb.connect(str(tmp_path / "wh" / "cli.duckdb"), read_only=True) as con:
        assert con.execute("SELECT DISTINCT source FROM raw.events").fetchall() == [("ml-small",)]
