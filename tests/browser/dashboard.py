"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

Run by daemon/tests/dashboard_browser.rs against a populated `bearman serve`, with one
argument: a JSON file naming the daemon's URL, the tokens, what the overview must show and
where screenshots go. Every wait is bounded (Playwright's timeouts); any failed check
raises, so the exit status is the verdict.
"""

import json
import re
import sys
import tempfile

from playwright.sync_api import expect, sync_playwright

TIMEOUT_MS = 30_000
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def log(message):
    print(f"dashboard.py: {message}", flush=True)


def browser(playwright, profile_dir):
    """A fresh Chromium profile (its own --user-data-dir), so no state leaks between users."""
    context = playwright.chromium.launch_persistent_context(
        profile_dir,
        executable_path=CHROMIUM,
        headless=True,
        args=FLAGS,
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    return context


def login(page, url, token):
    page.goto(url + "/ui/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#page[data-ready=overview]")).to_be_attached()


def ready(page, name):
    expect(page.locator(f"#page[data-ready={name}]")).to_be_attached()


def shot(page, config, name):
    path = f"{config['screenshots']}/{name}.png"
    page.screenshot(path=path, full_page=True)
    log(f"screenshot {path}")


def operator_session(playwright, config):
    url = config["url"]
    context = browser(playwright, tempfile.mkdtemp(prefix="bearman-chromium-"))
    page = context.pages[0] if context.pages else context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Script errors and console errors fail the run; a refused request's "Failed to load
    # resource" line does not (the refusals are expected, and checked where they happen).
    page.on(
        "console",
        lambda message: errors.append(message.text)
        if message.type == "error" and not message.text.startswith("Failed to load resource")
        else None,
    )

    page.goto(url + "/ui/")
    expect(page.locator("#login")).to_be_visible()
    shot(page, config, "login")
    # A wrong token is refused on the page, and no session starts.
    page.fill("#login-token", "bm_" + "0" * 64)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("invalid")

    login(page, url, config["operator"])
    expect(page.locator("#who")).to_have_text("operator (operator)")

    # Overview: the counts per state, the grid, the guards, remediations in progress.
    counts = config["counts"]
    expect(page.locator('#counts .card[data-state=total] .n')).to_have_text(str(config["total"]))
    for state, count in counts.items():
        expect(page.locator(f"#counts .card[data-state={state}] .n")).to_have_text(str(count))
    expect(page.locator("#racks .rack")).to_have_count(len(config["racks"]))
    expect(page.locator("#racks .cell")).to_have_count(config["total"])
    for rack, size in config["racks"].items():
        expect(page.locator(f'#racks .rack[data-rack="{rack}"] .cell')).to_have_count(size)
    expect(page.locator("#guards")).to_contain_text("controller")
    log("overview shows the right counts and grid")
    shot(page, config, "overview")

    # The events view, open in a second tab before the change, must show it live.
    events = context.new_page()
    events.goto(url + "/ui/#/events")
    ready(events, "events")
    # So must an overview left open.
    overview = context.new_page()
    overview.goto(url + "/ui/#/overview")
    ready(overview, "overview")

    # Node list: filter by state and rack.
    page.click("#nav a[data-page=nodes]")
    ready(page, "nodes")
    page.select_option("#filter-state", "maintenance")
    page.fill("#filter-rack", config["filter"]["rack"])
    page.click("#filter-apply")
    expect(page).to_have_url(re.compile(r"state=maintenance"))
    rows = page.locator("#node-table tr[data-uuid]")
    expect(rows).to_have_count(len(config["filter"]["hostnames"]))
    for hostname in config["filter"]["hostnames"]:
        expect(page.locator("#node-table")).to_contain_text(hostname)
    log("the node list filters by state and rack")
    shot(page, config, "nodes")
    # Search by hostname prefix (over the fleet grid).
    page.select_option("#filter-state", "")
    page.fill("#filter-rack", "")
    page.fill("#filter-q", config["target"]["hostname"])
    page.click("#filter-apply")
    expect(rows).to_have_count(1)

    # The node page, then maintenance through the confirmation dialog.
    page.click(f'#node-table a:text-is("{config["target"]["hostname"]}")')
    ready(page, "node")
    expect(page.locator("#page h1")).to_have_text(config["target"]["hostname"])
    expect(page.locator("#identity")).to_contain_text(config["target"]["uuid"])
    expect(page.locator("#bmc")).to_be_visible()
    expect(page.locator("#addresses")).to_contain_text("10.10.0.")  # its pool address
    expect(page.locator("#hardware")).to_contain_text("GiB")
    shot(page, config, "node")
    page.click("#action-maintenance-on")
    expect(page.locator("#confirm")).to_be_visible()
    shot(page, config, "confirm")
    reason = "browser test: <b>disk</b> swap"
    page.fill("#confirm-reason", reason)
    page.click("#confirm-ok")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator("#page .badge[data-state=maintenance]").first).to_be_visible()
    expect(page.locator("#action-maintenance-off")).to_be_visible()
    log("maintenance set through the dialog")
    # The reason is shown as text, never as markup.
    expect(page.locator("#identity")).to_contain_text(reason)
    assert page.locator("#identity b").count() == 0, "store text became markup"

    # The live events tab shows the event without a reload.
    row = events.locator("#events tr[data-action=maintenance_on]", has_text="disk")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("token:operator")
    log("the maintenance event appeared in the live events view")
    card = '#counts .card[data-state="{}"] .n'
    expect(overview.locator(card.format("maintenance"))).to_have_text(str(counts["maintenance"] + 1))
    expect(overview.locator(card.format("ready"))).to_have_text(str(counts["ready"] - 1))
    log("the open overview's counts followed")
    overview.close()
    shot(events, config, "events")

    # A rebuild through its dialog: the remediation list then shows it.
    rebuild = config["rebuild_target"]
    page.goto(url + f"/ui/#/node/{rebuild['uuid']}")
    expect(page.locator("#page h1")).to_have_text(rebuild["hostname"])
    page.click("#action-rebuild")
    expect(page.locator("#confirm")).to_be_visible()
    page.fill("#confirm-reason", "browser test rebuild")
    page.click("#confirm-ok")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator("#node-remediations")).to_contain_text("rebuild")
    page.click("#nav a[data-page=remediations]")
    ready(page, "remediations")
    expect(page.locator("#remediation-table")).to_contain_text(rebuild["uuid"])
    expect(page.locator("#remediation-table")).to_contain_text("browser test rebuild")
    log("a rebuild through the dialog shows in the remediation list")
    shot(page, config, "remediations")

    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert not errors, f"browser errors: {errors}"
    context.close()


def viewer_session(playwright, config):
    url = config["url"]
    context = browser(playwright, tempfile.mkdtemp(prefix="bearman-chromium-"))
    page = context.pages[0] if context.pages else context.new_page()
    login(page, url, config["viewer"])
    uuid = config["viewer_target"]["uuid"]
    page.goto(url + f"/ui/#/node/{uuid}")
    ready(page, "node")
    expect(page.locator("#actions-hidden")).to_be_visible()
    for button in ["#action-maintenance-on", "#action-maintenance-off", "#action-rebuild"]:
        expect(page.locator(button)).to_have_count(0)
    shot(page, config, "viewer-node")
    # The server is what refuses: a forced request with the session's own CSRF token.
    outcome = page.evaluate(
        """async (uuid) => {
            const session = await (await fetch('/ui/session')).json();
            const forced = await fetch('/api/v1/nodes/' + uuid + '/maintenance', {
                method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-Bearman-Csrf': session.csrf},
                body: JSON.stringify({reason: 'forced by a viewer'}),
            });
            const node = await (await fetch('/api/v1/nodes/' + uuid)).json();
            return {status: forced.status, body: await forced.json(), state: node.state};
        }""",
        uuid,
    )
    assert outcome["status"] == 403, outcome
    assert outcome["body"]["error"] == "forbidden", outcome
    assert outcome["state"] == config["viewer_target"]["state"], outcome
    log("a viewer has no action buttons and a forced request is refused (403)")
    context.close()


def main():
    with open(sys.argv[1]) as file:
        config = json.load(file)
    with sync_playwright() as playwright:
        operator_session(playwright, config)
        viewer_session(playwright, config)
    log("all checks passed")


if __name__ == "__main__":
    main()
