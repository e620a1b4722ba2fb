"""`llaisys-chat serve` on the session's real cluster, driven by real clients: the official `openai`
package, curl, and raw HTTP for the errors, a disconnect mid-reply and a dead rank."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

CHAT = Path(sys.executable).parent / "llaisys-chat"
KEY = "test-key-5d1f"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LONG = [{"role": "user", "content": "Write a very long, detailed essay about the history of computing."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(running_cluster):
    """The endpoint's base URL (the server runs until the module ends)."""
    port = free_port()
    process = subprocess.Popen([str(CHAT), "serve", "--port", str(port), "--api-key", KEY], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the server did not come up within 180 s"
        time.sleep(0.5)
    yield base
    process.send_signal(signal.SIGINT)
    process.wait(30)


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(server, body, key=KEY) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120)


def test_the_openai_client_gets_the_reply_the_cluster_gives(openai_client, demo_client):
    done = openai_client.chat.completions.create(model="qwen2.5-coder:0.5b", messages=QUESTION, temperature=0,
                                                 max_tokens=20)
    expected = demo_client.generate(QUESTION, max_new_tokens=20)
    assert done.choices[0].message.content == expected.text and "Paris" in expected.text
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens == expected.stats.prompt_tokens
    assert done.usage.completion_tokens == expected.stats.new_tokens
    pieces = [c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="demo", messages=QUESTION, temperature=0, max_tokens=20, stream=True) if c.choices]
    assert "".join(pieces) == expected.text
    short = openai_client.chat.completions.create(model="demo", messages=LONG, temperature=0, max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5


def test_models_and_health(openai_client, server):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids[0] == "qwen2.5-coder:0.5b" and "qwen2.5-coder:1.5b" in ids
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_curl_streams_server_sent_events_to_done(server):
    body = json.dumps({"messages": QUESTION, "temperature": 0, "max_tokens": 20, "stream": True})
    out = subprocess.run(["curl", "-sN", f"{server}/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                         timeout=120).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body, key, status, code_or_param", [
    ({"messages": QUESTION}, "wrong", 401, "invalid_api_key"),
    ({"messages": []}, KEY, 400, "messages"),
    ({"messages": QUESTION, "temperature": 5}, KEY, 400, "temperature"),
    ({"messages": QUESTION, "max_tokens": 0}, KEY, 400, "max_tokens"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, KEY, 400, "messages[0]"),
    ({"messages": QUESTION, "stop": 3}, KEY, 400, "stop"),
    ({"messages": QUESTION, "model": "gpt-4o"}, KEY, 404, "model_not_found"),
])
def test_bad_requests_get_openai_errors(server, body, key, status, code_or_param):
    response = post(server, body, key)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and code_or_param in (error["code"], error["param"])


def test_a_client_that_disconnects_stops_the_reply_on_the_ranks(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": LONG, "temperature": 0, "max_tokens": 2000, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 10:
                break
    # The server counts a request until the ranks report its end: they stopped the abandoned reply.
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/health").json()["requests"] > 0:
        assert time.monotonic() < deadline, "the abandoned 2000-token reply still runs 10 s after its client left"
        time.sleep(0.1)
    assert "Paris" in post(server, {"messages": QUESTION, "temperature": 0, "max_tokens": 20}).json()["choices"][0]["message"]["content"]


def stream_reply(server, body) -> tuple[str, float, float]:
    """A streamed completion's text, and when its first and last pieces arrived."""
    text, first, last = "", None, None
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            piece = json.loads(line[len("data: "):])["choices"][0]["delta"].get("content")
            if piece:
                text, last = text + piece, time.monotonic()
                first = first or last
    return text, first, last


def test_concurrent_requests_decode_together_and_each_gets_its_solo_reply(server):
    questions = ["Write a Python function that reverses a string.", "What is a linked list?",
                 "Explain recursion to a child.", "Name three sorting algorithms."]
    bodies = [{"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 48} for q in questions]
    bodies[3].update(temperature=0.8, seed=7)
    alone = [stream_reply(server, b)[0] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: stream_reply(server, b), bodies))
    assert [text for text, _, _ in together] == alone
    # Decoded at the same time, not in turn: every reply began before any had ended.
    assert max(first for _, first, _ in together) < min(last for _, _, last in together)


def test_a_request_that_continues_a_conversation_reuses_its_cached_prefix(openai_client):
    first = openai_client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=20)
    follow = [*QUESTION, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And of Italy?"}]
    second = openai_client.chat.completions.create(model="demo", messages=follow, temperature=0, max_tokens=20)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert "Rome" in second.choices[0].message.content


def test_the_llm_tool_talks_to_it_as_an_openai_compatible_model(server, tmp_path):
    """`llm` (simonw/llm) with the server as an extra OpenAI model, as its docs describe."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: llaisys\n  model_name: demo\n  api_base: {server}/v1\n  api_key_name: llaisys\n")
    (tmp_path / "keys.json").write_text(json.dumps({"llaisys": KEY}))
    done = subprocess.run([str(CHAT.parent / "llm"), "-m", "llaisys", "-o", "temperature", "0", "-o", "max_tokens", "20",
                           "--no-log", QUESTION[0]["content"]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLM_USER_PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_a_non_local_address_needs_a_key():
    done = subprocess.run([str(CHAT), "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--api-key" in done.stderr


def test_a_dead_rank_is_503_on_health_and_the_next_request_restarts(server, demo_client):
    """Last: it restarts the session's engines."""
    os.kill(demo_client.info()["per_rank"][1]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (health := httpx.get(f"{server}/health")).status_code != 503:
        assert time.monotonic() < deadline, "health still ok 15 s after a rank died"
        time.sleep(0.2)
    assert "died" in health.json()["reason"]
    answer = post(server, {"messages": QUESTION, "temperature": 0, "max_tokens": 20})
    assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
