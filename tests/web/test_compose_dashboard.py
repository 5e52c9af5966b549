"""The dashboard in the compose deployment: docker-compose.yml's api and workers as local
processes on Postgres and Redis (tests/test_service_e2e.py's `compose_service`)."""

from __future__ import annotations

import httpx
import pytest

from tests.test_service_e2e import compose_service, short_digits_spec, upload_digits
from tests.web.conftest import sign_in

__all__ = ["compose_service"]  # a fixture: used by name


@pytest.mark.slow
def test_the_compose_api_serves_the_dashboard_of_a_job_its_workers_trained(
    compose_service, browser, examples_dir
):
    """The dashboard in the compose deployment (Postgres, Redis, the image's command):
    signed in with the API's token, a job its workers trained is found in the table,
    its page draws its charts and shows it succeeded, under the same CSP as embedded."""
    client = compose_service.client()
    job = client.submit(short_digits_spec(*upload_digits(client, examples_dir)))
    assert job.wait(timeout=300).status == "succeeded"

    index = httpx.get(f"{compose_service.url}/")
    assert index.status_code == 200
    assert "script-src 'self'" in index.headers["content-security-policy"]
    context = browser.new_context(base_url=compose_service.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        sign_in(page, compose_service.token)
        page.click(f'tr[data-job="{job.id}"] a.job-name')
        page.wait_for_selector("#job-status .status-succeeded")
        # the chart of the accuracy family: val_accuracy (and accuracy, when trained with it)
        page.wait_for_selector('.chart[data-metric="accuracy"]')
        points = page.get_attribute('.chart[data-metric="accuracy"]', "data-points")
        history = job.metrics([n for n in ("accuracy", "val_accuracy") if n in job.info["metrics"]])
        assert int(points or 0) == sum(len(series) for series in history.values()) >= 3
    finally:
        context.close()
    assert errors == []
