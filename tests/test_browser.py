"""The page, in real Chromium driven by Playwright."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def test_quick_clicks_show_the_last_count_whatever_order_the_answers_come_in(browser: Any, server: Server) -> None:
    """The network may answer two quick clicks out of order: the page must still end on the newest count.

    The first click's answer is held back, as a slow network would, until the page has had time to send and
    hear back from the second click. If the page sent both at once, the first answer (-1) would arrive last
    and hide the count (-2) that the server holds.
    """
    from playwright.sync_api import expect

    page = open_page(browser, server)
    held: list[tuple[Any, Any]] = []
    seen: list[str] = []

    def slow_first_answer(route: Any) -> None:
        response = route.fetch()
        seen.append(response.text())
        if len(seen) == 1:
            held.append((route, response))
        else:
            route.fulfill(response=response)

    page.route("**/dec", slow_first_answer)
    minus = page.get_by_role("button", name="−1")
    minus.click()
    minus.click()
    page.wait_for_timeout(500)  # time for a second request to be sent and answered, if the page sent it
    route, response = held.pop()
    route.fulfill(response=response)
    expect(page.locator("#count")).to_have_text("-2")
    assert page.context.request.get(server.url + "/counter").text() == "counter is -2"
    page.reload()
    expect(page.locator("#count")).to_have_text("-2")
    assert not page.errors


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


@pytest.fixture
def other_site(server: Server) -> Iterator[str]:
    """Another site, with a link to Tally's ``/inc?by=1000``: ``localhost`` is another site than 127.0.0.1."""
    page = f'<!doctype html><title>Win a prize</title><a href="{server.url}/inc?by=1000">Claim your prize</a>'

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output clean

    site = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://localhost:{site.server_address[1]}/"
    site.shutdown()
    site.server_close()
    thread.join(5)


def test_a_link_from_another_site_changes_nothing_and_offers_a_button(
    browser: Any, server: Server, other_site: str
) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, server)
    page.get_by_role("button", name="+1").click()
    expect(page.locator("#count")).to_have_text("1")  # the visitor has a session cookie

    sent: list[dict[str, str]] = []
    page.on("request", lambda r: sent.append(r.all_headers()) if "/inc?by=1000" in r.url else None)
    page.goto(other_site)
    page.get_by_role("link", name="Claim your prize").click()
    expect(page.get_by_role("heading", name="Nothing was changed")).to_be_visible()
    assert sent and sent[0].get("sec-fetch-site") == "cross-site", "Chromium calls the link cross-site"
    assert "session=" in sent[0].get("cookie", ""), "SameSite=Lax sent the cookie: only Tally's refusal stopped it"
    assert page.context.request.get(server.url + "/counter").text() == "counter is 1"
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "cross-site-refused.png"), full_page=True)

    page.get_by_role("button", name="Add 1000 to your counter").click()
    expect(page.locator("#count")).to_have_text("1001")
    assert page.url == server.url + "/", "a same-site POST, then a 303 back to the page"
    # Chromium logs the refusal's 403 itself; anything else would be a script error or CSP violation.
    assert [e for e in page.errors if "status of 403" not in e] == []


@pytest.mark.parametrize(("typed", "plus", "minus", "after_plus"), [("5", "+5", "−5", 5), ("-5", "−5", "+5", -5)])
def test_the_buttons_say_what_they_do_whatever_step_is_typed(
    browser: Any, server: Server, typed: str, plus: str, minus: str, after_plus: int
) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, server)
    page.get_by_label("Step").fill(typed)
    expect(page.locator("#plus")).to_have_text(plus)
    expect(page.locator("#minus")).to_have_text(minus)
    page.locator("#plus").click()
    expect(page.locator("#count")).to_have_text(str(after_plus))
    page.locator("#minus").click()
    expect(page.locator("#count")).to_have_text("0")
    assert not page.errors
