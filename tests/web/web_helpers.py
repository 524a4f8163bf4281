"""Helpers of the web tests: a real headless Chromium driven by Selenium, servers under uvicorn, polling.

The services run as tasks on the test's event loop, so every WebDriver call (blocking HTTP to
chromedriver) goes through a worker thread: the loop stays free to serve the browser's requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)
SEVERANCE_HUB, SNUBH_HUB, SEVERANCE_CLINIC = "11100001", "31100002", "11301001"
PHONE = "010-1234-5678"


class Keys:
    """WebDriver key codes (selenium.webdriver.common.keys), without importing selenium at collection."""

    TAB = "\ue004"
    ENTER = "\ue007"


class RunningApp:
    """An ASGI app under a real uvicorn on a free port (tests/conftest.py's cannot be imported here)."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> RunningApp:
        self.task = asyncio.create_task(self.server.serve())
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result is not None:
            return result
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def new_rrn() -> str:
    """A patient of this test alone, drawn from uuid4 as the other suites' helpers draw theirs, not
    from the global ``random`` (Hypothesis seeds and restores it around its examples). One full run
    showed the intruder of test_another_patients_history_is_out_of_reach the history of the
    previous test's patient; the cause was not found (not reproduced in 8 runs of the module)."""
    return f"900517-1{uuid.uuid4().int % 10**6:06d}"


def new_code(prefix: str = "78") -> str:
    return f"{prefix}{uuid.uuid4().int % 10**6:06d}"


def browser_missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); see .ci/web-deps.sh"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[dev]')"
    return None


class Browser:
    """One headless Chromium with a fresh profile; async methods run WebDriver calls in a thread."""

    def __init__(self, artifacts: Path, test_name: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="hie-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        # The performance log carries the HTTP status of each page (WebDriver itself does not expose it).
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_page_load_timeout(30)
        self.artifacts = artifacts
        self.test_name = test_name
        self.status: int | None = None
        self.shots: list[Path] = []

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _read_status(self) -> None:
        for entry in self.driver.get_log("performance"):  # type: ignore[no-untyped-call]
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message.get("method") == "Network.responseReceived" and params.get("type") == "Document":
                self.status = int(params["response"]["status"])

    def _wait_loaded(self, old: Any | None) -> None:
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def gone(_driver: Any, old: Any = old) -> bool:
            # During a navigation Chromium may answer "node does not belong to the document" rather
            # than "stale element": either means the old page is gone.
            try:
                old.is_enabled()
            except WebDriverException:
                return True
            return False

        def loaded(driver: Any) -> bool:
            try:
                return bool(driver.execute_script("return document.readyState") == "complete")
            except WebDriverException:
                return False  # the document is being replaced

        wait = WebDriverWait(self.driver, 20)
        if old is not None:
            wait.until(gone)
        wait.until(loaded)
        self._read_status()

    async def open(self, url: str) -> None:
        def go() -> None:
            self.driver.get(url)
            self._wait_loaded(None)

        await self._run(go)

    async def fill(self, element_id: str, value: str) -> None:
        def type_in() -> None:
            field = self.driver.find_element("id", element_id)
            if field.tag_name == "select":
                from selenium.webdriver.support.ui import Select

                Select(field).select_by_value(value)
                return
            field.clear()
            field.send_keys(value)

        await self._run(type_in)

    async def submit(self, button_css: str) -> None:
        """Click a submit button and wait for the answer page."""

        def click() -> None:
            old = self.driver.find_element("tag name", "html")
            self.driver.find_element("css selector", button_css).click()
            self._wait_loaded(old)

        await self._run(click)

    async def keys(self, *keys: str) -> None:
        """Type into whatever has the focus (keyboard-only use)."""
        from selenium.webdriver.common.action_chains import ActionChains

        def press() -> None:
            chain = ActionChains(self.driver)
            for key in keys:
                chain.send_keys(key)
            chain.perform()

        await self._run(press)

    async def keys_and_wait(self, *keys: str) -> None:
        old = await self._run(self.driver.find_element, "tag name", "html")
        await self.keys(*keys)
        await self._run(self._wait_loaded, old)

    async def script(self, source: str, *args: Any) -> Any:
        return await self._run(self.driver.execute_script, source, *args)

    async def text(self, css: str = "body") -> str:
        return await self._run(lambda: self.driver.find_element("css selector", css).text)

    async def texts(self, css: str) -> list[str]:
        return await self._run(lambda: [e.text for e in self.driver.find_elements("css selector", css)])

    async def attribute(self, css: str, name: str) -> str | None:
        value = await self._run(lambda: self.driver.find_element("css selector", css).get_attribute(name))
        return str(value) if value is not None else None

    async def cookies(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in await self._run(self.driver.get_cookies)}

    async def url(self) -> str:
        return str(await self._run(lambda: self.driver.current_url))

    async def shot(self, name: str) -> Path:
        """A full-page screenshot in the artefacts folder."""

        def capture() -> Path:
            data = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
            )["data"]
            path = self.artifacts / f"{self.test_name}--{len(self.shots) + 1:02d}-{name}.png"
            path.write_bytes(base64.b64decode(data))
            return path

        path = await self._run(capture)
        self.shots.append(path)
        return path

    async def form_html(self, button_css: str) -> str:
        """The HTML of the button's form as filled in now (typed values frozen into the markup)."""
        source = """
            const form = document.querySelector(arguments[0]).form;
            for (const el of form.querySelectorAll('input')) el.setAttribute('value', el.value);
            for (const el of form.querySelectorAll('textarea')) el.textContent = el.value;
            for (const el of form.querySelectorAll('option'))
                el.selected ? el.setAttribute('selected', '') : el.removeAttribute('selected');
            return form.outerHTML;
        """
        return str(await self.script(source, button_css))

    async def replay_form(self, form_html: str, button_css: str) -> None:
        """Put a form that was already submitted back on the page and submit it again (a double submit:
        the same token a second time), as a browser's resend would."""
        await self.script(
            "document.querySelector('main').insertAdjacentHTML('afterbegin', arguments[0]);", form_html
        )
        await self.submit(button_css)

    async def close(self) -> None:
        await self._run(self.driver.quit)
        shutil.rmtree(self.profile, ignore_errors=True)
