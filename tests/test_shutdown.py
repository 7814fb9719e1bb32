"""Starting and stopping: SIGTERM on an idle server and during a task (each with its deadline),
workers that die with a killed server, the README's main command (``easel demo``) exiting 0 with
its PNG paths, the start line and the logs' shape, and progress lines without a terminal."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import SMALL, TIME_SCALE, TOOL, Server

SLOW = max(1.0, TIME_SCALE / 3)  # the deadlines below are the targets on an unloaded machine, times this
LONG_TASK = {**SMALL, "steps": 150, "width": 256, "height": 256, "samples": 4}


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out if "spawn_main" in _cmdline(int(x))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _stop_timed(srv: Server, sig=signal.SIGTERM, timeout: float = 60) -> tuple[float, int]:
    t0 = time.monotonic()
    srv.proc.send_signal(sig)
    code = srv.proc.wait(timeout)
    return time.monotonic() - t0, code


def _kill_and_time_workers(srv: Server) -> tuple[list[int], float]:
    """SIGKILL the server; its workers' pids and the seconds until the last one was gone."""
    workers = _workers_of(srv.proc.pid)
    t0 = time.monotonic()
    srv.proc.kill()
    srv.proc.wait(20)
    while time.monotonic() - t0 < 10 * SLOW and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    return workers, time.monotonic() - t0


def _log(srv: Server) -> str:
    return (srv.data_dir / "server.log").read_text()


@pytest.mark.parametrize("sig,args", [(signal.SIGTERM, ()), (signal.SIGINT, ()),
                                      (signal.SIGTERM, ("--api-processes", "2", "--workers", "0"))])
def test_an_idle_server_stops_within_2_s_and_cleanly(tmp_path, sig, args):
    # the worker polls the queue every 2 ms: a poll in flight is still "idle" in /readyz
    srv = Server(tmp_path, extra_args=args, env={"EASEL_POLL_INTERVAL": "0.002"}).start()
    try:
        srv.wait_ready()
        for _ in range(50):
            ready = httpx.get(f"{srv.base}/readyz", timeout=5).json()
            assert ready["ready"] and all(w["state"] == "idle" for w in ready["workers"]), ready
            time.sleep(0.01)
        seconds, code = _stop_timed(srv, sig)
    finally:
        srv.stop()
    log = _log(srv)
    assert code == 0, log[-3000:]
    assert seconds < 2.0 * SLOW, (seconds, log[-3000:])
    for bad in ("Traceback", "leaked semaphore", "ResourceWarning", "Error"):
        assert bad not in log, log[-3000:]


def test_an_idle_server_stops_within_2_s_while_its_worker_still_starts(tmp_path):
    """SIGTERM before the worker has imported torch: the starting worker is not waited for."""
    srv = Server(tmp_path)
    srv.start()  # /healthz answers once the worker process exists, before it is ready
    try:
        seconds, code = _stop_timed(srv)
    finally:
        srv.stop()
    assert code == 0 and seconds < 2.0 * SLOW, (seconds, _log(srv)[-3000:])


def test_sigterm_during_a_task_ends_it_after_the_grace_period(tmp_path):
    """A task that does not finish within EASEL_SHUTDOWN_GRACE_SECONDS ends as failed with the reason
    (never left in task_start/task_output), and the server exits soon after the grace period."""
    grace = 1.0
    srv = Server(tmp_path, env={"EASEL_SHUTDOWN_GRACE_SECONDS": str(grace)}).start()
    try:
        p = srv.project()
        taskid = srv.run(p, LONG_TASK)["taskid"]
        srv.wait(p, taskid, until=("task_output",))
        seconds, code = _stop_timed(srv)
    finally:
        srv.stop()
    task = srv.store.get_task(int(taskid))
    assert code == 0, _log(srv)[-3000:]
    assert task.status == "task_postprocess_end" and task.pexit == "1" and "server stopped" in task.debugerror
    # grace, then the next denoising step (or the heartbeat's 3 s in a long phase), then the exit
    assert seconds < (grace + 4.0) * SLOW, (seconds, _log(srv)[-3000:])


def test_sigterm_during_a_task_lets_it_finish_within_the_grace_period(tmp_path):
    srv = Server(tmp_path, env={"EASEL_SHUTDOWN_GRACE_SECONDS": str(120 * SLOW)}).start()
    try:
        p = srv.project()
        taskid = srv.run(p, {**SMALL, "steps": 40, "width": 128, "height": 128})["taskid"]
        srv.wait(p, taskid, until=("task_output",))
        seconds, code = _stop_timed(srv, timeout=150 * SLOW)
    finally:
        srv.stop()
    task = srv.store.get_task(int(taskid))
    assert code == 0, _log(srv)[-3000:]
    assert task.status == "task_postprocess_end" and task.pexit == "0", task.debugerror
    assert len(srv.store.outputs(task.id)) == 1


