"""Loads `wasd serve`'s status page in Debian's headless chromium, driven by Playwright.

Usage: status_page.py BASE_URL SCREENSHOT

1. Opens BASE_URL/ and waits (10 s at most) until the services table shows basket's
   endpoint http://10.0.0.1:80 from the config provider, and the registrations table
   shows basket/one registered with a lease; prints "shown".
2. Reads a line from stdin (the test has changed appsettings.json), then waits until
   the page shows http://10.0.0.2:80 instead; prints "changed SECONDS", the time from
   the line to the change on the page.
3. Saves a full-page screenshot to SCREENSHOT and prints one line per console error or
   warning, page error and failed request ("problem ..."), then "done".
"""

import sys
import time

from playwright.sync_api import sync_playwright

base, screenshot = sys.argv[1], sys.argv[2]
problems = []

with sync_playwright() as playwright:
    # The flags keep chromium off the network this machine does not have, and let it
    # run as root in a container.
    browser = playwright.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}")
        if m.type in ("error", "warning")
        else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))

    page.goto(base + "/")
    basket = page.locator('#services tr[data-query="basket"]')
    basket.get_by_text("http://10.0.0.1:80", exact=True).wait_for(timeout=10_000)
    basket.get_by_text("config", exact=True).wait_for(timeout=1_000)
    instance = page.locator("#instances tbody tr", has_text="registered")
    instance.get_by_text("one", exact=True).wait_for(timeout=10_000)
    print("shown", flush=True)

    sys.stdin.readline()
    changed_at = time.monotonic()
    basket.get_by_text("http://10.0.0.2:80", exact=True).wait_for(timeout=10_000)
    print(f"changed {time.monotonic() - changed_at:.3f}", flush=True)

    page.screenshot(path=screenshot, full_page=True)
    browser.close()

for problem in problems:
    print("problem", problem.replace("\n", " "), flush=True)
print("done", flush=True)
