"""The gates' Data Docs in a real headless browser: Debian's Chromium driven by Selenium through Debian's
ChromeDriver (scripts/install.sh installs both as root; no browser is downloaded at run time).

A real warehouse gets a landing day whose file has 30% rejected rows; the raw gate fails (real ingest, real GX
validation), its Data Docs are served on 127.0.0.1 by ``persona_tasks.gates.site.serve`` (what ``persona-etl gate
docs`` runs) and the page the alert links to is opened: the failed check's row shows its name and its observed
value. A screenshot is saved to test_artifacts/ (kept by CI as an artifact).
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from persona_tasks import daily
from persona_tasks.config import PROJECT_DIR, load_settings

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = PROJECT_DIR / "test_artifacts"
DAY = "2026-03-10"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/install.sh as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    import polars as pl

    from persona_tasks.synth import generate_events, write_events

    tmp = tmp_path_factory.mktemp("docs_browser")
    df = generate_events(500, n_users=10, seed=3, days=1, start=DAY)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) < 150).then(pl.lit("bogus")).otherwise(pl.col("event_type"))
                         .alias("event_type"))
    write_events(df, tmp / "landing" / DAY / "events.parquet")
    port = free_port()
    settings = load_settings(warehouse=tmp / "wh" / "warehouse.duckdb", threads=2,
                             gates={"docs_base_url": f"http://127.0.0.1:{port}", "docs_port": port},
                             orchestration={"landing_dir": str(tmp / "landing"), "landing_format": "events",
                                            "landing_source": "synth"})
    ingested = daily.ingest_landing(settings, DAY)
    with pytest.raises(daily.GateError) as err:
        daily.gate_raw(settings, DAY, ingested)
    from persona_tasks.gates import site

    server = site.serve(settings, block=False)
    yield settings, err.value, tmp
    server.shutdown()
    server.server_close()


def test_failed_check_and_its_observed_value_show_in_the_browser(failed_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    settings, err, tmp = failed_run
    assert err.checks == ["rejected_share"]
    url = err.docs_url  # what the alert links to
    assert url.startswith(f"http://127.0.0.1:{settings.gates.docs_port}/validations/gate_raw/day/")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,1800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        assert "Great Expectations" in driver.title
        rows = driver.find_elements(By.XPATH, "//tr[td[contains(normalize-space(.), 'rejected_share (block)')]]")
        assert rows, "the failed check's row is not on the page"
        row = rows[0].text
        observed = json.loads(dict(_rows(settings))["rejected_share"])  # what quality_check_results recorded
        assert observed == pytest.approx(0.3)
        assert "0.3" in row, row  # the observed value in the check's own row
        assert "max_value 0.05" in row, row  # and its threshold
        # the page's own status for the validation, and the index page lists it
        assert "Failed" in driver.find_element(By.TAG_NAME, "body").text
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "quality_docs_rejected_share.png"
        rows[0].location_once_scrolled_into_view  # noqa: B018 - scrolls the row into the screenshot
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # the index lists the validation (its table is drawn by scripts GX loads from public CDNs, which this
        # machine cannot reach: check the page's data, not the drawn table)
        driver.get(f"http://127.0.0.1:{settings.gates.docs_port}/index.html")
        assert url.split(f":{settings.gates.docs_port}/")[1] in driver.page_source
    finally:
        driver.quit()


def _rows(settings):
    from persona_tasks.warehouse import connect_read_only

    with connect_read_only(settings) as con:
        return con.execute("SELECT check_name, observed_value FROM quality_check_results WHERE NOT success").fetchall()
