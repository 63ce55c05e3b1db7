"""The dashboard driven in headless Chromium (Debian's ``chromium``, through Playwright) against
a real server with the real job manager: sign in, submit, watch, pause, resume, stop, compare.

Screenshots of each view go to ``$TRAINBUS_TEST_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright_sync
import pytest

from trainbus.api import TrainbusClient, create_app

from .server import LiveServer, make_settings, run_server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # without it Chromium looks up Google hosts at start-up; the dashboard needs no network
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
TIMEOUT_MS = 30_000


def artifacts() -> Path:
    folder = Path(os.environ.get("TRAINBUS_TEST_ARTIFACTS", "test-artifacts")) / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def digits_spec(epochs: int, batch_size: int, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
        "dataset": {"name": "digits"},
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": 0,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("data"), max_running_jobs=2)
    with run_server(create_app(settings), settings) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda error: problems.append(str(error)))
    # nothing may be fetched from anywhere but the server itself
    foreign: list[str] = []
    opened.on("request", lambda r: None if r.url.startswith(server.url) else foreign.append(r.url))
    try:
        yield opened
    finally:
        context.close()
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    # refused requests the tests provoke (401, 422) are logged too; anything else is a fault
    errors = [p for p in problems if not p.startswith("Failed to load resource")]
    assert not errors, f"page errors (script errors, CSP violations): {errors}"


def sign_in(page: Any, server: LiveServer, token: str | None = None) -> None:
    page.goto(server.url + "/")
    page.fill("#token", token or server.token)
    page.click("#sign-in-form button[type=submit]")


def points(page: Any, chart: str) -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def wait_until(page: Any, condition: str, arg: Any = None) -> None:
    """Wait for ``condition`` (a JavaScript function of ``arg``) to hold: passed as a function,
    since the page's CSP forbids evaluating strings."""
    page.wait_for_function(condition, arg=arg)


