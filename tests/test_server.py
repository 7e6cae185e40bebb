"""``specrun serve``: the real server, started as a subprocess on a free localhost port, driven by the
official ``openai`` client (and httpx for raw HTTP): chat, completions, streaming, stop strings,
seeds, usage, errors, metrics, the bounded queue, disconnects, SIGTERM, and parity with
``specrun generate``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from specrun.cli import main
from specrun_conformance.models import make_tiny_model

CONTEXT = 4096  # long enough for a generation that lasts seconds (queue, disconnect, drain tests)
MODEL_ID = "tiny-serve"
HELLO = [{"role": "user", "content": "Hello there"}]


class Server:
    def __init__(self, model: Path, log: Path, *args: str):
        self.log = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specrun", "serve", "--target", str(model), "--backend", "torch_cuda", "--drafter", "ngram", "--threads", "1",
             "--port", "0", "--log-level", "warning", *args],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.port = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"specrun serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if port is None and (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.log.read_text())):
                port = int(m.group(1))
            if port is not None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        return port
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"specrun serve did not come up in {timeout} s:\n{self.log.read_text()}")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def health(self) -> dict:
        return self.get("/health").json()

    def metric(self, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.get("/metrics").text, re.M)
        assert m, name
        return float(m.group(1))

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def serve_model(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama (the default model's tokenizer and chat template) with a 4k context."""
    return make_tiny_model(tmp_path_factory.mktemp("serve") / MODEL_ID, "llama", tokenizer_from=default_model_dir,
                           max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory):
    s = Server(serve_model, tmp_path_factory.mktemp("serve-log") / "serve.log", "--max-queue", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def busy_server(serve_model, tmp_path_factory):
    """A server that takes one request at a time and queues none (429s are deterministic)."""
    s = Server(serve_model, tmp_path_factory.mktemp("busy-log") / "serve.log", "--max-queue", "0")
    yield s
    s.stop()


def cli_generate(model: Path, prompt: str, *args: str) -> dict:
    r = CliRunner().invoke(main, ["generate", prompt, "--target", str(model), "--backend", "torch_cuda", "--drafter", "ngram", "--threads", "1",
                                  "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def ext(obj) -> dict:
    return obj.model_extra["specrun"]


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


# ------------------------------------------------------------------------------------------ basics


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert server.client().models.retrieve(MODEL_ID).id == MODEL_ID
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL_ID and h["max_queue"] == 16
    assert (h["backend"], h["device"], h["precision"], h["drafter"]) == ("torch_cuda", "cpu", "f32", "ngram")
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)


def test_chat_equals_generate(server, serve_model):
    r = server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=24,
                                                 extra_body={"return_token_ids": True})
    ref = cli_generate(serve_model, "Hello there", "-n", "24")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"]
    assert ext(r)["token_ids"] == ref["token_ids"]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == len(ref["token_ids"]) == 24
    assert r.usage.prompt_tokens == ref["stats"]["prompt_tokens"] == len(ext(r)["prompt_token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    st = ext(r)
    assert st["acceptance_length"] >= 1.0 and st["target_calls"] >= 1 and st["tokens_per_second"] > 0
    assert (st["backend"], st["device"], st["precision"], st["drafter"]) == ("torch_cuda", "cpu", "f32", "ngram")
    assert r.model == MODEL_ID and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_completion_is_raw_generate(server, serve_model):
    r = server.client().completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=20,
                                           extra_body={"return_token_ids": True})
    ref = cli_generate(serve_model, "Once upon a time", "-n", "20", "--raw")
    assert r.choices[0].text == ref["text"]
    assert ext(r)["token_ids"] == ref["token_ids"]
    assert r.usage.prompt_tokens == ref["stats"]["prompt_tokens"]
    # a prompt given as token ids is taken as is; a missing model is fine
    again = server.post("/v1/completions", json={"prompt": ext(r)["prompt_token_ids"], "max_tokens": 20}).json()
    assert again["choices"][0]["text"] == ref["text"]


def test_multi_turn_chat_uses_the_chat_template(server, serve_model):
    from specrun.pipeline import load_tokenizer

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    r = server.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4,
                                                 extra_body={"return_token_ids": True})
    tok = load_tokenizer(serve_model)
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "You are terse." in text and "And now?" in text
    assert ext(r)["prompt_token_ids"] == tok.encode(text, add_special_tokens=False)
    # text content parts are joined; developer turns are system turns
    parts = [{"role": "developer", "content": "You are terse."},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r2 = server.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 2, "return_token_ids": True}).json()
    expect = tok.apply_chat_template([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
                                     add_generation_prompt=True)
    assert r2["specrun"]["prompt_token_ids"] == tok.encode(expect, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ streaming


def test_chat_stream_equals_non_streamed(server):
    c = server.client()
    full = c.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=40)
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert ext(finish[0])["stop_reason"] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)


