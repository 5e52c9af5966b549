"""The dashboard's sign-in: a token buys an HttpOnly, SameSite=Strict session cookie;
with the cookie, state changes need the CSRF token; signing out ends the session on the
server. The page itself is served with a CSP that allows no inline script."""

from __future__ import annotations

import re
import secrets

import httpx

from app.api.deps import SESSION_COOKIE
from tests.app.conftest import claim, points
from tests.app.test_events import read_events


def signed_in(server, token: str, **headers: str) -> tuple[httpx.Client, httpx.Response]:
    """A client holding only the session cookie (no bearer token), and the sign-in answer."""
    client = httpx.Client(base_url=server.url + "/api/v1", timeout=30)
    answer = client.post("/session", json={"token": token}, headers=headers)
    return client, answer


def user_token(server) -> str:
    from app.db import session_scope
    from app.store import users

    with session_scope(server.sessions) as session:
        _, token = users.create_user_with_token(session, f"web-{secrets.token_hex(4)}")
    return token


def test_a_token_signs_in_to_a_strict_httponly_cookie_that_reads_the_api(server, queued_job, user):
    token = user.headers["Authorization"].removeprefix("Bearer ")
    client, answer = signed_in(server, token)
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain http
    assert token not in answer.text  # the token is never echoed back
    csrf = answer.json()["csrf_token"]
    # the cookie alone reads, the SSE stream included (EventSource cannot send headers)
    assert client.get(f"/jobs/{queued_job['id']}").status_code == 200
    assert client.get("/jobs").json()["jobs"][0]["id"] == queued_job["id"]
    # a reloaded page gets its CSRF token back
    assert client.get("/session").json() == {"user": answer.json()["user"], "csrf_token": csrf}
    client.close()


def test_the_cookie_is_secure_behind_https(server, user):
    token = user.headers["Authorization"].removeprefix("Bearer ")
    # a TLS-terminating proxy on the same host says so (uvicorn trusts 127.0.0.1)
    client, answer = signed_in(server, token, **{"X-Forwarded-Proto": "https"})
    assert answer.status_code == 200
    assert "secure" in answer.headers["set-cookie"].lower()
    client.close()


def test_a_state_change_by_cookie_needs_the_csrf_token(server, user, queued_job):
    token = user.headers["Authorization"].removeprefix("Bearer ")
    client, answer = signed_in(server, token)
    csrf = answer.json()["csrf_token"]
    cancel = f"/jobs/{queued_job['id']}/cancel"
    for headers in ({}, {"X-CSRF-Token": "not-it"}):
        refused = client.post(cancel, headers=headers)
        assert refused.status_code == 403, refused.text
        assert "X-CSRF-Token" in refused.json()["detail"]
    assert user.get(f"/jobs/{queued_job['id']}").json()["status"] == "queued"
    done = client.post(cancel, headers={"X-CSRF-Token": csrf})
    assert done.status_code == 202 and done.json()["status"] == "cancelled"
    client.close()


def test_sign_out_ends_the_session_on_the_server(server, user):
    token = user.headers["Authorization"].removeprefix("Bearer ")
    client, answer = signed_in(server, token)
    cookie = client.cookies[SESSION_COOKIE]
    assert client.delete("/session").status_code == 403  # without its CSRF token
    out = client.delete("/session", headers={"X-CSRF-Token": answer.json()["csrf_token"]})
    assert out.status_code == 204
    # the same cookie, replayed, no longer signs anyone in
    with httpx.Client(base_url=server.url + "/api/v1", cookies={SESSION_COOKIE: cookie}) as old:
        assert old.get("/jobs").status_code == 401
        assert old.get("/session").status_code == 401
    client.close()


def test_a_bad_token_or_a_form_post_does_not_sign_in(server, user):
    client, answer = signed_in(server, "ty_not-a-token")
    assert answer.status_code == 401 and "set-cookie" not in answer.headers
    token = user.headers["Authorization"].removeprefix("Bearer ")
    # what a cross-site HTML form could send: not JSON, so no session
    form = client.post(
        "/session", content=f'{{"token": "{token}"}}', headers={"Content-Type": "text/plain"}
    )
    assert form.status_code == 422 and "set-cookie" not in form.headers
    client.close()


def test_a_cookie_does_not_reach_another_users_job(server, queued_job):
    client, _ = signed_in(server, user_token(server))
    assert client.get(f"/jobs/{queued_job['id']}").status_code == 404
    assert client.get(f"/jobs/{queued_job['id']}/events").status_code == 404
    assert client.get(f"/jobs/{queued_job['id']}/metrics?max_points=10").status_code == 404
    client.close()


def test_the_page_is_served_with_a_csp_that_allows_no_inline_script(server):
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert (
            "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        )
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts and all('src="/web/' in tag for tag in scripts)
        module = client.get("/web/js/main.js")
        assert module.status_code == 200 and "javascript" in module.headers["content-type"]
        assert "content-security-policy" in module.headers
        assert client.get("/web/vendor/uplot/VERSION").text.strip() == "1.6.32"
        # the API's own answers are left as they were
        assert "content-security-policy" not in client.get("/healthz").headers


def test_a_history_read_names_its_last_event_and_the_stream_skips_metrics_up_to_it(
    server, user, queued_job
):
    job_id = queued_job["id"]
    attempt = claim(server, job_id)
    attempt.post("metrics", {"points": points(1.0, 0.9, 0.8)})
    history = user.get(f"/jobs/{job_id}/metrics?max_points=100&format=columnar")
    last = int(history.headers["X-Last-Event-Id"])
    assert history.json()["loss"]["step"] == [0, 1, 2]
    attempt.post("metrics", {"points": points(0.7, 0.6, start=3)})
    attempt.post("finish", {"status": "succeeded", "result": {}})
    with server.client(user.headers["Authorization"].removeprefix("Bearer ")) as client:
        client.params = {"metrics_after": str(last)}
        events = read_events(client, job_id)
    kinds = [event["event"] for event in events]
    assert kinds.count("status") >= 3  # queued, running, succeeded: all from the start
    steps = [p["step"] for e in events if e["event"] == "metrics" for p in e["data"]["points"]]
    assert steps == [3, 4]  # only what the history read lacked