def test_workers_die_within_2_s_of_a_killed_server_and_end_their_task(tmp_path):
    srv = Server(tmp_path).start()
    try:
        p = srv.project()
        srv.wait_ready()
        taskid = srv.run(p, LONG_TASK)["taskid"]
        srv.wait(p, taskid, until=("task_output",))
        workers, seconds = _kill_and_time_workers(srv)
    finally:
        srv.stop()
    assert workers and not any(_alive(pid) for pid in workers)
    assert seconds < 2.0 * SLOW, seconds
    task = srv.store.get_task(int(taskid))
    assert task.status == "task_postprocess_end" and task.pexit == "1" and "server stopped" in task.debugerror


def test_an_idle_orphan_worker_exits_within_2_s(tmp_path):
    srv = Server(tmp_path).start()
    try:
        srv.wait_ready()
        workers, seconds = _kill_and_time_workers(srv)
    finally:
        srv.stop()
    assert workers and not any(_alive(pid) for pid in workers) and seconds < 2.0 * SLOW, seconds


def test_start_line_and_json_logs(tmp_path):
    srv = Server(tmp_path, env={"EASEL_LOG_FORMAT": "json"}).start()
    try:
        srv.wait_ready()
        p = srv.project()
        assert srv.wait(p, srv.run(p, SMALL)["taskid"])["pexit"] == "0"
        _stop_timed(srv)
    finally:
        srv.stop()
    lines = [line for line in _log(srv).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "process", "message"} <= set(r) for r in records)
    (start,) = [r["message"] for r in records if r["message"].startswith("Easel listening on")]
    for part in (f"http://127.0.0.1:{srv.port}", f"data dir {tmp_path}", "database sqlite:///", "storage local",
                 "executor local", "workers 1", "model source tiny"):
        assert part in start, start
    # no library progress bar or warning at INFO
    assert not [r for r in records if r["logger"].split(".")[0] in ("diffusers", "transformers", "py.warnings")]


def test_a_library_warning_in_a_task_is_no_task_error(tmp_path, tiny, monkeypatch):
    """Library warnings are benign for Easel's use: they go to debugoutput, not to task_error
    (which Wiro's clients show as errors)."""
    import logging
    import warnings

    from test_engine import _submit, _worker

    from easel.tasks import lifecycle as lc
    from easel.tools import sd_lora

    worker = _worker(tmp_path, tiny)
    tid = _submit(worker)
    real_prepare = sd_lora.prepare

    def prepare(inputs, ctx):
        logging.getLogger("diffusers.loaders.lora_pipeline").warning("No LoRA keys associated to CLIPTextModel found")
        warnings.warn("CLIPImageProcessor requires torchvision", UserWarning)
        return real_prepare(inputs, ctx)

    monkeypatch.setattr(sd_lora, "prepare", prepare)
    worker.run_next()
    task = worker.store.get_task(tid)
    assert task.status == lc.POSTPROCESS_END and task.pexit == "0", task.debugerror
    # (the WebSocket leaves out an empty task_error_full, as Wiro does)
    assert [e for e in worker.store.events(tid) if e.type == lc.ERROR or e.type == lc.ERROR_FULL and e.message] == []
    assert task.debugerror == ""
    assert "No LoRA keys associated to CLIPTextModel found" in task.debugoutput
    assert "UserWarning: CLIPImageProcessor requires torchvision" in task.debugoutput


def test_run_wait_prints_progress_lines_when_stdout_is_a_file(tmp_path):
    srv = Server(tmp_path).start()
    try:
        p = srv.project("apikey")
        out_file = tmp_path / "out.txt"
        env = {**os.environ, "EASEL_BASE_URL": f"{srv.base}/v1", "EASEL_API_KEY": p.apikey}
        with open(out_file, "w") as fh:
            run = subprocess.run([sys.executable, "-m", "easel", "run", TOOL, "-p", "prompt=a fish", "-p", "steps=8",
                                  "-p", "width=64", "-p", "height=64", "--wait", "--out", str(tmp_path / "o")],
                                 stdout=fh, stderr=subprocess.PIPE, text=True, env=env, timeout=300 * SLOW)
    finally:
        srv.stop()
    text = out_file.read_text()
    assert run.returncode == 0, run.stderr + text
    lines = text.splitlines()
    for phase in ("task_queue", "task_accept", "task_preprocess_start", "task_assign", "task_start",
                  "task_output Generate", "task_postprocess_end",
                  # the stepless phases, asked for on the socket (?phases=1), each with its time so far
                  r"task_queue Waiting for a worker \([\d.]+s\)", r"task_assign Loading weights \([\d.]+s\)"):
        assert any(re.match(rf"\[\s*[\d.]+ s\] {phase}", line) for line in lines), (phase, text)
    assert any(re.search(r"step \d+/8", line) for line in lines), text
    assert "\x1b[" not in text  # no terminal control sequences in a file
    assert any(line.endswith(".png") and Path(line).is_file() for line in lines), text


