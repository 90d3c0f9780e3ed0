"""`sparsecraft serve` as a command: one `error:` line and exit 2 for a bad model or a taken port; a real process
that gets SIGTERM or Ctrl-C (SIGINT) while a stream is in flight finishes that stream, refuses new connections,
and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from conftest import tiny_model, tiny_tokenizer  # noqa: E402

import sparsecraft  # noqa: E402
import sparsecraft.cli  # noqa: E402
from sparsecraft.cli import serve as serve_cmd  # noqa: E402

# a server process started the way the `sparsecraft` script would, with `serve` registered as it will be
LAUNCH = ("import sys, sparsecraft.cli as c; from sparsecraft.cli import serve; c.COMMANDS['serve'] = serve; "
          "sys.exit(c.main(['serve'] + sys.argv[1:]))")


@pytest.fixture(autouse=True)
def _serve_registered(monkeypatch):
    monkeypatch.setitem(sparsecraft.cli.COMMANDS, "serve", serve_cmd)  # until cli/__init__.py registers it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_cli")
    tiny_model("llama").save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    model = sparsecraft.load(root / "base")
    sparsecraft.craft(model, sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0)
    sparsecraft.save(model, root / "pesc")
    return root / "pesc"


def test_bad_model_is_one_error_line(capsys, tmp_path):
    assert sparsecraft.cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "missing" in err[-1]
    assert sparsecraft.cli.main(["serve", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err


def test_taken_port_is_one_error_line(capsys, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert sparsecraft.cli.main(["serve", str(model_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def start(model_dir) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(model_dir), "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving NAME at http://127.0.0.1:PORT/v1 ..."
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split(" at ")[1].split()[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_the_stream_in_flight_and_exits_0(model_dir, sig):
    proc, base = start(model_dir)
    try:
        body = {"model": str(model_dir), "prompt": "drain me", "max_tokens": 60, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{base}/completions", json=body) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                proc.send_signal(sig)
                time.sleep(0.5)  # a slow reader: the stream must still be delivered in full
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in [first] + rest[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 60
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/models", timeout=5)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_started_server_answers_through_the_cli_path(model_dir):
    proc, base = start(model_dir)
    try:
        models = httpx.get(f"{base}/models", timeout=10).json()
        assert models["data"][0]["id"] == str(model_dir)
        reply = httpx.post(f"{base}/chat/completions", timeout=30, json={
            "model": str(model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}).json()
        assert reply["usage"]["completion_tokens"] <= 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
        proc.stderr.close()