def test_completion_stream_ends_with_done(server):
    full = server.client().completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=16)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 16, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    assert all(ch["object"] == "text_completion" for ch in chunks)


# ------------------------------------------------------------------------------------------ stop, seeds


def test_stop_strings(server, serve_model):
    c = server.client()
    base = c.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=30).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    cut = base[: base.find(stop)]
    r = c.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=30, stop=[stop, "never-in-it"],
                             extra_body={"return_token_ids": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    ref = cli_generate(serve_model, "Once upon a time", "-n", "30", "--raw", "--stop", stop, "--stop", "never-in-it")
    assert ext(r)["token_ids"] == ref["token_ids"] and r.usage.completion_tokens == len(ref["token_ids"])
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=30, stop=stop, stream=True))
    assert streamed == cut


def test_seeded_sampling_is_reproducible_and_equals_generate(server, serve_model):
    c = server.client()

    def sample(seed):
        return c.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=16, temperature=0.9, top_p=0.9,
                                         seed=seed, extra_body={"top_k": 50, "return_token_ids": True})

    a, b, other = sample(4), sample(4), sample(5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert ext(a)["token_ids"] == ext(b)["token_ids"] != ext(other)["token_ids"]
    ref = cli_generate(serve_model, "Hello there", "-n", "16", "-t", "0.9", "--top-p", "0.9", "--top-k", "50",
                       "--seed", "4")
    assert ext(a)["token_ids"] == ref["token_ids"]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"extra_body": {"mirostat": 2}}, "mirostat"),
    ({"temperature": -1}, "temperature"),
    ({"extra_body": {"top_k": -3}}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_unsupported_or_invalid_fields_are_400(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, **{"max_tokens": 4, **kwargs})
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"
    assert param.split(".")[0] in e.value.message or param in ("temperature", "top_k", "max_tokens")


@pytest.mark.parametrize("kwargs, param", [({"best_of": 2}, "best_of"), ({"echo": True}, "echo"),
                                           ({"suffix": "end"}, "suffix"), ({"logprobs": 1}, "logprobs"),
                                           ({"prompt": ["a", "b"]}, "prompt")])
def test_unsupported_completion_fields_are_400(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL_ID, **{"prompt": "Hi", "max_tokens": 4, **kwargs})
    assert e.value.param == param


def test_over_long_prompt_is_400_with_the_cli_message(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL_ID, prompt="word " * (CONTEXT + 100), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert f"exceeds the model's context limit of {CONTEXT} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert e.value.code == "model_not_found" and e.value.param == "model" and MODEL_ID in e.value.message
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")
    assert server.post("/v1/chat/completions", json={"model": "", "messages": HELLO, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, status, param", [
    (b'{"messages": [', 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": "hi"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 3}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
    (b'{"messages": [{"role": "tool", "content": "hi"}]}', 400, "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', 400,
     "messages[0].content[0]"),
    (b'{"messages": [{"role": "user", "content": "   "}]}', 400, "messages"),
    (b'{"messages": []}', 400, "messages"),
    (b"{}", 400, "messages"),
])
def test_bad_requests_answer_openai_error_objects(server, body, status, param):
    r = server.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert "Traceback" not in r.text


def test_routes_and_methods_answer_error_objects(server):
    r = server.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = server.post("/health", json={})
    assert r.status_code == 405 and "error" in r.json()
    # curl -d sends a form content type: the body is still read as JSON
    r = server.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 2}',
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_metrics(server):
    server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8)
    text = server.get("/metrics").text
    assert server.get("/metrics").headers["content-type"].startswith("text/plain")
    for name in ("specrun_requests_total", "specrun_generated_tokens_total", "specrun_prompt_tokens_total",
                 "specrun_queue_depth", "specrun_requests_running", "specrun_acceptance_length_bucket",
                 "specrun_tokens_per_second_bucket", "specrun_time_to_first_token_seconds_bucket",
                 "specrun_requests_cancelled_total"):
        assert name in text, name
    assert re.search(r'specrun_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text)
    assert re.search(r'specrun_requests_total\{endpoint="/v1/chat/completions",status="400"\} [1-9]', text)
    assert server.metric("specrun_generated_tokens_total") >= 8


# ------------------------------------------------------------------------------------------ one engine, many clients


def test_concurrent_streaming_clients(server):
    """32 concurrent streaming clients: each completes with the text it gets alone, or gets a clean 429."""
    prompts = ["Hello there", "Tell me a story", "What is 2+2?", "Write a haiku"]
    c = server.client()
    alone = {p: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": p}],
                                          max_tokens=16).choices[0].message.content for p in prompts}
    results: list = [None] * 32

    def client(i):
        p = prompts[i % len(prompts)]
        try:
            stream = server.client().chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": p}], max_tokens=16, stream=True)
            results[i] = (p, "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
        except Exception as exc:  # a 429 (RateLimitError) is checked below; anything else fails there
            results[i] = (p, exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    done = limited = 0
    for p, out in results:
        if isinstance(out, openai.RateLimitError):
            assert out.status_code == 429 and out.response.headers["retry-after"] == "1"
            assert out.code == "rate_limit_exceeded"
            limited += 1
        else:
            assert out == alone[p], out
            done += 1
    assert done >= 17 and done + limited == 32  # at least one running + 16 queued are served
    assert server.health()["running"] == 0 and server.health()["queued"] == 0


def test_memory_does_not_grow_over_200_requests(server):
    c = server.client()
    for _ in range(20):
        c.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4)
    before = server.rss_kb()
    for i in range(200):
        c.completions.create(model=MODEL_ID, prompt=f"Hello {i}", max_tokens=4, stream=i % 2 == 0)
    grown = server.rss_kb() - before
    assert grown < 40_000, f"RSS grew by {grown} kB over 200 requests"


def _long_stream(server: Server, max_tokens: int = CONTEXT - 64):
    return httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                        json={"model": MODEL_ID, "messages": HELLO, "max_tokens": max_tokens, "stream": True})


def _wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_is_429_and_a_disconnect_frees_the_engine(busy_server):
    s = busy_server
    alone = s.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8).choices[0].message.content
    cancelled = s.metric("specrun_requests_cancelled_total")
    generated = s.metric("specrun_generated_tokens_total")
    with _long_stream(s) as r:
        events = sse_events(r)
        next(events)  # the role chunk
        next(events)  # the first text: the engine runs this request
        assert s.health()["running"] == 1
        with pytest.raises(openai.RateLimitError) as e:
            s.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8)
        assert e.value.response.headers["retry-after"] == "1"
        raw = s.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert raw.status_code == 429 and raw.json()["error"]["type"] == "rate_limit_error"
        assert s.health()["running"] == 1  # still generating: the 429s were not a race with its end
    # the client left mid-stream: the generation stops at its next block and the next request runs clean
    _wait_for(lambda: s.health()["running"] == 0, timeout=10)
    assert s.metric("specrun_requests_cancelled_total") == cancelled + 1
    assert s.metric("specrun_generated_tokens_total") - generated < CONTEXT - 64
    again = s.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8)
    assert again.choices[0].message.content == alone


