"""The registration explorer as a learner uses it: JupyterLab in a real (headless) Chromium.

Starts ``jupyter-lab`` on 127.0.0.1 (fresh settings, a token, the repository as root dir),
opens ``notebooks/03_regularisation.ipynb`` in Debian's Chromium driven by Playwright, runs
all cells from the Run menu, waits for the explorer panel, reads the Dice table, moves the
displacement-range slider with the keyboard, and checks that the Dice table and the figure
change. The server is stopped by its PID, temporary folders removed, in ``finally`` blocks.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` package
(``pip install playwright``; its wheel bundles the driver, no ``playwright install``);
``.ci/install_browser.sh`` installs both. Skips, saying why, only where either is missing.

Environment knobs: ``L2R_CHROMIUM`` (another Chromium binary), ``L2R_BROWSER_NOTEBOOK``
(drive another notebook, for development; it is served from its own folder),
``L2R_BROWSER_RUN_TIMEOUT`` (seconds allowed for running all cells, default 900).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from browser_helpers import (
    CHROMIUM_ENV_VAR,
    DEFAULT_CHROMIUM,
    JupyterLabServer,
    chromium_path,
    launch_chromium,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_regularisation.ipynb"
RUN_TIMEOUT_S = float(os.environ.get("L2R_BROWSER_RUN_TIMEOUT", "900"))
UPDATE_TIMEOUT_S = 180.0  # one recomputation after a slider move (2-core CPU, generous)
STEP_TIMEOUT_MS = 60_000  # any single page action or wait for an element

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _requirements():
    """(sync_playwright, chromium) or a skip saying what is missing."""
    chromium = chromium_path()
    if chromium is None:
        wanted = os.environ.get(CHROMIUM_ENV_VAR, DEFAULT_CHROMIUM)
        pytest.skip(
            f"no Chromium at {wanted}: install Debian's with `apt-get install chromium` "
            "or run `bash .ci/install_browser.sh`"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` Python package is missing: `pip install playwright` "
                    "(never `playwright install`; the test drives Debian's Chromium)")
    return sync_playwright, chromium


def _wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _kernel_status(page) -> str:
    """The status bar's kernel text, e.g. 'Python 3 (ipykernel) | Idle' ('' before it exists)."""
    return page.evaluate(
        """() => {
            const items = Array.from(document.querySelectorAll('.jp-StatusBar-Widget'));
            return items.map(e => e.innerText).join('\\n');
        }"""
    )


def _kernel_idle(page) -> bool:
    text = _kernel_status(page)
    return bool(re.search(r"\| Idle", text)) and "No Kernel" not in text


def _kernel_ready(page) -> bool:
    """True once the kernel is idle; accepts a "Select Kernel" dialog (default kernel) if one shows."""
    dialog = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    if dialog.count():
        dialog.first.click()
    return _kernel_idle(page)


def _prompts(page) -> list[str]:
    return page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()


def _error_outputs(page) -> str:
    texts = page.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
    ).all_inner_texts()
    return "\n---\n".join(t for t in texts if "Error" in t or "Traceback" in t)[-4000:]


def _run_all_cells(page) -> None:
    """Run > Run All Cells, as a learner would; retried once if the notebook was not ready."""
    for _attempt in range(2):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
        item = page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel",
                            has_text=re.compile(r"^Run All Cells$")).first
        item.wait_for(state="visible", timeout=STEP_TIMEOUT_MS)
        item.click()
        try:
            _wait_until(lambda: any(p.strip() != "[ ]:" for p in _prompts(page)), 30,
                        "the first cell to start running")
            return
        except AssertionError:
            page.keyboard.press("Escape")
    raise AssertionError("Run > Run All Cells did not start any cell")


def _wait_for_run_all(page, timeout_s: float) -> None:
    """Until no cell is running or queued and the kernel is idle; fail on a cell error."""

    def finished():
        prompts = _prompts(page)
        return prompts and not any("*" in p for p in prompts) and _kernel_idle(page)

    try:
        _wait_until(finished, timeout_s, "all cells of the notebook to run", interval_s=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; prompts {_prompts(page)}; errors:\n{_error_outputs(page)}") from None
    # all code cells executed (run-all stops at the first error and leaves the rest unrun)
    prompts = _prompts(page)
    unrun = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p.strip())]
    assert not unrun, f"code cells {unrun} did not run (an earlier cell failed?):\n{_error_outputs(page)}"


