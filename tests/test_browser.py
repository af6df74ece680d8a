"""The page, in real Chromium driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ROOT, Server, ServerFactory, unavailable

CHROMIUM = shutil.which("chromium")
# As root Chromium needs --no-sandbox; the rest keep it off the (closed) network.
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
#: Where CI keeps test output (screenshots).
OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM:
        unavailable("chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def server(serve: ServerFactory) -> Server:
    return serve(workers=2, threads=4)


def open_page(browser: Any, server: Server, **options: Any) -> Any:
    context = browser.new_context(**options)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(server.url + "/")
    return page


def test_two_browsers_each_see_only_their_own_count(browser: Any, server: Server) -> None:
    from playwright.sync_api import expect

    alice, bob = open_page(browser, server), open_page(browser, server)
    for _ in range(3):
        alice.get_by_role("button", name="+1").click()
        expect(alice.locator("#count")).to_have_text(str(_ + 1))
    for _ in range(2):
        bob.get_by_role("button", name="−1").click()
    expect(bob.locator("#count")).to_have_text("-2")
    alice.reload()
    bob.reload()
    expect(alice.locator("#count")).to_have_text("3")
    expect(bob.locator("#count")).to_have_text("-2")

    alice.get_by_role("button", name="Reset").click()
    expect(alice.locator("#count")).to_have_text("0")
    alice.reload()
    expect(alice.locator("#count")).to_have_text("0")
    expect(bob.locator("#count")).to_have_text("-2")

    bob.get_by_label("Step").fill("5")
    bob.get_by_role("button", name="+5").click()
    expect(bob.locator("#count")).to_have_text("3")

    OUTPUT.mkdir(exist_ok=True)
    bob.screenshot(path=str(OUTPUT / "page.png"), full_page=True)
    assert alice.errors == [] and bob.errors == [], "no script errors or CSP violations"


def test_the_global_counter_is_shared_between_browsers(browser: Any, server: Server) -> None:
    from playwright.sync_api import expect

    alice, bob = open_page(browser, server), open_page(browser, server)
    start = int(alice.locator("#global").inner_text())
    alice.get_by_role("button", name="Take the next number").click()
    expect(alice.locator("#global")).to_have_text(str(start + 1))
    bob.get_by_role("button", name="Take the next number").click()
    expect(bob.locator("#global")).to_have_text(str(start + 2))
    alice.reload()
    expect(alice.locator("#global")).to_have_text(str(start + 2))


def test_the_page_works_without_javascript(browser: Any, server: Server) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, server, java_script_enabled=False)
    page.get_by_role("button", name="+1").click()
    expect(page.locator("#count")).to_have_text("1")
    assert page.url == server.url + "/", "POST, then a 303 back to the page"
    page.get_by_label("Step").fill("10")
    page.get_by_role("button", name="−1").click()  # without script the label cannot follow the step
    expect(page.locator("#count")).to_have_text("-9")
    page.get_by_role("button", name="Reset").click()
    expect(page.locator("#count")).to_have_text("0")


def test_the_page_fits_a_phone(browser: Any, server: Server) -> None:
    page = open_page(browser, server, viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, "no sideways scrolling"
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "page-phone.png"), full_page=True)
