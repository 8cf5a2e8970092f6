"""The explorers in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

The test copies tutorial 6 into a temporary root, starts JupyterLab there (127.0.0.1, a free port, a
token, no browser, settings and runtime files in temporary folders), opens the notebook in Debian's
Chromium, runs every cell, then clicks a patch, moves the layer and head sliders, paints the
patching explorer's region and sorts the decomposition table, asserting on the numbers the page
shows (read from the DOM) against vit_lens's own computation in this process. Screenshots go to
``test-artifacts/widgets/`` (or ``$VIT_LENS_TEST_ARTIFACTS``).

Every wait is on page or server state, with a timeout; there are no sleeps used as synchronisation.
Where Chromium, Playwright or JupyterLab is missing, or the server or browser cannot start, the
test is skipped with the reason (``.ci/run`` installs Debian's chromium; ``playwright install`` is
never needed: the system browser is launched by path).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorials" / "06_interactive_patching.ipynb"
ARTIFACTS = Path(os.environ.get("VIT_LENS_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "widgets"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
SERVER_START_S = 60
PAGE_LOAD_MS = 60_000
NOTEBOOK_RUN_MS = 120_000
KERNEL_ROUND_TRIP_MS = 60_000
QUERY_TOKEN = 43  # patch (5, 2), on the tutorial's object


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """``(url, token)`` of a JupyterLab serving a temporary root that holds tutorial 6."""
    pytest.importorskip("jupyterlab", reason="the browser test needs jupyterlab (the test extras)")
    pytest.importorskip("anywidget", reason="the browser test needs anywidget: pip install 'vit_lens[widgets]'")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (no virtual scrolling), so the widgets exist in the DOM wherever they are
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    labconfig = tmp_path / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    # no "get Jupyter news?" toast over the page
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "HF_HUB_OFFLINE": "1",
        # the kernel shares the CI machine's cores with the test workers: one thread avoids oversubscription
        "OMP_NUM_THREADS": "1",
    }
    env.pop("JUPYTER_PATH", None)
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--expose-app-in-browser", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            # JupyterLab is a test dependency (installed by dev.py): a server that does not start is a failure.
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode} at start: {_tail(tmp_path / 'server.log')}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s: {_tail(tmp_path / 'server.log')}")
            _pause_for_server(server)
        yield url, token
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)
        log.close()


def _pause_for_server(server: subprocess.Popen) -> None:
    """Wait a quarter second for the server to exit (polling its status, not synchronising on time)."""
    try:
        server.wait(timeout=0.25)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        # Chromium is a system package, not a Python one: .ci/run installs it with apt-get; a machine without
        # it (a developer's laptop, a registry outage in CI) cannot run this test, and says so in the summary.
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extras)")
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as error:
            # The binary exists but this machine cannot start it (no user namespaces, missing shared libraries):
            # an environment limit, not a defect of the views; the reason is printed in the skip summary.
            pytest.skip(f"chromium at {chromium} did not start: {error}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def expected_patterns():
    """The tutorial's clean image and its attention patterns ``[layer, head, query, key]``, computed here."""
    import torch

    import vit_lens
    from vit_lens.toy import ToyWorld

    with torch.no_grad():
        clip = vit_lens.load_toy_clip()
        world = ToyWorld(seed=6)  # as the tutorial draws it
        scene = world.sample_scenes(1, seed=7, count="one", colour="red", size="large")[0]
        clean = world.render([scene]).images[0]
        _, cache = clip.vision.run_with_cache(clean[None])
        return torch.stack([cache["pattern", layer][0] for layer in range(4)])


READ_ATTENTION = """() => {
  const view = document.querySelector('.vl-patch-explorer');
  const cells = [...view.querySelectorAll('.vl-attention .vl-patch')];
  const cls = view.querySelector('.vl-prefix-token[data-token="0"]');
  return {
    query: view.querySelector('.vl-query').textContent,
    values: [Number(cls.getAttribute('data-value')), ...cells.map((c) => Number(c.getAttribute('data-value')))],
    selected: cells.filter((c) => c.classList.contains('vl-selected')).map((c) => Number(c.getAttribute('data-token'))),
    max: Number(view.querySelector('.vl-max').getAttribute('data-token')),
  };
}"""


