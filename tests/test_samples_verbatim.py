"""The seeds' and Wiro's docs' own samples, run as their readers run them (issue 21, items 1-3).

- Each seed's bash "Header Prepare" block and its curl Run command, taken from the seed's text
  and run by bash with the machine's real ``openssl`` and ``curl`` (which sends openssl's whole
  ``SHA2-256(stdin)= <hex>`` line as ``x-signature``); image inputs are uploaded first with
  File/Upload, as Wiro's files.md shows.
- code-examples.md's Python and curl polling samples, run unchanged but for the placeholders a
  user replaces (API key, base URL, the tool's slugs), until they print the task's end.
- authentication.md's Node sample: the top-level ``await`` docs/api.md warns about, and the fix
  it gives, run with ``node`` (as far as loading ``axios``, which is not installed here).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import TIME_SCALE, Server
from test_conformance import DOCS, SEED_FILES, seed_curl, seed_sections

ROOT = Path(__file__).resolve().parents[1]
WIRO = "https://api.wiro.ai"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/test.sh installs them)")


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    """A server without workers (tasks stay queued) and a signature project."""
    srv = Server(tmp_path_factory.mktemp("samples-queue"), extra_args=("--workers", "0")).start()
    yield srv, srv.project()
    srv.stop()


def header_prepare(seed: Path, apikey: str, secret: str) -> str:
    """The seed's "Header Prepare" bash block with the user's key and secret pasted in. The seed
    pages are one line each: the block's line breaks (before each comment and ``export``) are
    put back, or bash would read everything after the first ``#`` as a comment."""
    block = re.search(r"```bash (.*?) ```", seed_sections(seed)["Integration Header Prepare"], re.S).group(1)
    block = re.sub(r"\s+(?=# |export )", "\n", block)
    assert block.count("export ") == 4 and "openssl dgst -sha256 -hmac" in block
    return block.replace("{{useSelectedProjectAPIKey}}", apikey).replace("XXXXXXXXX", secret)


def curl_command(section: str, base: str) -> str:
    command = re.search(r"```bash (curl .*?;) ```", section, re.S).group(1)
    return command.replace(WIRO, base)


def bash(script: str, timeout: float = 60) -> str:
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("seed", SEED_FILES, ids=lambda p: p.stem)
def test_the_seeds_bash_recipe_with_openssl_and_curl(queue, seed):
    need("bash", "openssl", "curl")
    srv, p = queue
    sections = seed_sections(seed)
    run = sections["Run Command - Make HTTP Post Request"]
    for name in [v for v in json.loads(seed_curl(run)[2]).values()
                 if isinstance(v, str) and re.fullmatch(r"[\w.-]+\.(png|jpe?g|webp)", v)]:
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(png, format="PNG")
        up = srv.post(p, "/v1/File/Upload", files={"file": (name, png.getvalue(), "image/png")}).json()
        assert up["result"] is True, up
    header = header_prepare(seed, p.apikey, p.apisecret)
    sent = bash(header + '\necho "$SIGNATURE"')  # what curl then sends: openssl's whole line
    assert re.fullmatch(r"(SHA2-256|HMAC-SHA2?-?256)?\(stdin\)= [0-9a-f]{64}\n", sent), sent
    answer = json.loads(bash(header + "\n" + curl_command(run, srv.base)))
    assert answer["result"] is True and answer["taskid"].isdigit(), answer
    detail_section = sections["Get Task Detail - Make HTTP Post Request with Task ID"]
    detail_cmd = curl_command(detail_section, srv.base).replace(json.loads(seed_curl(detail_section)[2])["taskid"],
                                                                answer["taskid"])
    detail = json.loads(bash(header + "\n" + detail_cmd))
    assert detail["result"] is True and detail["tasklist"][0]["status"] == "task_queue", detail
    # the HMAC is still checked in full: the same recipe with a wrong secret is refused
    wrong = json.loads(bash(header_prepare(seed, p.apikey, p.apisecret + "x") + "\n" + detail_cmd))
    assert wrong["result"] is False and wrong["errors"][0]["message"] == "Project authorization is not valid."


def test_only_openssls_label_is_tolerated():
    from easel.api.auth import signature_hex

    hexd = "ab" * 32
    for sent in (hexd, f"SHA2-256(stdin)= {hexd}", f"(stdin)= {hexd}", f"HMAC-SHA256(stdin)= {hexd.upper()}\n"):
        assert signature_hex(sent) == hexd, sent
    for sent in (f"x {hexd}", f"SHA2-256(stdin)= {hexd}00", f"{hexd} (stdin)", f"SHA2-256(file)= {hexd}", hexd[:-2]):
        assert signature_hex(sent) != hexd, sent


# -- code-examples.md --------------------------------------------------------------------------------


