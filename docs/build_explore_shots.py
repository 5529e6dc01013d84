"""Take the explorer screenshots in docs/explore/ from a real suite, as a person would click through it.

    python docs/build_explore_shots.py SUITE_FOLDER [--out docs/explore]

Serves `gemmascope explore SUITE_FOLDER` on a free port, then in headless Chromium: the grid of SAEs,
one SAE's page, a search for "whale" and the latent it lands on (with its neighbours and co-firing
loaded), and the prompt heat-map with a cell clicked. Prints each file it writes.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import expect, sync_playwright

from gemmascope.explore.app import create_app

PROMPT = "The whale swam slowly across the cold northern ocean."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("suite", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "explore")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.suite), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def shot(name: str, full: bool = False) -> None:
            path = args.out / f"{name}.png"
            page.screenshot(path=path, full_page=full)
            print(path)

        page.goto(url + "/")
        shot("suite")
        page.locator("a.chip.sae").first.click()
        expect(page.locator("#density-hist")).to_be_visible()
        shot("sae")
        page.fill(".topsearch input", "whale")
        page.press(".topsearch input", "Enter")
        shot("search")
        hit = page.locator("#search-explanations a.fid, #search-fires a.fid").first
        hit.click()
        expect(page.locator("#neighbours-body table").first).to_be_visible(timeout=300_000)
        expect(page.locator("#cofiring-body table, #cofiring-body p").first).to_be_visible(
            timeout=300_000)  # fmt: skip
        shot("feature", full=True)
        page.goto(url + "/prompt")
        page.fill("#prompt-text", PROMPT)
        page.click("#prompt-form button")
        expect(page.locator("#prompt-heat tbody tr").first).to_be_visible(timeout=300_000)
        page.locator("#prompt-heat td.cell:not(:empty)").nth(3).click()
        shot("prompt")
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()