def _wait_for_attention(page, expected: list[float], timeout_ms: int) -> dict:
    """Wait until the patch explorer draws ``expected`` (to 1e-5), then return what it draws."""
    page.wait_for_function(
        """(expected) => {
          const cells = document.querySelectorAll('.vl-patch-explorer .vl-attention .vl-patch');
          const cls = document.querySelector('.vl-patch-explorer .vl-prefix-token[data-token="0"]');
          if (!cls || cells.length !== expected.length - 1) return false;
          const shown = [Number(cls.getAttribute('data-value')), ...[...cells].map((c) => Number(c.getAttribute('data-value')))];
          return shown.every((v, i) => Math.abs(v - expected[i]) < 1e-5);
        }""",
        arg=expected, timeout=timeout_ms,
    )
    return page.evaluate(READ_ATTENTION)


def test_explorers_respond_in_jupyterlab(browser, jupyter_lab, expected_patterns):
    # the browser comes first: without chromium the test skips before a server is started
    url, token = jupyter_lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=PAGE_LOAD_MS)
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
        timeout=PAGE_LOAD_MS,
    )
    started = time.monotonic()
    page.evaluate("async () => { await window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    # done when every code cell has an execution count and the kernel is idle
    page.wait_for_function(
        """() => {
          const panel = window.jupyterapp.shell.currentWidget;
          const cells = panel.content.widgets.filter((c) => c.model.type === 'code');
          const kernel = panel.sessionContext.session.kernel;
          return kernel.status === 'idle' && cells.every((c) => c.model.executionCount !== null);
        }""",
        timeout=NOTEBOOK_RUN_MS,
    )
    run_s = time.monotonic() - started
    cell_errors = page.evaluate(
        """() => window.jupyterapp.shell.currentWidget.content.widgets
             .filter((c) => c.model.type === 'code')
             .flatMap((c) => c.model.toJSON().outputs.filter((o) => o.output_type === 'error'))
             .map((o) => o.ename + ': ' + o.evalue)"""
    )
    assert cell_errors == [], f"tutorial 6 raised in the browser's kernel: {cell_errors}"
    page.wait_for_selector(".vl-patch-explorer .vl-attention .vl-patch", timeout=KERNEL_ROUND_TRIP_MS)
    page.screenshot(path=str(ARTIFACTS / "01_notebook_run.png"))

    # The patch explorer opens on CLS, layer 0, head 0.
    explorer = page.locator(".vl-patch-explorer")
    explorer.scroll_into_view_if_needed()
    shown = _wait_for_attention(page, expected_patterns[0, 0, 0].tolist(), KERNEL_ROUND_TRIP_MS)
    assert shown["query"] == "query CLS, layer 0, head 0"

    # Click a patch on the object: the kernel sends back its attention rows.
    explorer.locator(f'.vl-attention .vl-patch[data-token="{QUERY_TOKEN}"]').click()
    shown = _wait_for_attention(page, expected_patterns[0, 0, QUERY_TOKEN].tolist(), KERNEL_ROUND_TRIP_MS)
    assert shown["query"] == "query P(5,2), layer 0, head 0"
    assert shown["selected"] == [QUERY_TOKEN]
    assert shown["max"] == int(expected_patterns[0, 0, QUERY_TOKEN, 1:].argmax()) + 1
    explorer.screenshot(path=str(ARTIFACTS / "02_patch_clicked.png"))

    # Move the layer slider one step and the head slider two: the overlay follows.
    explorer.locator("input.vl-layer").focus()
    page.keyboard.press("ArrowRight")
    explorer.locator("input.vl-head").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expected = expected_patterns[1, 2, QUERY_TOKEN]
    shown = _wait_for_attention(page, expected.tolist(), KERNEL_ROUND_TRIP_MS)
    assert shown["query"] == "query P(5,2), layer 1, head 2"
    assert explorer.locator(".vl-layer-value").text_content() == "1"
    assert explorer.locator(".vl-head-value").text_content() == "2"
    assert abs(sum(shown["values"]) - 1) < 1e-4  # a row of a softmax
    assert shown["values"] != pytest.approx(expected_patterns[0, 0, QUERY_TOKEN].tolist(), abs=1e-5)
    explorer.screenshot(path=str(ARTIFACTS / "03_slider_moved.png"))

    # The patching explorer: 4 layer grids and a 4 x 4 head map; clearing the painted region (fill
    # "mean") makes the corrupted run the clean one, which the kernel recomputes and the page shows.
    patching = page.locator(".vl-patching-explorer")
    patching.scroll_into_view_if_needed()
    assert patching.locator(".vl-position-layer").count() == 4
    assert patching.locator(".vl-head-cell").count() == 16
    assert patching.locator("select.vl-fill").input_value() == "mean"
    clean = float(patching.locator(".vl-baselines").get_attribute("data-clean"))
    corrupted = float(patching.locator(".vl-baselines").get_attribute("data-corrupted"))
    assert corrupted < clean - 0.3
    patching.screenshot(path=str(ARTIFACTS / "04_patching_painted.png"))
    patching.locator("button.vl-clear-region").click()
    page.wait_for_function(
        "() => document.querySelector('.vl-patching-explorer .vl-baselines').textContent.includes('equal')",
        timeout=KERNEL_ROUND_TRIP_MS,
    )
    baselines = patching.locator(".vl-baselines")
    assert float(baselines.get_attribute("data-corrupted")) == float(baselines.get_attribute("data-clean"))
    # paint one object patch back by pressing on it: the corrupted run differs from the clean one again
    patching.locator(f'.vl-paint .vl-patch[data-token="{QUERY_TOKEN}"]').click()
    page.wait_for_function(
        "() => !document.querySelector('.vl-patching-explorer .vl-baselines').textContent.includes('equal')",
        timeout=KERNEL_ROUND_TRIP_MS,
    )
    # one mean-filled patch of the object takes away some, not all, of what the metric reads
    assert float(baselines.get_attribute("data-corrupted")) < float(baselines.get_attribute("data-clean"))
    assert patching.locator('.vl-paint .vl-patch[fill-opacity="0.55"]').count() == 1
    patching.screenshot(path=str(ARTIFACTS / "05_patching_repainted.png"))

    # The decomposition explorer: hovering a head shows its top images; a header click sorts.
    table = page.locator(".vl-decomposition-explorer")
    table.scroll_into_view_if_needed()
    table.locator("tr.vl-head-row").first.hover()
    page.wait_for_selector(".vl-decomposition-explorer .vl-top-images img", timeout=KERNEL_ROUND_TRIP_MS)
    assert table.locator(".vl-top-images img").count() == 4
    values = [float(v) for v in table.locator("tr.vl-head-row").evaluate_all("rows => rows.map(r => r.dataset.value)")]
    assert len(values) == 16 and values == sorted(values, reverse=True)
    table.locator('th[data-sort="value"]').click()
    ascending = [float(v) for v in table.locator("tr.vl-head-row").evaluate_all("rows => rows.map(r => r.dataset.value)")]
    assert ascending == sorted(values)
    table.screenshot(path=str(ARTIFACTS / "06_decomposition.png"))
    page.screenshot(path=str(ARTIFACTS / "07_full_page.png"), full_page=True)
    assert errors == [], f"the page raised: {errors}"
    print(f"tutorial 6 ran in the browser's kernel in {run_s:.1f} s")


def test_static_page_works_without_a_kernel_or_network(browser, expected_patterns, tmp_path):
    """``to_html``'s page: opened from disk, it draws, answers clicks and sliders, and requests nothing remote."""
    import torch

    import vit_lens
    from vit_lens.toy import ToyWorld
    from vit_lens.widgets import PatchExplorer

    world = ToyWorld(seed=6)
    scene = world.sample_scenes(1, seed=7, count="one", colour="red", size="large")[0]
    with torch.no_grad():
        path = PatchExplorer(vit_lens.load_toy_clip(), world.render([scene]).images[0]).to_html(tmp_path / "patch.html")
    page = browser.new_page(viewport={"width": 900, "height": 700})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri(), timeout=PAGE_LOAD_MS)
    _wait_for_attention(page, expected_patterns[0, 0, 0].tolist(), PAGE_LOAD_MS)
    page.locator(f'.vl-attention .vl-patch[data-token="{QUERY_TOKEN}"]').click()
    page.locator("input.vl-layer").focus()
    page.keyboard.press("ArrowRight")
    shown = _wait_for_attention(page, expected_patterns[1, 0, QUERY_TOKEN].tolist(), PAGE_LOAD_MS)
    assert shown["query"] == "query P(5,2), layer 1, head 0"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "08_static_page.png"))
    remote = [url for url in requests if not url.startswith(("file:", "data:", "blob:"))]
    assert remote == [] and errors == []
