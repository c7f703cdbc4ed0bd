"""Scenario in a real browser (Playwright driving Debian's headless chromium):

a modality sends a CT series with storescu; the administrator watches it complete on the
dashboard with its per-stage timeline, opens the series and sees the source and result
thumbnails; the viewer goes down, the series is sent again and its job fails; the viewer
comes back, the administrator retries the job from the Jobs page and it is delivered.
Screenshots of every page go to test-artifacts/screenshots/ (README "Web console").
Then /metrics shows counters and per-stage histograms, and no page, metric or log line
carries the patient's name or ID.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from conftest import REPO, storescu, wait_for
from websupport import ADMIN_PASSWORD, marked_series, metric_samples, phi_found, web_node  # noqa: F401

SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("PACS_NODE_CHROMIUM", "/usr/bin/chromium")
SLICES = 4


def browser():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def reload_until(page, predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    def check() -> bool:
        page.reload()
        return bool(predicate())

    wait_for(check, timeout, what, interval=1.0)


def test_console_follows_a_series_and_retries_a_failed_job(web_node, storescp, ge_head, tmp_path):  # noqa: F811
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "viewer", "ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]
    rules = [{"name": "ct-denoise", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical",
              "destinations": ["viewer"]}]
    node = web_node(peers, rules, send={"max_attempts": 2, "backoff_seconds": 0.5, "backoff_max_seconds": 1.0,
                                        "timeout_seconds": 30.0})
    base = f"http://127.0.0.1:{node.http_port}"
    series_dir = tmp_path / "series"
    marked_series(ge_head, series_dir, SLICES)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pages: list[str] = []

    sent = storescu(node.port, series_dir)
    assert sent.returncode == 0, sent.stderr

    with browser() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        # log in first: retrying a job changes state
        page.goto(f"{base}/login")
        page.get_by_test_id("login-name").fill("admin")
        page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
        page.get_by_test_id("login-submit").click()
        page.wait_for_url(f"{base}/")

        # dashboard: the series completes and its job is done; every stage of the timeline has a time
        page.wait_for_selector("[data-testid=job-state]:has-text('done')", timeout=180_000)
        row = page.locator("tr[data-series]").first
        assert row.get_by_test_id("series-state").inner_text() == "complete"
        for stage in ("received", "complete", "queued", "model", "encoded", "sent"):
            value = row.locator(f"[data-stage={stage}]").inner_text()
            assert re.fullmatch(r"[\d,.]+ m?s", value), f"stage {stage}: {value!r}"
        page.screenshot(path=str(SCREENSHOTS / "01-dashboard.png"), full_page=True)
        pages.append(page.content())

        # series page: source and result thumbnails both rendered
        row.locator("a.uid").click()
        page.wait_for_selector("img[data-testid=thumb-after]")
        page.wait_for_function("() => [...document.querySelectorAll('img[data-testid^=thumb]')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        sizes = page.eval_on_selector_all("img[data-testid^=thumb]", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) == 2 and all(w >= 128 for w in sizes), sizes
        assert page.locator("tr.match").count() >= 1  # the rule that matched, with why
        page.screenshot(path=str(SCREENSHOTS / "02-series.png"), full_page=True)
        pages.append(page.content())
        assert len(storescp.files()) == SLICES

        # the viewer goes down; the series arrives again (a new generation) and its job fails
        storescp.stop()
        for f in storescp.files():
            f.unlink()
        sent = storescu(node.port, series_dir)
        assert sent.returncode == 0, sent.stderr
        page.goto(f"{base}/jobs?state=failed")
        reload_until(page, lambda: page.locator("[data-testid^=retry-]").count() > 0, 180,
                     "the job to fail with the viewer down")
        failed_id = page.locator("tr[data-job]").first.get_attribute("data-job")
        assert "association" in page.locator(f"#job-{failed_id} .err").first.inner_text()
        page.screenshot(path=str(SCREENSHOTS / "03-jobs-failed.png"), full_page=True)
        pages.append(page.content())

        # the viewer is back: retry from the Jobs page, and the results are delivered
        storescp.start()
        page.get_by_test_id(f"retry-{failed_id}").click()
        page.wait_for_selector(".flash.ok")
        assert f"job {failed_id}: resending" in page.locator(".flash.ok").inner_text()
        page.goto(f"{base}/jobs")
        reload_until(page, lambda: page.get_by_test_id(f"job-state-{failed_id}").inner_text() == "done", 120,
                     "the retried job to be delivered")
        wait_for(lambda: len(storescp.files()) == SLICES, 30, "the results at the viewer")
        page.screenshot(path=str(SCREENSHOTS / "04-jobs-retried.png"), full_page=True)
        pages.append(page.content())

        # rules tester: pick the stored series, see the rule fire
        page.goto(f"{base}/rules")
        page.get_by_test_id("tester-run").click()
        page.wait_for_selector("[data-testid=tester-result] tr.match")
        page.screenshot(path=str(SCREENSHOTS / "05-rules.png"), full_page=True)
        pages.append(page.content())

        # peers: C-ECHO the viewer; its last delivery is shown
        page.goto(f"{base}/peers")
        page.get_by_test_id("echo-viewer").click()
        page.wait_for_selector(".flash")
        assert "success" in page.locator(".flash").inner_text()
        assert page.locator("tr[data-peer=viewer] .state-done").count() == 1
        page.screenshot(path=str(SCREENSHOTS / "06-peers.png"), full_page=True)
        pages.append(page.content())
        chromium.close()

    # /metrics after that run: counters and per-stage histograms filled
    done = 'pacs_node_jobs_finished_total{outcome="done",pipeline="ct-denoise-classical"}'

    def scrape() -> dict[str, float]:
        return metric_samples(requests.get(f"{base}/metrics", timeout=30).text)

    wait_for(lambda: scrape().get(done) == 2, 30, "the job watcher to count the retried job")  # polls each second
    text = requests.get(f"{base}/metrics", timeout=30).text
    m = metric_samples(text)
    assert m['pacs_node_instances_received_total{transport="dimse"}'] == 2 * SLICES
    assert m['pacs_node_received_bytes_total{transport="dimse"}'] > 0
    assert m['pacs_node_associations_total{outcome="accepted"}'] >= 2
    assert m["pacs_node_send_retries_total"] >= 1
    assert m[done] == 2
    assert m['pacs_node_jobs_finished_total{outcome="failed",pipeline="ct-denoise-classical"}'] == 1
    assert m['pacs_node_model_inference_seconds_count{pipeline="ct-denoise-classical"}'] == 3
    for stage in ("store", "completion", "queue", "load", "model", "encode", "write", "send", "total"):
        assert m[f'pacs_node_stage_seconds_count{{stage="{stage}"}}'] > 0, stage
        assert m[f'pacs_node_stage_seconds_bucket{{le="+Inf",stage="{stage}"}}'] > 0, stage
    shutil.copy(node.log_path, SCREENSHOTS / "node.log")
    (SCREENSHOTS / "metrics.txt").write_text(text)

    # nothing the console or the log shows names the patient
    assert phi_found(*pages, text, node.log()) == []
