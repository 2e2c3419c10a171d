"""The OpenAI-compatible server on the real Gemma 3 270M: completions, chat, streaming, stops, pool behaviour."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from llmopt.engine import load_model
from llmopt.engine.generate import generate
from llmopt.errors import LlmoptError
from llmopt.serve import ModelPool, create_app, discover_models

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def client(reference_model_dir):
    pool = ModelPool({"g270m": reference_model_dir, "g270m-b": reference_model_dir}, max_loaded=1)
    with TestClient(create_app(pool)) as c:
        c.pool = pool
        yield c


def _sse_events(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_and_health(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["g270m", "g270m-b"]
    assert client.get("/health").json()["status"] == "ok"


def test_completion_matches_engine_greedy(client, reference_model_dir):
    body = {"model": "g270m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    reply = client.post("/v1/completions", json=body).json()
    model = load_model(reference_model_dir)
    expected = generate(model, "The capital of France is", max_new_tokens=8)
    assert reply["choices"][0]["text"] == expected.texts[0]
    assert reply["usage"]["completion_tokens"] == len(expected.tokens[0])
    assert reply["usage"]["prompt_tokens"] == len(expected.prompt_tokens[0])


def test_chat_stream_equals_non_stream(client):
    body = {"model": "g270m", "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion"
    text = whole["choices"][0]["message"]["content"]
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(streamed.text)
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_stop_string_truncates(client):
    body = {"model": "g270m", "prompt": "One, two, three, four, five,", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full.strip()[:2]
    assert stop, "the model produced no text to stop on"
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == full[: full.find(stop)]


def test_errors_use_openai_shape(client):
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]["message"]
    assert client.post("/v1/completions", json={"model": "g270m", "prompt": "x", "max_tokens": -1}).status_code == 422
    image = {"model": "g270m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert client.post("/v1/chat/completions", json=image).status_code == 400


def test_pool_evicts_least_recently_used(client):
    client.post("/v1/models/g270m/load")
    client.post("/v1/models/g270m-b/load")
    assert client.pool.loaded() == ["g270m-b"]  # max_loaded=1


def test_hot_swap_on_changed_weights(reference_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(reference_model_dir, folder)
    pool = ModelPool({"m": folder})
    first = pool.get("m")
    assert pool.get("m") is first and pool.swaps == 0
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 10**9))  # a new file landed
    assert pool.get("m") is not first and pool.swaps == 1


def test_discover_and_bad_folders(tmp_path, reference_model_dir):
    (tmp_path / "g" / "source").mkdir(parents=True)
    shutil.copy(reference_model_dir / "config.json", tmp_path / "g" / "source")
    (tmp_path / "g" / "w4g128" / "quant").mkdir(parents=True)
    shutil.copy(reference_model_dir / "config.json", tmp_path / "g" / "w4g128" / "quant")
    assert sorted(discover_models(tmp_path)) == ["g", "g/w4g128"]
    with pytest.raises(LlmoptError, match="has no config.json"):
        ModelPool({"x": tmp_path})


def test_real_socket_round_trip(reference_model_dir):
    """uvicorn on a loopback port, spoken to over HTTP as any OpenAI client would."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ModelPool({"g": reference_model_dir})), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        body = {"model": "g", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).json()
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] <= 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)
