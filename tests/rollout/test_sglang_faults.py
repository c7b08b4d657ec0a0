"""SGLang server faults: a server that is not up stops the run at start in one line (exit status 2); a server killed
mid-step fails the step clearly (or, with several servers, its requests move to one that answers), never a hang or
a traceback. The client does not restart servers it does not own: the run resumes from its last checkpoint."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guide_mega.cli import main
from guide_mega.rollout.engine import SamplingParams
from guide_mega.rollout.sglang_engine import SGLangServerEngine
from guide_mega.rollout.sglang_protocol import SGLangServerUnavailable

ROOT = Path(__file__).resolve().parents[2]
# The server prints its URL, then a line as each /generate request arrives (before its delay), so a test can kill it
# while a request is in it.
_SERVE = (
    "import sys, time\n"
    "from tests.rollout.fake_sglang import FakeSGLangServer\n"
    "server = FakeSGLangServer(delay_s=float(sys.argv[1]))\n"
    "generate = server.routes['/generate']\n"
    "def announced(body):\n"
    "    print('generating', flush=True)\n"
    "    return generate(body)\n"
    "server.routes['/generate'] = announced\n"
    "print(server.url, flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def server_process():
    """Start a fake SGLang server in its own process (so it can be killed): start(delay_s) -> (process, url)."""
    started = []

    def start(delay_s: float):
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(delay_s)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        return process, process.stdout.readline().strip()

    yield start
    for process in started:
        process.kill()
        process.wait()


def _wait_for_a_request(process) -> None:
    """Return once the server has a /generate request in hand (it printed 'generating')."""
    line = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert line == ["generating\n"], f"no /generate request reached the server within 30 s: {line}"


def _generate_in_background(engine, requests):
    outcome = {}

    def run():
        try:
            outcome["completions"] = engine.generate(requests, SamplingParams(max_new_tokens=3))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_server_killed_mid_step_fails_the_step_clearly(server_process):
    process, url = server_process(delay_s=60.0)
    engine = SGLangServerEngine(url, max_retries=2, retry_backoff_s=0.1)
    thread, outcome = _generate_in_background(engine, [[1, 2, 3]])
    _wait_for_a_request(process)  # the request is in the server, which sleeps 60 s before answering
    start = time.monotonic()
    process.send_signal(signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - start < 10
    error = outcome["error"]
    assert isinstance(error, SGLangServerUnavailable) and isinstance(error, ValueError)  # the CLI: one line, exit 2
    message = str(error)
    assert f"{url} is not reachable (/generate)" in message and "\n" not in message
    assert "this step's rollout failed: restart the server" in message


def test_with_two_servers_a_killed_ones_requests_move_to_the_other(server_process):
    doomed, doomed_url = server_process(delay_s=60.0)
    _, survivor_url = server_process(delay_s=0.05)
    engine = SGLangServerEngine([doomed_url, survivor_url], max_retries=1, retry_backoff_s=0.1, requests_per_call=1)
    thread, outcome = _generate_in_background(engine, [[k, k, k] for k in range(4)])
    _wait_for_a_request(doomed)  # killed with a request in hand, not before its share reached it
    doomed.send_signal(signal.SIGKILL)
    thread.join(timeout=30)
    assert [completion.response_ids for completion in outcome["completions"]] == [[k, k, k] for k in range(4)]
    assert {completion.metadata["engine"] for completion in outcome["completions"]} == {1}


def test_an_unreachable_server_stops_the_run_at_start_in_one_line(tmp_path, capsys):
    from guide_mega.training.distributed import destroy_parallel

    overrides = ["rollout.engine=sglang", 'rollout.sglang_urls=["http://127.0.0.1:9"]', "train.steps=1"]
    overrides.append(f"logging.run_dir={tmp_path / 'run'}")
    start = time.monotonic()
    try:
        status = main(["train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), *overrides])
    finally:
        destroy_parallel()
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith("guide-mega train: error: rollout.sglang_urls: SGLang server http://127.0.0.1:9 is")
    assert errors[0].endswith("; start the servers first")
    assert time.monotonic() - start < 60
