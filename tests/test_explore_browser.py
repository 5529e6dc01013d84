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
from test_explore_suite import COPIES, SHARED_ROW, suite_folder
from test_index import SCRIPT, build, index_config, make_assets

from gemmascope.evaluate.explanations import store_explanations
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
    assets = make_assets(tmp_path_factory.mktemp("explore-browser"))
    yield from _serve(build(assets, index_config(assets, assets["dir"] / "index.sqlite")))


@pytest.fixture(scope="module")
def suite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The explorer of a suite folder of four SAEs (see test_explore_suite), one explained."""
    suite = suite_folder(tmp_path_factory.mktemp("explore-suite-browser"))
    store_explanations(suite["cfgs"][2].out, [{"latent": 9, "explanation": "whale songs",
                                               "detection": 0.8, "fuzzing": 0.7}], "test")  # fmt: skip
    yield from _serve(suite["root"])


def _serve(source: Path) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(create_app(source), host="127.0.0.1", port=port, log_level="warning")
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
    page.goto(server + "/")  # one SAE: its page
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
        page.goto(f"{server}/sae/sae/features/{fid}")
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
    page.goto(server + "/sae/sae/fires")
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
    page.goto(server + "/sae/sae/steer?feature=3")
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


# ---------------------------------------------------------------- a suite
def test_suite_navigation_search_and_explanation(suite_server: str, page: Any, shots: Path) -> None:
    """Pick an SAE from the grid, search "whale" and land on its latent, edit its explanation."""
    expect = sync_api.expect
    page.goto(suite_server + "/")
    expect(page.locator("h1")).to_have_text("4 SAEs")
    page.screenshot(path=shots / "suite.png")
    page.locator("a.chip.sae", has_text="96").click()  # layer 1, the wider SAE
    expect(page.locator("h1")).to_contain_text("layer 1 resid_post, 96 latents")
    assert page.locator("#density-hist rect").count() > 0
    expect(page.locator("table.features tbody tr")).to_have_count(50)
    page.screenshot(path=shots / "suite-sae.png")

    page.fill(".topsearch input", "whale")
    page.press(".topsearch input", "Enter")
    hit = page.locator("#search-explanations a.fid").first
    expect(hit).to_have_text("#9")
    page.screenshot(path=shots / "suite-search.png")
    hit.click()
    expect(page.locator("h1")).to_have_text("Feature #9")
    expect(page.locator("#explanation")).to_have_text("whale songs")

    page.click("#explanation-edit")
    page.fill("#explanation-text", "humpback whale calls")
    page.click("#explanation-form button[type=submit]")
    expect(page.locator("#explanation")).to_have_text("humpback whale calls")
    page.reload()
    expect(page.locator("#explanation")).to_have_text("humpback whale calls")
    expect(page.locator("#explanation-auto")).to_contain_text("whale songs")


def test_suite_neighbours_across_widths_and_layers(suite_server: str, page: Any,
                                                   shots: Path) -> None:  # fmt: skip
    expect = sync_api.expect
    page.goto(f"{suite_server}/sae/base/features/{SHARED_ROW}")
    body = page.locator("#neighbours-body")
    expect(body.locator("h3", has_text="96 latents")).to_be_visible(timeout=60_000)
    wide = body.locator("h3", has_text="96 latents").locator("xpath=following-sibling::table[1]")
    expect(wide.locator("a.fid").first).to_have_text(f"#{COPIES['wide']}")
    nxt = body.locator("h3", has_text="Next layer").locator("xpath=following-sibling::table[1]")
    expect(nxt.locator("a.fid").first).to_have_text(f"#{COPIES['next']}")
    expect(page.locator("#cofiring-body table, #cofiring-body p").first).to_be_visible(
        timeout=60_000
    )
    page.screenshot(path=shots / "suite-feature.png", full_page=True)
    nxt.locator("a.fid").first.click()
    expect(page.locator(".crumbs")).to_contain_text("layer 2")


def test_suite_prompt_heat_map_to_a_latent_and_steer(suite_server: str, page: Any,
                                                     shots: Path) -> None:  # fmt: skip
    expect = sync_api.expect
    page.goto(suite_server + "/prompt")
    page.fill("#prompt-text", f"w10 w11 {SCRIPT} w12 w13")
    page.click("#prompt-form button")
    rows = page.locator("#prompt-heat tbody tr")
    expect(rows).to_have_count(2, timeout=60_000)  # layers 1 and 2 at the narrowest width
    expect(page.locator("#prompt-heat th.tokhead").nth(3)).to_have_text(SCRIPT)
    cell = page.locator("#prompt-heat td.cell:not(:empty)").first
    cell.click()
    link = page.locator("#prompt-detail a.fid").first
    expect(link).to_be_visible()
    page.screenshot(path=shots / "suite-prompt.png", full_page=True)
    fid = link.inner_text().lstrip("#")
    link.click()
    expect(page.locator("h1")).to_have_text(f"Feature #{fid}")
    page.click("text=Steer with this feature")
    page.fill("#steer-strength", "40")
    page.fill("#steer-prompt", "w10 w11")
    page.click("#steer-form button")
    expect(page.locator("#steer-result")).to_be_visible(timeout=60_000)
    assert page.inner_text("#steer-plain") != page.inner_text("#steer-steered")