def _image_digest(locator) -> str:
    return hashlib.sha256(locator.screenshot(timeout=STEP_TIMEOUT_MS)).hexdigest()


def _move_slider_with_keyboard(handle) -> str:
    """Focus a noUiSlider handle and press Home (or End when already at the minimum)."""
    now = float(handle.get_attribute("aria-valuenow"))
    low = float(handle.get_attribute("aria-valuemin"))
    handle.scroll_into_view_if_needed(timeout=STEP_TIMEOUT_MS)
    handle.focus()
    key = "Home" if now > low else "End"
    handle.press(key)
    return key


def test_explorer_in_jupyterlab(tmp_path):
    sync_playwright, chromium = _requirements()
    notebook = Path(os.environ.get("L2R_BROWSER_NOTEBOOK", NOTEBOOK)).resolve()
    assert notebook.is_file(), f"{notebook} does not exist: the browser test drives notebook 03"
    root = REPO if notebook.is_relative_to(REPO) else notebook.parent
    relative = notebook.relative_to(root).as_posix()
    stored = notebook.read_bytes()

    started = time.monotonic()
    profile = Path(tempfile.mkdtemp(prefix="l2r-chromium-"))
    page = None
    try:
        with JupyterLabServer(root) as server, sync_playwright() as playwright:
            context = launch_chromium(playwright, profile, chromium)
            try:
                context.set_default_timeout(STEP_TIMEOUT_MS)
                page = context.new_page()
                page.goto(server.url(f"lab/tree/{relative}?reset"), timeout=STEP_TIMEOUT_MS)
                page.locator(".jp-NotebookPanel .jp-Notebook").first.wait_for(state="visible")
                _wait_until(lambda: _kernel_ready(page), 120, "the kernel to start")

                _run_all_cells(page)
                _wait_for_run_all(page, RUN_TIMEOUT_S)

                panel = page.locator(".l2r-explorer").first
                panel.wait_for(state="visible")
                panel.scroll_into_view_if_needed()
                status = panel.locator(".l2r-status").first
                dice = panel.locator(".l2r-dice").first
                figure = panel.locator("img.l2r-figure").first
                _wait_until(lambda: "ready" in status.inner_text(), UPDATE_TIMEOUT_S,
                            "the explorer's first result")
                figure.wait_for(state="visible")
                dice_before = dice.inner_text()
                mean_before = panel.locator(".l2r-mean-dice-after").first.inner_text()
                src_before = figure.get_attribute("src")
                digest_before = _image_digest(figure)
                assert re.search(r"\d\.\d{3}", dice_before), f"no Dice values shown: {dice_before!r}"

                handle = panel.locator(".l2r-disp-range .noUi-handle").first
                value_before = handle.get_attribute("aria-valuenow")
                key = _move_slider_with_keyboard(handle)
                _wait_until(lambda: handle.get_attribute("aria-valuenow") != value_before, 10,
                            f"the displacement-range slider to move on {key}")

                def updated():
                    return (dice.inner_text() != dice_before and "ready" in status.inner_text()
                            and figure.get_attribute("src") != src_before)

                _wait_until(updated, UPDATE_TIMEOUT_S,
                            f"the Dice table and figure to update after {key} on the slider "
                            f"(status: {status.inner_text()!r})")
                time.sleep(0.5)  # let the new image paint
                mean_after = panel.locator(".l2r-mean-dice-after").first.inner_text()
                digest_after = _image_digest(figure)
                assert dice.inner_text() != dice_before
                assert digest_after != digest_before, "the figure looks the same after the slider moved"
                print(f"disp_range {value_before} -> {handle.get_attribute('aria-valuenow')}: "
                      f"mean Dice after registration {mean_before} -> {mean_after}; "
                      f"{time.monotonic() - started:.0f} s in all")
            except BaseException:
                if page is not None:
                    try:
                        shot = tmp_path / "failure.png"
                        page.screenshot(path=str(shot), full_page=True, timeout=10_000)
                        print(f"screenshot of the failure: {shot}")
                    except Exception:  # the page may be gone; the original error matters
                        pass
                print(f"server log tail:\n{server.log(3000)}")
                raise
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert notebook.read_bytes() == stored, "running the notebook in the browser rewrote the file"
