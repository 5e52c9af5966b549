"""The dashboard in a real browser: sign in and out, a job watched live to its end,
cancel, downloads, the spec editor's errors, markup shown as text, and one user's job
out of another's reach."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from tests.test_service_e2e import Service
from tests.web.conftest import digits_spec, http, new_user_token, shoot, sign_in, wait_until
from torchyard import Client

HOSTILE_NAME = '<script>alert("name")</script><img src=x onerror=alert("img")>'
HOSTILE_LINE = '<img src=x onerror=alert("log")> <script>alert("log")</script>'
HOSTILE_METRIC = "<img src=x onerror=alert(1)>"


class Attempt:
    """The test as a job's worker: what it reports goes through the worker protocol."""

    def __init__(self, service: Service, job_id: str):
        worker_token = (Path(service.env["TORCHYARD_HOME"]) / "worker_token").read_text().strip()
        self.base = f"{service.url}/api/v1/worker/jobs/{job_id}"
        claim = httpx.post(
            f"{self.base}/claim",
            json={"worker": "test:1"},
            headers={"Authorization": f"Bearer {worker_token}"},
        )
        assert claim.status_code == 200, claim.text
        self.headers = {"Authorization": f"Bearer {claim.json()['token']}"}

    def log(self, lines: list[str]) -> None:
        answer = httpx.post(f"{self.base}/logs", json={"lines": lines}, headers=self.headers)
        assert answer.status_code == 204, answer.text

    def metrics(self, points: list[dict[str, Any]]) -> None:
        answer = httpx.post(f"{self.base}/metrics", json={"points": points}, headers=self.headers)
        assert answer.status_code == 200, answer.text


def reported_job(service: Service, api: Client, digits, name: str) -> tuple[Any, Attempt]:
    """A cuda job: it waits on the gpu queue, which this CPU service's workers do not
    take, so the test claims it and reports for it."""
    spec = digits_spec(*digits, epochs=1, name=name)
    spec["training"]["device"] = "cuda"
    job = api.submit(spec)
    return job, Attempt(service, job.id)


def step_points(steps: range) -> list[dict[str, Any]]:
    return [
        {"name": "loss_step", "step": s, "epoch": 0, "value": 1 / (s + 1), "time": 1.0 + s}
        for s in steps
    ]