def code_sample(language: str) -> str:
    text = (DOCS / "code-examples.md").read_text()
    section = text.split(f"### {language}\n", 1)[1]
    return re.search(r"```\w+\n(.*?)```", section, re.S).group(1)


TOOL = "wiro/text-to-image-flux-lora-fast"


def as_a_user(sample: str, server: Server, apikey: str) -> str:
    """The placeholders a reader of the page replaces, and nothing else."""
    assert sample.count("YOUR_API_KEY") == 1 and sample.count(f"{WIRO}/v1") == 1
    assert "{owner-slug}/{model-slug}" in sample
    return (sample.replace("YOUR_API_KEY", apikey).replace(f"{WIRO}/v1", f"{server.base}/v1")
            .replace("{owner-slug}/{model-slug}", TOOL))


def test_code_examples_python_sample_unchanged(server, tmp_path):
    pytest.importorskip("requests")
    p = server.project("apikey")
    script = tmp_path / "sample.py"
    script.write_text(as_a_user(code_sample("Python"), server, p.apikey))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60 * TIME_SCALE)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    taskid = re.search(r"Task ID: (\d+)", done.stdout).group(1)
    assert "Status: end" in done.stdout and "Done! Output: ['http" in done.stdout, done.stdout
    task = server.detail(p, taskid)
    assert task["status"] == "task_postprocess_end" and task["outputs"][0]["url"] in done.stdout


def test_code_examples_curl_sample_unchanged(server, tmp_path):
    need("bash", "curl", "python3")
    p = server.project("apikey")
    out = bash(as_a_user(code_sample("curl"), server, p.apikey), timeout=60 * TIME_SCALE)
    assert re.search(r"Task ID: \d+", out) and "Status: end" in out and "Done! Output:" in out, out[-2000:]


def test_the_data_object_maps_every_status():
    from easel.api.compat import simple_status

    assert simple_status("task_queue", "") == "queue"
    assert simple_status("task_start", "") == "running" and simple_status("task_output", "") == "running"
    assert simple_status("task_postprocess_end", "0") == "end"
    assert simple_status("task_postprocess_end", "1") == "error"
    assert simple_status("task_cancel", "0") == "cancel"


def test_a_failed_and_a_cancelled_task_end_the_polling_samples(queue):
    """Cancel and an unknown numeric tasktoken, as the samples would meet them."""
    srv, p = queue
    run = srv.post(p, f"/v1/Run/{TOOL}", json={"prompt": "x"}).json()
    assert run["data"] == {"taskid": run["taskid"], "socketaccesstoken": run["socketaccesstoken"]}
    detail = srv.post(p, "/v1/Task/Detail", json={"tasktoken": run["data"]["taskid"]}).json()
    assert detail["data"]["status"] == "queue" and detail["tasklist"][0]["id"] == run["taskid"]
    srv.post(p, "/v1/Task/Cancel", json={"taskid": run["taskid"]})
    detail = srv.post(p, "/v1/Task/Detail", json={"tasktoken": int(run["taskid"])}).json()
    assert detail["data"] == {"taskid": run["taskid"], "socketaccesstoken": run["socketaccesstoken"],
                              "status": "cancel", "output": []}
    missing = srv.post(p, "/v1/Task/Detail", json={"tasktoken": "999999999"}).json()
    assert missing["errors"][0]["message"] == "There is no task yet."


# -- authentication.md's Node sample ------------------------------------------------------------------


def test_the_node_samples_top_level_await_and_the_fix_docs_api_md_gives(tmp_path):
    need("node")
    text = (DOCS / "authentication.md").read_text()
    sample = re.search(r"```javascript\n(.*?)```", text, re.S).group(1)
    api_md = (ROOT / "docs" / "api.md").read_text()
    assert "top-level `await`" in api_md and "(async () => {" in api_md and "})();" in api_md
    as_printed = tmp_path / "sample.js"
    as_printed.write_text(sample)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}  # no NODE_PATH: axios is not found
    run = subprocess.run(["node", str(as_printed)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    # older Node refuses the await; newer ones run the file as an ES module, where require is undefined
    assert run.returncode != 0 and ("await is only valid in async functions" in run.stderr
                                    or "require is not defined in ES module scope" in run.stderr), run.stderr
    # the fix docs/api.md gives: the code after the require lines inside an async function; it then
    # runs up to loading axios (not installed here)
    requires, _, rest = sample.partition("\n\n")
    fixed = tmp_path / "fixed.js"
    fixed.write_text(f"{requires}\n\n(async () => {{\n{rest}}})();\n")
    run = subprocess.run(["node", str(fixed)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert "Cannot find module 'axios'" in run.stderr and "SyntaxError" not in run.stderr, run.stderr
