"""Accessibility in the browser: labels on every control, Korean first with English on request,
keyboard-only use with a visible focus, and text contrast (WCAG 2.2 AA) as Chromium computes it."""

from __future__ import annotations

from typing import Any

from web_flows import ConsentWeb, apply_clinic, console_sign_in, portal_sign_in
from web_helpers import Browser, Keys, new_code, new_rrn

UNLABELLED = """
return [...document.querySelectorAll('input, select, textarea')]
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby'))
  .map(el => el.outerHTML);
"""
COLOURS = """
function background(el) {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (c && c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c;
  }
  return 'rgb(255, 255, 255)';
}
return [...document.querySelectorAll(arguments[0])]
  .filter(el => el.offsetParent !== null && el.textContent.trim())
  .map(el => [el.tagName + '.' + el.className, getComputedStyle(el).color, background(el)]);
"""


def _luminance(rgb: str) -> float:
    parts = [float(p) for p in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    channels = [c / 255 for c in parts]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground: str, background: str) -> float:
    a, b = sorted((_luminance(foreground), _luminance(background)), reverse=True)
    return (a + 0.05) / (b + 0.05)


async def check_page(browser: Browser, lang: str = "ko") -> None:
    assert await browser.attribute("html", "lang") == lang
    assert await browser.script(UNLABELLED) == [], "form controls without a label"
    selector = "p, li, a, button, label, th, td, dt, dd, h1, h2, h3, caption, legend, .badge, code"
    colours: list[list[Any]] = await browser.script(COLOURS, selector)
    assert len(colours) > 5
    poor = [(what, fg, bg, round(contrast(fg, bg), 2)) for what, fg, bg in colours if contrast(fg, bg) < 4.5]
    assert poor == [], "text below 4.5:1 contrast"


async def test_console_pages_are_labelled_korean_first_and_readable(browser: Browser, registry: Any) -> None:
    code = new_code()
    await apply_clinic(registry, code)
    await browser.open(f"{registry.url}/console/sign-in")
    await check_page(browser)
    await console_sign_in(browser, registry)
    for path in ("/console/", f"/console/institutions/{code}", "/console/directory", "/console/statistics"):
        await browser.open(f"{registry.url}{path}")
        assert browser.status == 200
        await check_page(browser)
    await browser.open(f"{registry.url}/console/directory?kind=clinic&lang=en")
    await check_page(browser, "en")
    assert await browser.text("h1") == "Participating institutions"
    await browser.open(f"{registry.url}/console/statistics")
    assert await browser.attribute("html", "lang") == "en"  # the choice is remembered
    await browser.shot("english")


async def test_portal_pages_are_labelled_korean_first_and_readable(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    await browser.open(f"{consent_web.url}/portal/sign-in")
    await check_page(browser)
    await portal_sign_in(browser, consent_web, new_rrn())
    await check_page(browser)
    await browser.submit("#give-consent")
    await check_page(browser)
    for path in ("/portal/history", "/portal/institutions?name=병원"):
        await browser.open(f"{consent_web.url}{path}")
        await check_page(browser)
    old = await browser.url()
    await browser.submit("a.lang")
    assert await browser.url() != old
    await check_page(browser, "en")
    assert await browser.text("h1") == "Find participating institutions"


async def test_the_console_works_by_keyboard_alone_with_a_visible_focus(
    browser: Browser, registry: Any
) -> None:
    await browser.open(f"{registry.url}/console/sign-in")
    await browser.keys(Keys.TAB)
    assert await browser.script("return document.activeElement.className") == "skip"
    assert await browser.script("return document.activeElement.getBoundingClientRect().left") >= 0
    for _ in range(10):
        if await browser.script("return document.activeElement.id") == "client_id":
            break
        await browser.keys(Keys.TAB)
    assert await browser.script("return document.activeElement.id") == "client_id"
    outline = await browser.script(
        "const s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.outlineWidth]"
    )
    assert outline[0] != "none"
    assert float(outline[1].removesuffix("px")) >= 2
    await browser.shot("keyboard-focus")
    await browser.keys("agency", Keys.TAB, registry.credentials["agency"])
    await browser.keys_and_wait(Keys.ENTER)
    assert browser.status == 200
    assert await browser.url() == f"{registry.url}/console/"
    # On to an institution's page and a step, still without a mouse.
    code = new_code()
    await apply_clinic(registry, code, with_sample=False)
    await browser.open(f"{registry.url}/console/institutions/{code}")
    for _ in range(30):
        if await browser.script("return document.activeElement.id") == "reason-review":
            break
        await browser.keys(Keys.TAB)
    await browser.keys("키보드로 검토 시작", Keys.TAB)
    assert await browser.script("return document.activeElement.id") == "do-review"
    await browser.keys_and_wait(Keys.ENTER)
    assert browser.status == 200
    assert await browser.text("#state") == "적합성 검토 중"