def test_follow_prints_a_line_per_phase_without_a_terminal(capsys):
    """Every phase a task goes through, downloads included, as the socket sends it with
    ``?phases=1``: one line each, the stepless ones under their status, with no terminal."""
    from easel.cli.follow import follow
    from easel.tasks import lifecycle as lc

    def output(**progress) -> dict:
        return {"type": "task_output", "message": {"type": "progressGenerate", **lc.phase(""), **progress}}

    frames = [{"type": "task_queue", "message": None}, output(task=lc.WAITING, elapsedTime="2.0s"),
              {"type": "task_accept"}, {"type": "task_preprocess_start"},
              output(task="Downloading", stepCurrent="2000000", stepTotal="8000000", percentage="25",
                     speed="1000000.00", speedType="B/s", remainingTime="6.0s"),
              {"type": "task_preprocess_end"}, {"type": "task_assign"}, output(task=lc.LOADING, elapsedTime="0.0s"),
              output(task=lc.LOADING, elapsedTime="5.0s"), {"type": "task_start"},
              output(task="Generate", stepCurrent="1", stepTotal="2", percentage="50", speed="1.00",
                     remainingTime="1.0s"), {"type": "task_end"}, {"type": "task_postprocess_end", "message": []}]

    class FakeClient:
        asked: dict = {}

        def events(self, tasktoken, **kwargs):
            self.asked.update(kwargs)
            yield from frames

        def detail(self, taskid):
            return {"status": "task_postprocess_end", "pexit": "0", "progress": {}}

    client = FakeClient()
    assert follow(client, "1", "token", console=None, terminal=False)["pexit"] == "0"
    assert client.asked.get("phases") is True
    lines = [re.sub(r"^\[\s*[\d.]+ s\] ", "", line) for line in capsys.readouterr().out.splitlines()]
    for expected in ("task_queue (waiting for a worker)", "task_queue Waiting for a worker (2.0s)",
                     "task_output Downloading 2.0/8.0 MB (25 %) 1.0 MB/s ETA 6.0s",
                     "task_assign Loading weights (0.0s)", "task_output Generate step 1/2 (50 %) 1.00 it/s ETA 1.0s",
                     "task_postprocess_end (done)"):
        assert expected in lines, (expected, lines)
    assert sum(line.startswith("task_assign Loading weights") for line in lines) == 1  # a repeat is no new phase


def test_demo_exits_0_and_prints_the_png_paths_and_urls(tmp_path):
    """The README's main command (``easel demo``, what scripts/demo.sh runs after set-up) as a
    newcomer runs it: a fresh directory, no server, no models yet; one tool for speed."""
    run = subprocess.run([sys.executable, "-m", "easel", "demo", "--tool", TOOL], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900 * SLOW,
                         env={**os.environ, "COLUMNS": "60"})  # a narrow terminal must not cut paths or URLs
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    outputs = re.findall(r"^  (/\S+\.png)  (http://127\.0\.0\.1:\d+/v1/File/\S+\.png)$", run.stdout, re.M)
    assert len(outputs) == 4, run.stdout  # the seed's request asks for 4 samples
    for path, url in outputs:
        data = Path(path).read_bytes()
        assert data.startswith(b"\x89PNG") and Path(path).is_relative_to(tmp_path)
    assert re.search(r"^uploaded|^wiro/text-to-image-sd-lora: the seed's request$", run.stdout, re.M)