def test_a_wrong_token_is_refused_and_the_right_one_signs_in(page: Any, server: LiveServer) -> None:
    response = page.goto(server.url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    sign_in(page, server, token="not-the-token")
    page.wait_for_selector("#sign-in-error:has-text('Wrong token')")
    assert page.is_hidden("#nav")
    page.screenshot(path=artifacts() / "sign-in.png")
    # keyboard only: the token field has the focus, Enter signs in
    page.keyboard.press("Control+A")
    page.keyboard.type(server.token)
    page.keyboard.press("Enter")
    page.wait_for_selector("#jobs tbody[data-loaded]", state="attached")
    # the token lives in this tab's session storage, never in a URL
    assert page.evaluate("sessionStorage.getItem('trainbus.token')") == server.token
    assert server.token not in page.url


def test_a_bad_spec_is_shown_at_its_field(page: Any, server: LiveServer) -> None:
    sign_in(page, server)
    page.click("#nav a[data-view=submit]")
    page.fill("#spec", "name: bad\nmodel:\n  name: mlp\ndataset:\n  name: digits\nepochs: 0\n")
    page.click("#submit-spec")
    error = page.wait_for_selector("#spec-errors li[data-field=epochs]")
    assert "line 6" in error.inner_text()
    assert page.get_attribute("#spec", "aria-invalid") == "true"
    page.screenshot(path=artifacts() / "submit-error.png")
    page.fill("#spec", "name: [unclosed\n")
    page.click("#submit-spec")
    page.wait_for_selector("#spec-errors li:has-text('not valid YAML')")


def test_submit_watch_pause_resume_and_stop_a_job(page: Any, server: LiveServer) -> None:
    sign_in(page, server)
    page.click("#nav a[data-view=submit]")
    page.fill(
        "#spec",
        '{"name": "long", "model": {"name": "mlp"}, "dataset": {"name": "digits"},'
        ' "epochs": 300, "batch_size": 16, "seed": 0}',
    )
    page.click("#submit-spec")
    page.wait_for_url(re.compile(r"#/jobs/"))
    page.wait_for_selector("#job-state [data-state=running]")
    # the curve grows live
    grown = "(n) => Number(document.querySelector('#chart-loss').dataset.points) > n"
    wait_until(page, grown, 0)
    seen = points(page, "#chart-loss")
    wait_until(page, grown, seen)
    page.wait_for_selector("#chart-accuracy[data-ready]")

    page.click("#pause-button")
    ack = page.wait_for_selector("#acks li.ok[data-command=pause]")
    step = int(ack.get_attribute("data-step") or -1)
    assert f"took effect at step {step}" in ack.inner_text()
    page.wait_for_selector("#job-state [data-state=paused]")
    # the curve stops where the pause took effect
    wait_until(
        page, "(s) => Number(document.querySelector('#chart-loss').dataset.lastX) === s", step
    )
    assert page.is_enabled("#resume-button") and page.is_disabled("#pause-button")

    paused_at = points(page, "#chart-loss")
    page.click("#resume-button")
    page.wait_for_selector("#acks li.ok[data-command=resume]")
    page.wait_for_selector("#job-state [data-state=running]")
    wait_until(page, grown, paused_at)

    page.click("#save-button")
    saved = page.wait_for_selector("#acks li.ok[data-command=save]")
    assert "took effect at step" in saved.inner_text()
    page.fill("#lr-input", "0.0042")
    page.click("#set-lr-button")
    changed = page.wait_for_selector("#acks li.ok[data-command=set_lr]")
    saved_step = int(saved.get_attribute("data-step") or 0)
    assert int(changed.get_attribute("data-step") or -1) >= saved_step

    page.click("#stop-button")
    page.wait_for_selector("#acks li.ok[data-command=stop]")
    page.wait_for_selector("#job-state [data-state=stopped]")
    assert page.locator("#event-log tr[data-type=job_paused]").count() >= 1
    page.wait_for_selector("#checkpoints tr")
    page.screenshot(path=artifacts() / "job.png", full_page=True)


def test_compare_two_jobs(page: Any, server: LiveServer) -> None:
    with TrainbusClient(server.url, server.token) as client:
        ids = [
            client.submit(digits_spec(3, batch_size, f"b{batch_size}"))["id"]
            for batch_size in (32, 128)
        ]
        for job_id in ids:
            assert client.wait(job_id, timeout=60)["state"] == "completed"
    sign_in(page, server)
    page.wait_for_selector(f"#jobs tr[data-job='{ids[1]}']")
    page.select_option("#state-filter", "completed")
    wait_until(page, "() => location.hash === '#/jobs?state=completed'")
    page.wait_for_selector(f"#jobs tr[data-job='{ids[0]}']")
    assert page.locator("#jobs [data-state=stopped]").count() == 0
    page.screenshot(path=artifacts() / "jobs.png")
    for job_id in ids:
        page.check(f"#jobs tr[data-job='{job_id}'] input[type=checkbox]")
    page.click("#compare-selected")
    page.wait_for_selector("#chart-compare[data-series='2'][data-ready]")
    page.select_option("#compare-metric", "val_loss")
    wait_until(
        page,
        "() => document.querySelector('#chart-compare').dataset.series === '2' && "
        "location.hash.includes('metric=val_loss')",
    )
    page.select_option("#compare-x", "epoch")
    wait_until(page, "() => location.hash.includes('x=epoch')")
    page.wait_for_selector("#chart-compare[data-ready] .u-legend")
    legend = page.inner_text("#chart-compare .u-legend")
    assert "b32" in legend and "b128" in legend
    page.screenshot(path=artifacts() / "compare.png")
    page.emulate_media(color_scheme="dark")
    page.reload()
    page.wait_for_selector("#chart-compare[data-series='2'][data-ready]")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 22, 26)", "dark mode follows the system's preference"
    page.screenshot(path=artifacts() / "compare-dark.png")
