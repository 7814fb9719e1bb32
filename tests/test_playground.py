"""The playground page in a real browser: Debian's chromium driven by Playwright.

Each test opens its own tab (session storage is per tab) with its own project on the shared
server, pastes the credentials as a user would, and acts through the page only; the store and the
API are read afterwards to check what the page did. Screenshots of every state go to a folder
this module names (printed; ``PLAYGROUND_SCREENSHOTS_DIR`` also copies them there, e.g. ``docs/img``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import services
from conftest import SMALL, TOOL

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture(autouse=True, scope="module")
def _chromium():
    """Every test here drives Chromium: skipped without it (failed in CI, tests/services.py)."""
    services.require("Chromium")
    if not Path(CHROMIUM).exists():
        services.missing("Chromium", "Debian's chromium is not installed (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground-screenshots")
    print(f"\nplayground screenshots: {folder}")
    yield folder
    extra = os.environ.get("PLAYGROUND_SCREENSHOTS_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):  # 256-colour copies: UI screenshots, a third of the bytes
            Image.open(png).convert("RGB").quantize(256).save(Path(extra) / f"playground-{png.name}", optimize=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(30_000)
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    yield page
    page.close()
    assert not errors, errors  # no uncaught script error in any state


def sign_in(page, server, project, path: str = "/playground") -> None:
    page.goto(server.base + path)
    page.fill("#apikey", project.apikey)
    page.fill("#apisecret", project.apisecret)
    page.click("#auth-use")
    page.wait_for_selector("#auth-state:has-text('Signed in')")
    page.wait_for_selector("#f-prompt")


def fill_small(page, steps: int, size: int = 64, samples: int = 1, prompt: str = "a red fish", seed: str = "42") -> None:
    page.fill("#f-prompt", prompt)
    page.fill("#f-steps", str(steps))
    page.fill("#f-width", str(size))
    page.fill("#f-height", str(size))
    page.fill("#f-samples", str(samples))
    page.fill("#f-seed", seed)


def shot(page, folder: Path, name: str) -> None:
    """A full-page screenshot from the top (the task panel is sticky: it would sit where the page was scrolled)."""
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def status(page) -> str:
    return page.get_attribute("#status", "data-status") or ""


def until(page, js: str, timeout: float = 30) -> None:
    """Poll ``js`` (a function) in the page until it returns true. (Playwright's wait_for_function
    evaluates a string with eval, which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.time() + timeout
    while not page.evaluate(js):
        assert time.time() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def wait_status(page, wanted: str, timeout: float = 120) -> None:
    page.wait_for_selector(f"#status[data-status={wanted}]", timeout=timeout * 1000)


def test_front_page_links_to_the_playground_and_the_tool_form_is_generated(server, page, shots):
    project = server.project()
    page.goto(server.base + "/")
    page.click("text=Playground")
    assert page.url.endswith("/playground")
    page.fill("#apikey", project.apikey)
    page.fill("#apisecret", project.apisecret)
    page.click("#auth-use")
    page.wait_for_selector("#f-prompt")
    page.select_option("#tool-select", TOOL)
    page.wait_for_url(re.compile(r"/playground/wiro/text-to-image-sd-lora$"))
    # every input of Tool/Detail has a labelled control with its default filled in
    detail = server.post(project, "/v1/Tool/Detail", json={"slugowner": "wiro", "slugproject": "text-to-image-sd-lora"})
    items = detail.json()["tool"][0]["parameters"][0]["items"]
    for item in items:
        control = page.locator(f"#f-{item['id']}")
        assert control.count() == 1, item["id"]
        if item["type"] in ("number", "float", "textarea", "text"):
            assert control.input_value() == str(item["default"]), item["id"]
    assert page.input_value("#f-scheduler") == "EulerDiscreteScheduler"
    assert page.locator("#f-selectedLoraModel input:checked").evaluate_all("bs => bs.map(b => b.value)") == ["61"]
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('#tool-form input, #tool-form select, #tool-form textarea')]
        .filter(e => e.type !== 'file' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.closest('fieldset'))
        .map(e => e.id)""")
    assert unlabelled == []
    # the chosen LoRA's trigger words and its scale slider (within the catalog's min/max)
    assert page.locator("#f-selectedLoraModel-extras .chip").all_inner_texts()[:2] == ["reef-fish", "gold-fish"]
    slider = page.locator("#gs-Fish-out-of-Water-v1\\.0")
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.input_value()) == ("0", "1", "0.3")
    page.locator("#f-selectedLoraModel-extras .chip").first.click()
    assert page.input_value("#f-prompt").startswith("reef-fish, ")
    page.check("#f-selectedLoraModel-1")  # a second LoRA brings its own slider
    assert page.locator("#f-selectedLoraModel-extras input[type=range]").count() == 2
    shot(page, shots, "form")
    # the key stays in this tab's session storage, never in local storage or cookies
    stored = json.loads(page.evaluate("sessionStorage.getItem('easel.playground.credentials')"))
    assert stored["key"] == project.apikey
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    assert project.apisecret not in page.inner_text("body")


def test_run_shows_live_progress_previews_and_outputs_with_png_parameters(server, page, shots):
    project = server.project()
    sign_in(page, server, project, "/playground/wiro/text-to-image-sd-lora")
    fill_small(page, steps=10, size=128, samples=2, prompt="a red fish in a bowl", seed="7")
    # every value the percentage shows, however fast the run (a MutationObserver, installed over CDP)
    page.evaluate("""() => { window.seenPct = [];
        new MutationObserver(() => window.seenPct.push(document.querySelector('#pct').textContent))
          .observe(document.querySelector('#pct'), {childList: true, characterData: true, subtree: true}); }""")
    page.click("#run")
    midway = False
    deadline = time.time() + 180
    while time.time() < deadline and status(page) != "task_postprocess_end":
        pct = int(page.inner_text("#pct").split()[0])
        if 0 < pct < 100 and not midway and page.is_visible("#preview-box"):
            shot(page, shots, "running")
            midway = True
        time.sleep(0.05)
    assert status(page) == "task_postprocess_end", page.inner_text("#status")
    assert page.inner_text("#pct") == "100 %" and page.inner_text("#step") == "10/10"
    seen = [int(t.split()[0]) for t in page.evaluate("window.seenPct")]
    assert seen == sorted(seen) and set(seen) - {0} == set(range(10, 101, 10)), seen  # each step, in order
    assert re.fullmatch(r"[0-9.]+ it/s", page.inner_text("#speed"))
    # the latent preview came over the socket and decoded as an image
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    assert page.evaluate("document.querySelector('#preview').naturalWidth") > 0
    images = page.locator("#outputs figure.output img")
    assert images.count() == 2
    until(page, "() => [...document.querySelectorAll('#outputs img')].every(i => i.complete && i.naturalWidth === 128)")
    page.locator("#outputs details").first.click()
    page.wait_for_selector("#outputs figure.output[data-parameters]")
    text = page.locator("#outputs details pre").first.inner_text()
    assert text.startswith("a red fish in a bowl") and "Steps: 10" in text and "Seed: 7" in text
    shot(page, shots, "done")
    taskid = page.inner_text("#task-id").lstrip("#")
    task = server.detail(project, taskid)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0" and len(task["outputs"]) == 2
    assert task["parameters"]["prompt"] == "a red fish in a bowl" and task["parameters"]["steps"] == 10
    # the history lists it
    page.wait_for_selector(f"#history-list li[data-task='{taskid}'][data-status=done]")


def test_kill_while_running_and_cancel_while_queued(server, page, shots):
    project = server.project()
    sign_in(page, server, project, "/playground/wiro/text-to-image-sd-lora")
    fill_small(page, steps=150, size=256, samples=2)  # long enough to act on even on a fast machine
    page.click("#run")
    page.wait_for_selector("#status[data-status=task_output]", timeout=120_000)
    first = page.inner_text("#task-id").lstrip("#")
    assert page.is_enabled("#kill") and not page.is_enabled("#cancel")
    # a second run waits behind the first (one worker): Cancel is offered while it is queued
    page.click("#run")
    until(page, f"() => document.querySelector('#task-id').textContent !== '#{first}'")
    wait_status(page, "task_queue")
    second = page.inner_text("#task-id").lstrip("#")
    assert page.is_enabled("#cancel")
    shot(page, shots, "queued")
    page.click("#cancel")
    wait_status(page, "task_cancel")
    assert server.detail(project, second)["status"] == "task_cancel"
    # follow the first again from the history and kill it
    page.click(f"#history-list li[data-task='{first}'] button:has-text('Follow')")
    page.wait_for_selector("#status[data-status=task_output]")
    shot(page, shots, "killing")
    page.click("#kill")
    page.wait_for_selector("#status:has-text('Killed while running')", timeout=120_000)
    shot(page, shots, "killed")
    task = server.detail(project, first)
    assert task["status"] == "task_cancel" and task["pexit"] == "0" and task["accepttime"] != "0"
    assert int(task["progress"]["stepCurrent"]) < 150


def test_copy_as_curl_runs_and_creates_the_task_copy_as_python_compiles(server, page, shots):
    project = server.project()
    sign_in(page, server, project, "/playground/wiro/text-to-image-sd-lora")
    fill_small(page, steps=3, prompt="a curl'd \"quoted\" fish")
    page.click("#copy-curl")
    page.wait_for_selector("#snippet-box:not([hidden])")
    command = page.input_value("#snippet")
    shot(page, shots, "copy-curl")
    assert command.startswith("curl ") and project.apisecret not in command
    assert f"x-api-key: {project.apikey}" in command and "x-signature: " in command
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout)
    assert answer["result"] is True, answer
    task = server.wait(project, answer["taskid"])
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["parameters"]["prompt"] == "a curl'd \"quoted\" fish"
    assert task["parameters"]["selectedLoraModel"] == ["61"] and task["parameters"]["Fish-out-of-Water-v1.0"] == 0.3
    page.click("#copy-python")
    code = page.input_value("#snippet")
    assert project.apisecret not in code and 'os.environ["EASEL_API_SECRET"]' in code
    compile(code, "snippet.py", "exec")
    assert "\"prompt\": \"a curl'd \\\"quoted\\\" fish\"" in code


def test_api_key_project_needs_no_secret(server, page):
    project = server.project("apikey")
    page.goto(server.base + "/playground/wiro/text-to-image-sd-lora")
    page.fill("#apikey", project.apikey)
    page.click("#auth-use")
    page.wait_for_selector("#auth-state:has-text('API key only')")
    fill_small(page, steps=2)
    page.click("#copy-curl")
    command = page.input_value("#snippet")
    assert "x-signature" not in command and "x-nonce" not in command
    answer = json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60).stdout)
    assert server.wait(project, answer["taskid"])["pexit"] == "0"
    page.click("#copy-python")
    code = page.input_value("#snippet")
    assert "hmac" not in code and f'API_KEY = "{project.apikey}"' in code
    compile(code, "snippet.py", "exec")


def test_history_compare_and_delete(server, page, shots):
    project = server.project()
    ids = []
    for seed in ("1", "2"):
        ids.append(server.run(project, {**SMALL, "seed": seed, "steps": 3})["taskid"])
    for taskid in ids:
        server.wait(project, taskid)
    sign_in(page, server, project, "/playground/wiro/text-to-image-sd-lora")
    page.wait_for_selector(f"#history-list li[data-task='{ids[0]}'] img")
    page.check(f"#cmp-{ids[0]}")
    page.check(f"#cmp-{ids[1]}")
    page.click("#compare")
    view = page.locator("#compare-view")
    view.wait_for(state="visible")
    assert view.locator(".side-by-side img").count() == 2
    until(page, "() => [...document.querySelectorAll('#compare-view img')].every(i => i.complete && i.naturalWidth > 0)")
    diff = view.locator("tr.diff th").all_inner_texts()
    assert diff == ["seed"]
    shot(page, shots, "compare")
    page.click(f"#history-list li[data-task='{ids[0]}'] button:has-text('Delete files')")
    page.wait_for_selector(f"#history-list li[data-task='{ids[0]}'] .noimg")
    assert server.detail(project, ids[0])["outputs"] == []
    assert server.detail(project, ids[1])["outputs"] != []


def test_phone_width_keyboard_and_both_progress_frame_shapes(server, browser, shots):
    project = server.project()
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.goto(server.base + "/playground/wiro/text-to-image-sd-lora")
        order = []  # by keyboard alone: the skip link, the two header links, then the key field
        for _ in range(4):
            page.keyboard.press("Tab")
            order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        assert order == ["Skip to the tool form", "Easel", "API reference", "apikey"]
        page.keyboard.type(project.apikey)
        page.keyboard.press("Tab")
        page.keyboard.type(project.apisecret)
        page.keyboard.press("Enter")
        page.wait_for_selector("#f-prompt")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        shot(page, shots, "phone")
        parse = page.evaluate("""() => {
            const p = window.easelPlayground;
            const info = {type: 'progressGenerate', task: 'Generate', percentage: '60', stepCurrent: '6', stepTotal: '10',
                          speed: '1.2', speedType: 'it/s', elapsedTime: '5s', remainingTime: '3s'};
            return {
              flat: p.progressOf({type: 'task_output', message: info}),
              nested: p.progressOf({type: 'task_output', message: {type: 'progressGenerate', progressGenerate: info}}),
              life: p.progressOf({type: 'task_start', message: null}),
              outputs: p.progressOf({type: 'task_postprocess_end', message: [{name: '0.png'}]}),
              top: p.previewOf({message: info, preview: 'QUJD', previewType: 'image/jpeg'}),
              inMessage: p.previewOf({message: {...info, preview: 'data:image/png;base64,QUJD'}}),
              jpeg: p.previewOf({message: null, preview: '/9j/4AAQ'}),
              none: p.previewOf({message: null}),
            };
        }""")
        assert parse["flat"]["percentage"] == "60" and parse["nested"]["stepCurrent"] == "6"
        assert parse["life"] is None and parse["outputs"] is None
        assert parse["top"] == "data:image/jpeg;base64,QUJD"
        assert parse["inMessage"] == "data:image/png;base64,QUJD"
        assert parse["jpeg"] == "data:image/jpeg;base64,/9j/4AAQ" and parse["none"] is None
        # the page signs exactly as easel.signing does (WebCrypto HMAC-SHA256)
        from easel.signing import signature

        sig = page.evaluate("([k, m]) => window.easelPlayground.hmacHex(k, m)", [project.apikey, project.apisecret + "123"])
        assert sig == signature(project.apikey, project.apisecret, "123")
    finally:
        page.close()


FILE_TYPES = {"fileinput", "multifileinput", "combinefileinput", "file", "image"}


def test_dropping_a_file_uploads_it_through_file_upload(server, page, shots):
    """Runs where a tool with a file input is available (IC-Light / InstantID, issues 10 and 11)
    and ``POST /v1/File/Upload`` exists; the real endpoint, no stand-in."""
    project = server.project()
    found = None
    for tool in server.post(project, "/v1/Tool/List", json={"limit": 200}).json()["tool"]:
        if tool.get("available") is False:
            continue
        detail = server.post(project, "/v1/Tool/Detail",
                             json={"slugowner": tool["slugowner"], "slugproject": tool["slugproject"]}).json()
        for item in detail["tool"][0]["parameters"][0]["items"]:
            if item["type"] in FILE_TYPES or (item["type"] == "text" and re.match(r"^input.*Image.*Url$", item["id"], re.I)):
                found = (tool["slugowner"], tool["slugproject"], item["id"])
                break
        if found:
            break
    probe = httpx.post(f"{server.base}/v1/File/Upload", headers=server.headers(project), timeout=30,
                       files={"file": ("probe.txt", b"probe", "text/plain")})
    if found is None or probe.status_code == 404 or not probe.json().get("result"):
        pytest.skip("no available tool with a file input, or no File/Upload endpoint, on this server yet")
    owner, slug, field = found
    sign_in(page, server, project, f"/playground/{owner}/{slug}")
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    transfer = page.evaluate_handle("""(b64) => {
        const bin = atob(b64), bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'red.png', {type: 'image/png'}));
        return dt;
    }""", base64.b64encode(buf.getvalue()).decode())
    zone = f"#f-{field} ~ .drop"
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})
    page.wait_for_selector(f"{zone}:has-text('Uploaded red.png')")
    url = page.input_value(f"#f-{field}")
    assert url.startswith("http"), url
    assert httpx.get(url, timeout=30).content == buf.getvalue()
    shot(page, shots, "upload")


def test_pages_have_a_strict_content_security_policy(server):
    r = httpx.get(server.base + "/playground/wiro/text-to-image-sd-lora", timeout=10)
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert 'data-ws-path="/v1"' in r.text and "{{" not in r.text
    js = httpx.get(server.base + "/playground/static/playground.js", timeout=10)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', r.text)  # nothing from a CDN: only this server's paths
    assert refs and all(ref.startswith(("/", "#")) for ref in refs), refs
    assert not re.search(r"^\s*import\s[^;\n]*from\s*[\"']", js.text, re.M)  # no JS module imports
    assert httpx.get(server.base + "/", timeout=10).text.count('href="/playground"') == 1
