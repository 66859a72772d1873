"""End to end: the GPU page in a real headless Chromium shows a live actor on its device.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium;
skipped with the reason where they are missing. Takes a screenshot of the page; with
``UPDATE_SCREENSHOT=1`` it replaces ``docs/gpu-allocations.png`` (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import dask_gpuresources as gr

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("bokeh")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt: chromium-driver)"
)
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "gpu-allocations.png"

# What the browser holds: one segment per holder, one background bar per device.
ROWS = """
const doc = window.Bokeh && Bokeh.documents[0];
if (!doc) return null;
const segments = doc.get_model_by_name("gpu-allocations-source");
const devices = doc.get_model_by_name("gpu-allocations-devices");
if (!segments || !devices || !devices.data.row || devices.data.row.length === 0) return null;
const s = segments.data, d = devices.data;
return {
    segments: Array.from(s.row || []).map((row, i) =>
        [row, s.device[i], s.kind[i], s.amount[i], s.key[i]]),
    devices: Array.from(d.row).map((row, i) => [row, d.device[i], d.held[i]]),
};
"""


def test_page_shows_a_live_actor_on_its_device(tmp_path):
    class Trainer:  # defined here: the worker process cannot import this test module
        def __init__(self):
            self.ids = gr.get_gpu_ids()

        def ids_(self):
            return self.ids

    info = gr.init(num_gpus=2)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(30)
    try:
        actor = gr.remote(num_gpus=1, isolation="thread")(Trainer).remote()
        (device,) = gr.get(actor.ids_.remote(), timeout=30)
        key = actor._key
        driver.get(info.dashboard_url.rsplit("/status", 1)[0] + "/gpu-allocations")
        deadline = time.monotonic() + 60
        rows = None
        while time.monotonic() < deadline:
            rows = driver.execute_script(ROWS)
            if rows and any(key in r[4] for r in rows["segments"]):
                break
            time.sleep(0.25)
        assert rows, "the page drew no bars"
        (mine,) = [r for r in rows["segments"] if key in r[4]]
        assert mine[1] == int(device) and mine[2] == "actor" and mine[3] == 1
        assert sorted(r[1] for r in rows["devices"]) == [0, 1]
        assert [r[2] for r in rows["devices"]].count(0) == 1  # the other device is free
        assert "GPU" in driver.title or "Dask" in driver.title
        time.sleep(0.5)  # let the canvas paint
        target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "page.png"
        assert driver.save_screenshot(str(target))
    finally:
        driver.quit()
        gr.shutdown()