def set_hidden(page: Any, hidden: bool) -> None:
    """What the browser does when the tab goes to the background (or comes back)."""
    page.evaluate(
        """(hidden) => {
        Object.defineProperty(document, "hidden", { value: hidden, configurable: true });
        Object.defineProperty(document, "visibilityState",
          { value: hidden ? "hidden" : "visible", configurable: true });
        document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


def log_lines(page: Any) -> list[str]:
    return [line for line in page.inner_text("#log").split("\n") if line]


def chart_points(page: Any, metric: str) -> int:
    return int(page.get_attribute(f'.chart[data-metric="{metric}"]', "data-points") or 0)


def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_the_session(page, service):
    sign_in(page, service.token)
    [cookie] = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain http here; behind https it is Secure (tests/app)
    storage = page.evaluate("() => JSON.stringify([localStorage, sessionStorage])")
    assert service.token not in storage and storage == "[{},{}]"
    # a reload stays signed in: the CSRF token comes back from GET /api/v1/session
    page.reload()
    page.wait_for_selector("#jobs")

    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    with http(service) as client:
        client.cookies.set(cookie["name"], cookie["value"])
        answer = client.get("/api/v1/jobs")
    assert answer.status_code == 401  # the old cookie is dead server-side, not only forgotten


def test_a_job_trained_by_a_real_worker_is_watched_live_until_it_ends(
    page, service: Service, api: Client, digits
):
    job = api.submit(digits_spec(*digits, epochs=6, name="watched"))
    sign_in(page, service.token)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector("#charts")
    # the first reading of the step-level chart, once it exists, then growth without a reload
    wait_until(lambda: page.query_selector('.chart[data-metric="loss_step"]'), timeout=120)
    first = chart_points(page, "loss_step")
    wait_until(lambda: chart_points(page, "loss_step") > first, timeout=120)
    page.wait_for_selector("#job-status .status-running, #job-status .status-succeeded")
    page.wait_for_selector("#job-status .status-succeeded", timeout=180_000)
    assert (
        page.evaluate("() => performance.getEntriesByType('navigation').length") == 1
    )  # no reload
    final = api.job(job.id).info
    history = api.job(job.id).metrics()
    # every step-level point reported is on the chart (live points joined the history)
    wait_until(lambda: chart_points(page, "loss_step") == len(history["loss_step"]), timeout=10)
    statuses = page.inner_text("#status-history")
    assert "queued" in statuses and "running" in statuses and "succeeded" in statuses
    assert page.get_attribute('.chart[data-metric="accuracy"]', "data-best-epoch") == str(
        final["best"]["epoch"]
    )
    shoot(page, "job")


def test_cancel_from_the_page(page, service: Service, api: Client, digits):
    job = api.submit(digits_spec(*digits, epochs=500, name="to cancel"))
    sign_in(page, service.token)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector("#job-status .status-running", timeout=120_000)
    page.click("#cancel")
    page.wait_for_selector("#job-status .status-cancelled", timeout=120_000)
    assert api.job(job.id).status == "cancelled"


def test_a_checkpoint_downloaded_from_the_page_matches_the_api(
    page, service: Service, api: Client, digits, tmp_path: Path
):
    job = api.submit(digits_spec(*digits, epochs=1, name="downloads"))
    wait_until(lambda: api.job(job.id).status == "succeeded", timeout=180)
    sign_in(page, service.token)
    page.goto(f"/#/jobs/{job.id}")
    # locators, not element handles: the table is drawn again as checkpoint events arrive
    row = page.locator("#checkpoints tr[data-checkpoint]").first
    checkpoint_id = row.get_attribute("data-checkpoint")
    with page.expect_download() as info:
        row.locator('a[data-format="safetensors"]').click()
    saved = tmp_path / "weights.safetensors"
    info.value.save_as(saved)
    with http(service) as client:
        expected = client.get(
            f"/api/v1/jobs/{job.id}/checkpoints/{checkpoint_id}",
            headers={"Authorization": f"Bearer {service.token}"},
        ).content
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_a_bad_spec_shows_its_error_at_its_json_path(page, service: Service, digits):
    spec = digits_spec(*digits, epochs=1)
    spec["model"]["layers"][3]["out_features"] = -5
    sign_in(page, service.token)
    page.goto("/#/submit")
    page.fill("#spec-editor", json.dumps(spec, indent=2))
    issue = page.wait_for_selector("#issues li")
    assert issue.get_attribute("data-path") == "model.layers[3].out_features"
    assert page.is_disabled("#submit-job")
    # fixed, it validates: the model summary shows and Submit is enabled
    spec["model"]["layers"][3]["out_features"] = 10
    page.fill("#spec-editor", json.dumps(spec, indent=2))
    page.wait_for_selector("#spec-summary table.layers")
    page.wait_for_selector("#submit-job:not([disabled])")
    shoot(page, "submit")


def test_markup_in_names_log_lines_and_metric_names_is_shown_as_text(
    page, service: Service, api: Client, digits
):
    job, attempt = reported_job(service, api, digits, HOSTILE_NAME)
    attempt.log([HOSTILE_LINE])
    attempt.metrics([{"name": HOSTILE_METRIC, "step": 1, "epoch": 0, "value": 1.0, "time": 1.0}])
    sign_in(page, service.token)
    row = page.wait_for_selector(f'tr[data-job="{job.id}"] .job-name')
    assert row.inner_text() == HOSTILE_NAME
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector("#log")
    wait_until(lambda: HOSTILE_LINE in page.inner_text("#log"), timeout=30)
    assert page.inner_text("#job-name") == HOSTILE_NAME
    assert page.inner_text(f'.chart[data-metric="{HOSTILE_METRIC}"] figcaption') == HOSTILE_METRIC
    # nothing was parsed as markup: no element came from a user's string
    assert page.evaluate("() => document.querySelectorAll('main img, main script').length") == 0
    # (the page fixture fails the test on any alert() or script error)


def test_another_users_job_is_not_reachable_by_url(page, service: Service, api, digits):
    job = api.submit(digits_spec(*digits, epochs=1, name="private"))
    sign_in(page, new_user_token(service, "mallory"))
    assert page.query_selector(f'tr[data-job="{job.id}"]') is None
    page.goto(f"/#/jobs/{job.id}")
    assert "no job" in page.inner_text("#not-found")
    answer = page.evaluate(
        "async (id) => (await fetch(`/api/v1/jobs/${id}/events`)).status", job.id
    )
    assert answer == 404


def test_compare_overlays_a_metric_and_lists_the_spec_paths_that_differ(
    page, service: Service, api: Client, digits
):
    one = api.submit(digits_spec(*digits, epochs=1, name="compare-a"))
    two = api.submit(digits_spec(*digits, epochs=2, name="compare-b"))
    for job in (one, two):
        wait_until(lambda job=job: api.job(job.id).status == "succeeded", timeout=180)
    sign_in(page, service.token)
    for job in (one, two):
        page.check(f'tr[data-job="{job.id}"] input[type=checkbox]')
    shoot(page, "jobs")
    page.click("#compare")
    page.wait_for_selector("#spec-diff")
    rows = page.locator("#spec-diff tbody tr")
    paths = [rows.nth(n).locator("td.path").inner_text() for n in range(rows.count())]
    assert paths == ["name", "training.epochs"]
    page.select_option("#compare-metric", "val_accuracy")
    chart = page.wait_for_selector('.chart[data-metric="val_accuracy"]')
    assert int(chart.get_attribute("data-points")) == 3  # 1 + 2 epochs, two series
    assert page.locator("#compare-best tbody tr").count() == 2
    shoot(page, "compare")


def test_a_dataset_uploaded_from_the_page_is_listed_with_its_fields(
    page, service: Service, examples_dir: Path
):
    sign_in(page, service.token)
    page.goto("/#/datasets")
    page.set_input_files("#dataset-file", str(examples_dir / "data" / "digits_val.npz"))
    page.wait_for_selector("#upload-state:has-text('uploaded')")
    assert page.get_attribute("#upload-progress", "value") == "1"
    row = page.locator("#datasets tbody tr", has_text="digits_val.npz").first
    fields = row.locator("ul.fields").inner_text()
    assert "x float32 (1, 8, 8)" in fields and "y int64 ()" in fields
    shoot(page, "datasets")


def test_a_hidden_page_stops_reading_and_catches_up_with_nothing_lost_or_doubled(
    page, service: Service, api: Client, digits
):
    job, attempt = reported_job(service, api, digits, "hidden")
    attempt.log(["line 0"])
    attempt.metrics(step_points(range(0, 10)))
    sign_in(page, service.token)
    page.goto(f"/#/jobs/{job.id}")
    wait_until(lambda: chart_points(page, "loss_step") == 10, timeout=30)
    wait_until(lambda: log_lines(page) == ["line 0"], timeout=30)
    # each status event shows when it happened
    assert page.locator("#status-history li time").count() >= 2

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    set_hidden(page, True)
    page.wait_for_timeout(300)
    requests.clear()
    attempt.log(["line 1", "line 2"])
    attempt.metrics(step_points(range(10, 25)))
    attempt.log(["line 3"])
    page.wait_for_timeout(2500)  # the stream would have brought them by now (0.25-s ticks)
    assert requests == []  # stream closed, timers stopped: a hidden page asks nothing
    assert log_lines(page) == ["line 0"] and chart_points(page, "loss_step") == 10

    set_hidden(page, False)
    wait_until(lambda: chart_points(page, "loss_step") == 25, timeout=30)
    wait_until(lambda: len(log_lines(page)) >= 4, timeout=30)
    page.wait_for_timeout(1500)  # anything sent twice would be shown by now
    assert log_lines(page) == ["line 0", "line 1", "line 2", "line 3"]
    assert chart_points(page, "loss_step") == 25
    statuses = page.inner_text("#status-history")
    assert statuses.count("running") == 1  # the resumed stream did not replay the start
    # and it is live again
    attempt.log(["line 4"])
    attempt.metrics(step_points(range(25, 30)))
    wait_until(lambda: log_lines(page)[-1:] == ["line 4"], timeout=30)
    wait_until(lambda: chart_points(page, "loss_step") == 30, timeout=30)


def test_the_log_tail_keeps_the_last_lines_in_order_as_they_arrive(
    page, service: Service, api: Client, digits
):
    job, attempt = reported_job(service, api, digits, "log tail")
    sign_in(page, service.token)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector("#charts")
    for first in range(0, 700, 100):
        attempt.log([f"line {n}" for n in range(first, first + 100)])
        page.wait_for_timeout(300)
    wait_until(lambda: log_lines(page)[-1:] == ["line 699"], timeout=30)
    shown = log_lines(page)
    # about the last 500 (whole batches are dropped), none twice, in order, ending at the last
    assert 500 <= len(shown) < 700
    first = int(shown[0].split()[1])
    assert shown == [f"line {n}" for n in range(first, 700)]
    # a line that arrives later is appended, not the box rebuilt
    page.evaluate("() => { window.__firstLogNode = document.querySelector('#log').firstChild; }")
    attempt.log(["line 700"])
    wait_until(lambda: log_lines(page)[-1:] == ["line 700"], timeout=30)
    assert page.evaluate(
        "() => document.querySelector('#log').firstChild === window.__firstLogNode"
    )


def test_y_tick_labels_are_short_enough_for_the_axis(page, service: Service):
    sign_in(page, service.token)
    labels = page.evaluate(
        """async () => { const { tickLabel } = await import("/web/js/charts.js");
        return [0.0001, 0.00015000000000000001, 0.001, 0.1 + 0.2, 12.75, 0, 2.5e6]
          .map(tickLabel); }"""
    )
    # an lr of 1e-4 no longer needs a wider axis than the chart gives it
    assert labels == ["1e-4", "1.5e-4", "0.001", "0.3", "12.75", "0", "2.5e6"]