def test_a_fresh_clone_runs_the_readme_main_command(tmp_path):
    """``bash scripts/demo.sh`` in a fresh ``git clone`` of this checkout's HEAD, as a newcomer runs
    it: its own ``.venv`` built by ``scripts/setup.sh`` (offline wheels), then ``easel demo``; one
    tool for speed. It must exit 0 and print every PNG's whole path (inside the clone) and URL."""
    root = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "easel"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(root), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    run = subprocess.run(["bash", "scripts/demo.sh", "--tool", TOOL], cwd=clone, capture_output=True, text=True,
                         timeout=1800 * SLOW, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    outputs = re.findall(r"^  (/\S+\.png)  (http://127\.0\.0\.1:\d+/v1/File/\S+\.png)$", run.stdout, re.M)
    assert len(outputs) == 4, run.stdout  # the seed's request asks for 4 samples
    for path, _url in outputs:
        assert Path(path).is_relative_to(clone / ".easel-demo"), path
        assert Path(path).read_bytes().startswith(b"\x89PNG")
    assert (clone / ".venv" / "bin" / "easel").is_file()  # it built its own environment


STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
            "time.sleep(60)")


def _stubborn() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"  # its SIGTERM handler is in place
    return proc


def test_stop_process_escalates_to_sigkill_and_says_so():
    from easel.supervise import stop_process

    proc, said = _stubborn(), []
    t0 = time.monotonic()
    assert stop_process(proc, 0.5, "the stubborn server", say=said.append) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5 * SLOW
    assert said and "the stubborn server" in said[0] and "SIGKILL" in said[0]


def test_supervisor_stop_deadlines(caplog):
    """ask, grace for busy children, abort, then SIGTERM/SIGKILL: every child is gone, and those
    signalled are returned (their work must be ended by the caller)."""
    from easel.supervise import Child, Supervisor

    procs = {}

    def spawn(slot):
        procs[slot] = _stubborn() if slot == 0 else subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return Child(procs[slot], f"child-{slot}")

    sup = Supervisor(spawn, 2)
    sup.start()
    aborted = []
    t0 = time.monotonic()
    signalled = sup.stop(0.3, ask=lambda: None, abort=lambda: aborted.append(1), abort_wait=0.2,
                         busy=lambda c: c.name == "child-0")
    assert time.monotonic() - t0 < 8 * SLOW
    assert aborted == [1] and sorted(c.name for c in signalled) == ["child-0", "child-1"]
    assert procs[0].returncode == -signal.SIGKILL and procs[1].returncode == -signal.SIGTERM
    sup.check()  # stopping: nothing is restarted
    assert sup.restarts == 0


def _model_loads(srv: Server) -> float:
    text = httpx.get(f"{srv.base}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("easel_model_loads_total"))


def test_preload_warms_a_tool_before_the_first_run(tmp_path):
    """``--preload``: the worker loads the tool's pipeline before it is ready; /readyz says the tool
    is warm, and the first Run of it loads no pipeline."""
    srv = Server(tmp_path, extra_args=("--preload", TOOL)).start()
    try:
        ready = srv.wait_ready()
        assert ready["warm"] == [TOOL] and ready["workers"][0]["warm"] == [TOOL], ready
        loads = _model_loads(srv)
        assert loads >= 1
        p = srv.project()
        assert srv.wait(p, srv.run(p, SMALL)["taskid"])["pexit"] == "0"
        assert _model_loads(srv) == loads
    finally:
        srv.stop()
    assert re.search(rf"preloading {TOOL}.*\n(.*\n)*.*{TOOL} is warm", _log(srv)), _log(srv)[-3000:]


def test_preload_of_an_unknown_tool_is_a_usage_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "easel", "serve", "--data-dir", str(tmp_path), "--preload", "no/such"],
                         capture_output=True, text=True, timeout=120 * SLOW)
    assert run.returncode == 2 and "no/such" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_the_phase_shows_in_task_detail_before_the_first_step(tmp_path, tiny, monkeypatch):
    """Queued: "Waiting for a worker"; from task_assign to the first step: "Loading weights"."""
    from test_engine import _submit, _worker

    from easel.tasks import lifecycle as lc
    from easel.tools import sd_lora

    worker = _worker(tmp_path, tiny)
    tid = _submit(worker)
    view = lambda: lc.task_view(worker.store.get_task(tid), [], lambda *_: "", [])  # noqa: E731
    assert view()["progress"]["task"] == "Waiting for a worker"
    seen = []
    real_run = sd_lora.run
    monkeypatch.setattr(sd_lora, "run", lambda plan, ctx: seen.append(view()) or real_run(plan, ctx))
    worker.run_next()
    assert seen[0]["status"] == lc.ASSIGN and seen[0]["progress"]["task"] == "Loading weights"
    assert seen[0]["eta"] == ""
    assert view()["progress"]["task"] == "Generate" and view()["pexit"] == "0"
