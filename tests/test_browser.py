"""The Prefect UI in a real browser: a failed run's stages, its Retry button, the retried run.

Playwright drives Debian's Chromium, headless, with a fresh profile. The browser
may only reach the test's own Prefect server on 127.0.0.1: every other request
is aborted and recorded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import tiny_spec, write_spec
from tests.prefect_server import (  # noqa: F401 - deployed_server is a fixture.
    RUN_SECONDS,
    PrefectServer,
    deployed_server,
    run_failing_stack,
    stage_states,
    wait_for_final_state,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGUMENTS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_LOAD_MS = 120_000


@pytest.fixture
def browser(deployed_server: PrefectServer, tmp_path):
    """Yield a Chromium page limited to the test server, and the list of requests it blocked."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found; install Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    def only_test_server(route) -> None:
        if route.request.url.startswith(f"{deployed_server.url}/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGUMENTS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            context.route("**/*", only_test_server)
            yield context.new_page(), blocked
        finally:
            context.close()


def open_task_runs_tab(page, expected_rows: int) -> list[tuple[str, str]]:
    """Open the flow run's Task Runs tab and return each row's (name, state) once all are listed."""
    from playwright.sync_api import expect

    page.locator("li.p-tab", has_text="Task Runs").click()
    rows = page.locator(".task-run-list-item")
    expect(rows).to_have_count(expected_rows, timeout=PAGE_LOAD_MS)
    return [
        (row.locator("a.p-link").first.inner_text(), row.locator(".state-badge").first.inner_text())
        for row in rows.all()
    ]


def test_retry_failed_run_from_ui(deployed_server: PrefectServer, browser, tmp_path):
    from playwright.sync_api import expect

    run_id, spec_path = run_failing_stack(deployed_server, tmp_path)
    page, blocked = browser
    page.goto(f"{deployed_server.url}/runs/flow-run/{run_id}")
    state = page.locator(".page-heading-flow-run .state-badge")
    expect(state).to_have_text("Failed", timeout=PAGE_LOAD_MS)
    # The first attempt: dataset snapshot, hidden_1 and the diverged hidden_2.
    failed_rows = open_task_runs_tab(page, expected_rows=3)
    assert ("hidden_1", "Completed") in failed_rows
    assert ("hidden_2", "Failed") in failed_rows
    page.screenshot(path=str(tmp_path / "failed-run.png"), full_page=True)

    write_spec(tmp_path, tiny_spec())
    page.get_by_role("button", name="Retry").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(re.compile(r"Any task runs without a\s+persisted result\s+will be run again"))
    dialog.get_by_role("button", name="Retry").click()
    expect(state).to_have_text("Completed", timeout=RUN_SECONDS * 1000)

    # The page keeps the task run list it loaded before the retry; load it again.
    page.reload()
    expect(state).to_have_text("Completed", timeout=PAGE_LOAD_MS)
    rows = open_task_runs_tab(page, expected_rows=8)
    page.screenshot(path=str(tmp_path / "retried-run.png"), full_page=True)
    assert ("hidden_1", "Cached") in rows
    assert rows.count(("hidden_2", "Completed")) == 1
    assert ("head", "Completed") in rows
    assert blocked == []
    assert wait_for_final_state(deployed_server, run_id).state.is_completed()
    assert stage_states(deployed_server, run_id, attempt=2) == {
        "hidden_1": "Cached", "hidden_2": "Completed", "head": "Completed",
    }
