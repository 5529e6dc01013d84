"""The explorer in headless Chromium: list, feature page, "what fires here", steering, no script injection.

Needs the `playwright` package and a Chromium: the system one (`chromium` on PATH, e.g. Debian's
package) or Playwright's own (`playwright install chromium`). Screenshots go to a temporary folder
whose path the test prints (`pytest -s`), or to `$GEMMASCOPE_SCREENSHOTS` when set.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_index import SCRIPT, build, index_config, make_assets

from gemmascope.explore.app import create_app

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need `pip install playwright`"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The explorer of a tiny index, served by uvicorn on a free localhost port in a thread."""
    import uvicorn

    assets = make_assets(tmp_path_factory.mktemp("explore-browser"))
    out = build(assets, index_config(assets, assets["dir"] / "index.sqlite"))
    port = _free_port()
    config = uvicorn.Config(create_app(out), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except sync_api.Error as err:
            pytest.skip(f"no usable Chromium (install Debian's `chromium` or run "
                        f"`playwright install chromium`): {str(err).splitlines()[0]}")  # fmt: skip
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page that records alert dialogs and script errors; both must stay empty."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.dialogs, pg.errors = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    yield pg
    assert pg.dialogs == [], "a script from the corpus ran"
    assert pg.errors == []
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(
        os.environ.get("GEMMASCOPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


def test_list_search_and_feature_page(server: str, page: Any, shots: Path) -> None:
    expect = sync_api.expect
    page.goto(server + "/")
    expect(page.locator(".count")).to_have_text("48 features")
    expect(page.locator("table.features tbody tr")).to_have_count(48)
    page.screenshot(path=shots / "list.png", full_page=False)

    page.click("th >> text=Max act")
    page.click("th >> text=Max act")  # second click: ascending
    assert "order=asc" in page.url and "sort=max_act" in page.url
    values = [float(v) for v in page.locator("tbody td.num:nth-child(3)").all_inner_texts()]
    assert values == sorted(values)

    page.fill("input[name=q]", "script")
    page.press("input[name=q]", "Enter")
    expect(page.locator(".chip", has_text=SCRIPT).first).to_be_visible()
    page.screenshot(path=shots / "search.png")

    # the feature whose top context shows the <script> token, as literal text
    page.goto(server + "/")
    for fid in range(48):
        page.goto(f"{server}/features/{fid}")
        if page.locator(".tok", has_text=SCRIPT).count():
            break
    else:
        raise AssertionError("no feature page shows the <script> token")
    expect(page.locator("h1")).to_have_text(f"Feature #{fid}")
    assert page.locator(".tok", has_text=SCRIPT).first.inner_text() == SCRIPT
    assert page.locator("svg.hist rect").count() > 0
    assert page.locator(".lens-list.top li").count() == 5
    title = page.locator(".tok.peak").first.get_attribute("title")
    assert title is not None and " · " in title  # hover shows the activation
    page.screenshot(path=shots / "feature.png", full_page=True)


def test_what_fires_here(server: str, page: Any, shots: Path) -> None:
    expect = sync_api.expect
    page.goto(server + "/fires")
    page.fill("#fires-text", f"w10 w11 {SCRIPT} w12 w13 w14")
    page.click("#fires-form button")
    expect(page.locator("#fires-tokens .tok")).to_have_count(7, timeout=60_000)
    expect(page.locator("#fires-tokens .tok").nth(3)).to_have_text(SCRIPT)
    expect(page.locator("#fires-features tbody tr").first).to_be_visible()
    page.locator("#fires-tokens .tok").nth(2).click()
    expect(page.locator("#fires-detail")).to_contain_text("fires #")
    page.locator("#fires-features tbody tr").nth(1).click()
    expect(page.locator("#fires-features tbody tr.sel")).to_have_count(1)
    page.screenshot(path=shots / "fires.png", full_page=True)
    link = page.locator("#fires-detail a").first
    fid = link.inner_text().lstrip("#")
    link.click()
    expect(page.locator("h1")).to_have_text(f"Feature #{fid}")


def test_steering(server: str, page: Any, shots: Path) -> None:
    expect = sync_api.expect
    page.goto(server + "/steer?feature=3")
    page.fill("#steer-strength", "40")
    page.fill("#steer-tokens", "8")
    page.fill("#steer-prompt", "w10 w11")
    page.click("#steer-form button")
    expect(page.locator("#steer-result")).to_be_visible(timeout=60_000)
    plain, steered = page.inner_text("#steer-plain"), page.inner_text("#steer-steered")
    assert plain and steered and plain != steered
    expect(page.locator("#steer-title")).to_have_text("Steered: feature #3 × 40")
    page.screenshot(path=shots / "steer.png", full_page=True)
    page.fill("#steer-tokens", "1000")  # over the bound: the page shows the server's message
    page.locator("#steer-tokens").evaluate("e => e.removeAttribute('max')")
    page.click("#steer-form button")
    expect(page.locator("#steer-status")).to_contain_text("max_new_tokens")
    assert len(page.errors) == 1 and "status of 422" in page.errors[0]  # the browser logs it
    page.errors.clear()