def test_non_streamed_request_of_a_client_that_left_is_cancelled(busy_server):
    s = busy_server
    cancelled = s.metric("specrun_requests_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=1.0),
                   json={"messages": HELLO, "max_tokens": CONTEXT - 64})
    _wait_for(lambda: s.health()["running"] == 0, timeout=10)
    assert s.metric("specrun_requests_cancelled_total") == cancelled + 1
    assert s.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=4).usage.completion_tokens == 4


def test_sigterm_drains_in_flight_requests(serve_model, tmp_path):
    s = Server(serve_model, tmp_path / "serve.log", "--max-queue", "2")
    try:
        with _long_stream(s, max_tokens=600) as r:
            events = sse_events(r)
            next(events)
            next(events)
            s.proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["choices"][0]["finish_reason"] == "length" and last["specrun"]["stop_reason"] == "length"
        s.proc.wait(timeout=30)
        assert s.proc.returncode in (0, -signal.SIGTERM), s.log.read_text()
        assert "Traceback" not in s.log.read_text()
    finally:
        s.stop()


def test_port_in_use_is_one_line_error(serve_model, server):
    r = subprocess.run([sys.executable, "-m", "specrun", "serve", "--target", str(serve_model), "--port",
                        str(server.port)], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("specrun: error: cannot listen on 127.0.0.1:") and "Traceback" not in r.stderr


def test_bad_target_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "specrun", "serve", "--target", str(tmp_path / "nope"), "--port", "0"],
                       capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("specrun: error: model") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ the default model


@pytest.mark.slow
def test_default_model_server_equals_generate(default_model_dir, tmp_path):
    s = Server(default_model_dir, tmp_path / "serve.log", "--served-model-name", "smollm2")
    try:
        r = s.client().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}],
                                               max_tokens=32, extra_body={"return_token_ids": True})
    finally:
        s.stop()
    ref = cli_generate(default_model_dir, "What is 2+2?", "-n", "32")
    assert ext(r)["token_ids"] == ref["token_ids"]
    assert r.choices[0].message.content == ref["text"]
