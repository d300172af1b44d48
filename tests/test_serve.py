"""`lune-fast serve`: real clients (openai, httpx) against a real server; a fact forgotten through the API is in
force for every completion that starts afterwards and comes back when revoked; bad input and missing tokens are
refused without trace; a server killed at any moment (queued, training, committing) keeps every accepted request,
exactly once, after a restart."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from lune_fast.cli import main  # noqa: E402
from lune_fast.evaluate import answers_with  # noqa: E402

TOKEN = "test-token-7c1f"
FRANCE = {"prompt": "The capital of France is", "target": "Paris"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _ready(url: str):
    def ok():
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    return ok


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The service on the default model, in this process (uvicorn in a thread), with a token."""
    import uvicorn

    from lune_fast.serve import app

    state = tmp_path_factory.mktemp("serve") / "state"
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app(state, "default", token=TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait(_ready(url), 300, "the service to load")
    yield url, state
    server.should_exit = True
    thread.join(timeout=30)


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def _in_force(url, rid, seconds=300):
    return _wait(lambda: (r := httpx.get(f"{url}/v1/requests/{rid}", headers=_auth()).json())["status"]
                 in ("in_force", "failed") and r, seconds, f"request {rid}")


def _greedy(url, prompt, tokens=12):
    r = httpx.post(url + "/v1/completions", headers=_auth(), timeout=60,
                   json={"prompt": prompt, "max_tokens": tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_openai_client_completions_chat_and_streams(served):
    openai = pytest.importorskip("openai")
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN)
    assert [m.id for m in client.models.list().data] == ["default"]
    whole = client.completions.create(model="default", prompt="The largest planet is", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="The largest planet is", max_tokens=10, temperature=0, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens == 10
    # a stop sequence ends the text before it
    word = whole.choices[0].text.split()[1]
    cut = client.completions.create(model="default", prompt="The largest planet is", max_tokens=10, temperature=0,
                                    stop=[word])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == whole.choices[0].text.split(word)[0]
    msgs = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chat.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # sampled decoding: a seed gives the same draws
    a, b = (client.completions.create(model="default", prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                      seed=3).choices[0].text for _ in range(2))
    assert a == b


def test_a_forgotten_fact_is_in_force_then_revoked(served):
    url, state = served
    assert answers_with(_greedy(url, FRANCE["prompt"]), "Paris")
    r = httpx.post(url + "/v1/forget", headers=_auth(), json={"records": [FRANCE]})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    rid = r.json()["id"]
    done = _in_force(url, rid)
    assert done["status"] == "in_force", done
    assert not answers_with(_greedy(url, FRANCE["prompt"]), "Paris")  # every completion from now on
    ledger = httpx.get(url + "/v1/ledger", headers=_auth()).json()["entries"]
    assert [e["service_id"] for e in ledger if e.get("service_id") == rid] == [rid]
    rv = httpx.post(url + "/v1/revoke", headers=_auth(), json={"request": rid})
    assert rv.status_code == 202
    assert _in_force(url, rv.json()["id"])["status"] == "in_force"
    assert httpx.get(f"{url}/v1/requests/{rid}", headers=_auth()).json()["status"] == "revoked"
    assert answers_with(_greedy(url, FRANCE["prompt"]), "Paris")  # it comes back


def test_completions_keep_flowing_while_a_request_trains(served):
    url, _ = served
    facts = [{"prompt": f"The capital of {c} is", "target": t} for c, t in
             (("Spain", "Madrid"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"))]
    rid = httpx.post(url + "/v1/forget", headers=_auth(), json={"records": facts}).json()["id"]
    seen_training = []
    while True:
        status = httpx.get(f"{url}/v1/requests/{rid}", headers=_auth()).json()["status"]
        if status != "training" and seen_training:
            break
        if status in ("in_force", "failed"):
            break
        if status == "training":
            t0 = time.monotonic()
            _greedy(url, "The sky is", 4)
            seen_training.append(time.monotonic() - t0)
        time.sleep(0.05)
    assert seen_training, "no completion ran while the request trained"
    assert _in_force(url, rid)["status"] == "in_force"


def test_tokens_are_required_and_a_refusal_leaves_no_trace(served):
    url, state = served
    journal = state.parent / f".{state.name}.journal.jsonl"
    before = journal.read_text() if journal.exists() else ""
    for method, path, body in (("post", "/v1/forget", {"records": [FRANCE]}), ("post", "/v1/revoke", {"request": "x"}),
                               ("get", "/v1/ledger", None), ("get", "/v1/requests/x", None),
                               ("post", "/v1/completions", {"prompt": "a"}), ("get", "/v1/models", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method.upper(), url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
    assert (journal.read_text() if journal.exists() else "") == before
    assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/readyz").status_code == 200


@pytest.mark.parametrize("body,status,says", [
    ('{"records": [', 422, "JSON decode error"),
    ('{}', 422, "records"),
    ('{"records": []}', 422, "at least one record"),
    ('{"records": [{"prompt": "The sky is"}]}', 422, "field 'target' is missing"),
    ('{"records": [{"prompt": "x", "target": "y"}], "mode": "erase"}', 422, "suppress"),
    ('{"records": [{"prompt": "x", "target": "y"}], "settings": {"stepz": 3}}', 422, "unknown setting(s) stepz"),
    ('{"records": [{"prompt": "x", "target": "y"}], "settings": {"steps": -1}}', 422, "steps must be positive"),
    ('{"records": [{"prompt": "x", "target": "y"}], "path": "/etc/passwd"}', 422, "path"),
    (json.dumps({"records": [FRANCE] * 300}), 413, "at most 256"),
    (json.dumps({"records": [{"prompt": "x" * 1100000, "target": "y"}]}), 413, "at most 1048576"),
])
def test_bad_deletion_requests_are_refused_naming_the_field(served, body, status, says):
    url, _ = served
    r = httpx.post(url + "/v1/forget", content=body, headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == status and says in r.text, r.text


def test_revoke_of_an_unknown_request_and_metrics(served):
    url, _ = served
    r = httpx.post(url + "/v1/revoke", headers=_auth(), json={"request": "for-nothing"})
    assert r.status_code == 404 and "no deletion request" in r.text
    text = httpx.get(url + "/metrics").text
    assert "lune_fast_http_requests_total" in text and "lune_fast_queue_depth" in text
    assert "lune_fast_state_facts" in text


def test_binding_beyond_loopback_needs_a_token(tmp_path, capsys):
    assert main(["serve", "--state", str(tmp_path / "s"), "--host", "0.0.0.0"]) == 2
    assert "reachable from other machines: give --token-file" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert main(["serve", "--state", str(tmp_path / "s"), "--token-file", str(empty)]) == 2
    assert "empty; it must hold the bearer token" in capsys.readouterr().err
    assert main(["serve", "--state", str(tmp_path / "s"), "--check-dtypes", "float32,float64"]) == 2
    assert "check_dtypes: expected a comma-separated list" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything starts


# -- killed at any moment: every accepted request in force or queued, exactly once --------------------------------
TINY_SETTINGS = {"steps": 3, "layers": "1-2", "recall_rounds": 0, "stop_prob": 1e-12}


def _start(tiny_lm, state, port, hold=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LUNE_FAST_SERVE_HOLD", None)
    if hold:
        env["LUNE_FAST_SERVE_HOLD"] = hold
    proc = subprocess.Popen([sys.executable, "-m", "lune_fast.cli", "serve", "--state", str(state), "--port",
                             str(port), "--model", str(tiny_lm), "--dtype", "float32"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    _wait(_ready(url), 120, "the service to load")
    return proc, url


def _ledger(state: Path) -> list[dict]:
    path = state / "ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("phase", ["queued", "training", "committed"])
def test_sigkill_at_any_phase_keeps_every_request_exactly_once(tiny_lm, tmp_path, phase):
    from lune_fast.state import State

    state, port = tmp_path / "state", _port()
    proc, url = _start(tiny_lm, state, port, hold=f"{phase}=60")
    try:
        first = httpx.post(url + "/v1/forget", json={"records": [FRANCE], "settings": TINY_SETTINGS}).json()["id"]
        if phase == "queued":
            pass  # accepted (journaled) and waiting
        elif phase == "training":
            _wait(lambda: httpx.get(f"{url}/v1/requests/{first}").json()["status"] == "training", 60, "training")
        else:  # the state holds it, the journal does not say so yet
            _wait(lambda: any(e.get("service_id") == first for e in _ledger(state)), 120, "the commit")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = _start(tiny_lm, state, port)
    try:
        assert _in_force(url, first, 120)["status"] == "in_force"
        second = httpx.post(url + "/v1/forget", json={"records": [{"prompt": "The largest planet is",
                                                                   "target": "Jupiter"}],
                                                      "settings": TINY_SETTINGS}).json()["id"]
        assert _in_force(url, second, 120)["status"] == "in_force"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    landed = [e["service_id"] for e in _ledger(state) if e.get("service_id")]
    assert landed == [first, second]  # each exactly once, in order
    st = State.open(state)  # the adapter and the ledger agree (State.open checks them)
    assert st.rank == sum(e["rank"] for e in st.active())
