"""`lune-fast serve`: deletion requests behind an authenticated HTTP API, and the model that honours them.

    lune-fast serve --state DIR [--model default] [--host 127.0.0.1] [--port 8000] [--token-file F]
    lune_fast.serve.app(state=DIR, ...)          # the same service as an ASGI app, to mount in a stack

Deletion requests (POST /v1/forget, POST /v1/revoke) are written to a journal beside the state folder and fsync'd
before the 202, then applied one at a time, in order of acceptance, by one worker thread into the lifelong state
(lune_fast.lifelong: the same code `lune-fast unlearn --into` runs, under the same lock). Each applied request's
ledger line carries its service id, so a restart after a kill anywhere (queued, training, committing) finds every
accepted request either in the state's ledger (in force) or still to do (queued), exactly once; the state folder is
swapped atomically, so it is the old one or the new one.

Completions (OpenAI's /v1/completions and /v1/chat/completions, streamed or not) run on a second copy of the
frozen model that carries only the committed state's adapter: a completion never sees an adapter in training. The
swap to a newly committed state waits for the completions in flight and blocks new ones for the moment it takes;
a request is reported in force only after it, so every completion that starts afterwards honours it.
"""

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MAX_BODY = 1 << 20  # bytes of a request body
MAX_RECORDS = 256  # records of one deletion request
MAX_TOKENS = 1024  # of one completion
PARALLEL_COMPLETIONS = 2  # generations at once (the rest wait their turn: never refused)
HOLD_ENV = "LUNE_FAST_SERVE_HOLD"  # fault injection for the kill tests: "phase=seconds" (queued|training|committed)

log = logging.getLogger("lune_fast.serve")


class ServiceError(ValueError):
    """A request the service refuses: `status` is the HTTP code, the message says what was expected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the journal: what was accepted, and what became of it ---------------------------------------------------
class Journal:
    """Append-only JSON lines beside the state folder (.<state>.journal.jsonl): {"op": "accept", ...} for each
    accepted request, then {"op": "done" | "failed", "id", ...}. Each line is written and fsync'd before it counts;
    a line torn by a kill is the last one and is ignored (its request was not acknowledged)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
        return out


class ReadWriteLock:
    """Many readers (completions) or one writer (the swap to a new state), writers first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers, self._writing, self._waiting = 0, False, 0

    @contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class Request:
    id: str
    kind: str  # forget | revoke
    status: str = "queued"  # queued | training | in_force | failed | revoked
    body: dict = field(default_factory=dict)
    ledger: str | None = None  # the state's ledger id once in force
    metrics: dict | None = None
    cost: dict | None = None
    error: str | None = None

    def public(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "status": self.status}
        if self.kind == "revoke":
            out["request"] = self.body["request"]
        for k in ("ledger", "metrics", "cost", "error"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _hold(phase: str) -> None:
    """Sleep at `phase` where the kill tests asked for it (HOLD_ENV); nothing otherwise."""
    spec = os.environ.get(HOLD_ENV, "")
    if spec.startswith(phase + "="):
        time.sleep(float(spec.split("=", 1)[1]))


# -- the service ------------------------------------------------------------------------------------------------
class Service:
    """The trainer (an Unlearner), the serving copy of the model with the committed state on it, the journal, the
    requests and the worker that applies them. load() does the slow part (in the background: /healthz answers at
    once, /readyz once it is done)."""

    def __init__(self, state: str | Path, model: str = "default", dtype: str = "auto", device: str = "cpu",
                 evaluate: bool = False, check_dtypes: str | None = None):
        self.state = Path(state).resolve()
        self.model_name, self.dtype, self.device, self.evaluate = model, dtype, device, evaluate
        self.check_dtypes = check_dtypes  # Settings.check_dtypes of every request (None: the default)
        self.journal = Journal(self.state.parent / f".{self.state.name}.journal.jsonl")
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self.todo: queue.Queue[str] = queue.Queue()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.swap = ReadWriteLock()
        self.slots = threading.Semaphore(PARALLEL_COMPLETIONS)
        self._accept = threading.Lock()  # one acceptance at a time: journal order = queue order
        self.facts = 0

    # startup ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            from . import lifelong
            from .api import Unlearner
            from .weights import load_model

            lifelong.check_folder(self.state)
            self.trainer = Unlearner(self.model_name, dtype=self.dtype, device=self.device,
                                     check_dtypes=self.check_dtypes)
            self.model = load_model(self.trainer.model_dir, dtype=self.trainer.dtype, device=self.trainer.device)
            self.tokenizer, self.encoder = self.trainer.tokenizer, self.trainer.encoder
            self._put_state_on()
            self._recover()
            threading.Thread(target=self._work, name="lune-fast-worker", daemon=True).start()
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - said by /readyz and the log, not a crash of the server
            self.load_error = f"{type(e).__name__}: {e}"
            log.error(json.dumps({"event": "load_failed", "error": self.load_error}))

    def _put_state_on(self) -> None:
        """The serving model with the committed state's adapter (none before the first request); the caller holds
        the write lock, or nothing runs yet."""
        from . import lora
        from .state import State

        lora.detach(self.model)
        if (self.state / "adapter_config.json").exists():
            st = State.open(self.state)
            tensors, config = st.adapter_files()
            lora.attach_tensors(self.model, lora.settings_from_peft(config, self.model.config.num_hidden_layers,
                                                                    str(self.state)), tensors, str(self.state))
            self.facts = st.facts
        else:
            self.facts = 0

    def _ledger(self) -> list[dict]:
        from .state import LEDGER

        path = self.state / LEDGER
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def _recover(self) -> None:
        """Requests from the journal: done or failed as it says; accepted but not done, in force if the state's
        ledger has it (killed after the commit, before the journal said so), else queued again, in order."""
        ledger = self._ledger()
        landed = {e["service_id"]: e for e in ledger if e.get("service_id")}
        active = {e["id"] for e in self._active(ledger)}
        for entry in self.journal.read():
            if entry["op"] == "accept":
                self.requests[entry["id"]] = Request(entry["id"], entry["kind"], body=entry["body"])
            elif entry["op"] in ("done", "failed") and entry["id"] in self.requests:
                r = self.requests[entry["id"]]
                r.status = "in_force" if entry["op"] == "done" else "failed"
                r.ledger, r.metrics, r.cost, r.error = (entry.get(k) for k in ("ledger", "metrics", "cost", "error"))
        for r in self.requests.values():
            if r.status == "queued" and r.id in landed:
                r.status, r.ledger = "in_force", landed[r.id]["id"]
                self.journal.append({"op": "done", "id": r.id, "ledger": r.ledger, "recovered": True})
            if r.status == "queued":
                self.todo.put(r.id)
            if r.kind == "forget" and r.status == "in_force" and r.ledger not in active:
                r.status = "revoked"

    @staticmethod
    def _active(ledger: list[dict]) -> list[dict]:
        gone = {e["request"] for e in ledger if e.get("op") == "revoke"}
        return [e for e in ledger if e.get("op") == "forget" and e["id"] not in gone]

    # accepting ------------------------------------------------------------------------------------------------
    def accept_forget(self, records: list, mode: str | None, settings: dict) -> Request:
        """Validated as a file's records are (lune_fast.data) and as Settings are, journaled, queued."""
        from dataclasses import fields

        from .data import DataError, read_facts
        from .settings import Settings, SettingsError

        if not records:
            raise ServiceError(422, "records: expected at least one record")
        if len(records) > MAX_RECORDS:
            raise ServiceError(413, f"records: {len(records)} records; at most {MAX_RECORDS} a request")
        known = {f.name for f in fields(Settings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ServiceError(422, f"settings: unknown setting(s) {', '.join(unknown)}")
        try:
            read = read_facts(records)
            if read.skipped:
                raise DataError("; ".join(read.skipped))
            Settings(**{"mode": mode or "suppress", **settings}).resolved().check()
        except (DataError, SettingsError, TypeError) as e:
            raise ServiceError(422, str(e)) from None
        return self._accept_request("forget", {"records": records, "mode": mode, "settings": settings})

    def accept_revoke(self, target: str) -> Request:
        r = self.requests.get(target)
        if r is None or r.kind != "forget":
            raise ServiceError(404, f"request: no deletion request {target!r} here")
        if r.status in ("failed", "revoked"):
            raise ServiceError(409, f"request: {target!r} is {r.status}; there is nothing to revoke")
        return self._accept_request("revoke", {"request": target})

    def _accept_request(self, kind: str, body: dict) -> Request:
        with self._accept:
            r = Request(f"{kind[:3]}-{uuid.uuid4().hex[:12]}", kind, body=body)
            self.journal.append({"op": "accept", "id": r.id, "kind": kind, "body": body, "time": time.time()})
            self.requests[r.id] = r
            self.todo.put(r.id)
        return r

    # applying ---------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            r = self.requests[self.todo.get()]
            _hold("queued")
            r.status = "training"
            _hold("training")
            try:
                outcome = self._apply(r)
            except Exception as e:  # noqa: BLE001 - one request fails, the service goes on
                r.status, r.error = "failed", f"{type(e).__name__}: {e}"
                self.journal.append({"op": "failed", "id": r.id, "error": r.error})
                log.error(json.dumps({"event": "request_failed", "id": r.id, "error": r.error}))
                continue
            _hold("committed")
            with self.swap.writing():
                self._put_state_on()
            r.ledger, r.metrics, r.cost = outcome
            r.status = "in_force"
            if r.kind == "revoke":
                self.requests[r.body["request"]].status = "revoked"
            self.journal.append({"op": "done", "id": r.id, "ledger": r.ledger, "metrics": r.metrics, "cost": r.cost})
            log.info(json.dumps({"event": "in_force", "id": r.id, "ledger": r.ledger}))

    def _apply(self, r: Request) -> tuple[str, dict | None, dict | None]:
        from . import lifelong
        from .data import read_facts

        if r.kind == "revoke":
            target = self.requests[r.body["request"]]
            entry = lifelong.revoke(self.trainer, self.state, target.ledger, evaluate_after=self.evaluate,
                                    extra={"service_id": r.id})
            return entry["id"], entry.get("after"), None
        b = r.body
        result = lifelong.forget_into(self.trainer, read_facts(b["records"]), self.state, b["mode"], None,
                                      self.evaluate, self.evaluate, None, False, dict(b["settings"]),
                                      extra={"service_id": r.id})
        if result.error is not None:
            raise RuntimeError(f"{result.error}; the state is unchanged")
        return result.request_id, result.after, result.cost

    # completions ----------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def complete(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, stop: list[str],
                 seed: int | None):
        """(text, None, tokens so far) pieces of the continuation as they are decoded, then ("", finish_reason,
        tokens). A stop sequence ends it and is cut off; text that could be the start of one (or a character
        whose bytes are not all decoded yet) is held back until it cannot."""
        import torch

        from .generate import stream

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stop = [s for s in stop if s]
        with self.slots, self.swap.reading():
            ids, sent, reason = [], 0, None
            for tok in stream(self.model, prompt_ids, max_tokens, None, temperature, top_p, gen):
                ids.append(tok)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                hits = [text.find(s) for s in stop if s in text]
                if hits:
                    text, reason = text[:min(hits)], "stop"
                ready = len(text) if reason else _safe_end(text, stop)
                if ready > sent:
                    yield text[sent:ready], None, len(ids)
                    sent = ready
                if reason:
                    break
            else:  # no stop sequence: the end of the sequence (fewer tokens than allowed), or the limit
                reason = "length" if len(ids) >= max_tokens else "stop"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if len(text) > sent:
                    yield text[sent:], None, len(ids)
            yield "", reason, len(ids)


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent now: all but a tail that may still become a stop sequence or a character
    (U+FFFD: its bytes are not all decoded yet)."""
    end = len(text.rstrip("\ufffd"))
    for k in range(min(max((len(s) - 1 for s in stops), default=0), end), 0, -1):
        if any(s.startswith(text[end - k:end]) for s in stops):
            return end - k
    return end


# -- the HTTP layer -------------------------------------------------------------------------------------------
def app(state: str | Path, model: str = "default", token: str | None = None, open_completions: bool = False,
        dtype: str = "auto", device: str = "cpu", evaluate: bool = False, service: Service | None = None,
        check_dtypes: str | None = None):
    """The FastAPI app of the service (the model loads in the background once it starts)."""
    from fastapi import Depends, FastAPI, HTTPException, Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from typing import Any, Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class ForgetBody(Body):
        records: list[dict[str, Any]]
        mode: Literal["suppress", "replace"] | None = None
        settings: dict[str, Any] = Field(default_factory=dict)

    class RevokeBody(Body):
        request: str

    class Sampling(BaseModel):  # OpenAI's fields; others (user, logit_bias, ...) are accepted and ignored
        model: str | None = None
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        stream: bool = False
        seed: int | None = None
        n: int = Field(1, ge=1, le=1)

    class CompletionBody(Sampling):
        prompt: str | list[str] = Field(min_length=1)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatBody(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int = Field(256, ge=1)

    svc = service or Service(state, model, dtype, device, evaluate, check_dtypes)
    registry = CollectorRegistry()
    http_requests = Counter("lune_fast_http_requests", "HTTP requests", ["path", "code"], registry=registry)
    latency = Histogram("lune_fast_http_seconds", "HTTP request time", ["path"], registry=registry,
                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
    Gauge("lune_fast_queue_depth", "deletion requests waiting", registry=registry).set_function(svc.todo.qsize)
    Gauge("lune_fast_state_facts", "facts in the committed state", registry=registry).set_function(lambda: svc.facts)
    tokens_out = Counter("lune_fast_completion_tokens", "tokens generated", registry=registry)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_):
        threading.Thread(target=svc.load, name="lune-fast-load", daemon=True).start()
        yield

    api = FastAPI(title="lune_fast", lifespan=lifespan)
    api.state.service = svc

    @api.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            response = JSONResponse({"detail": f"body of {size} bytes; at most {MAX_BODY}"}, status_code=413)
        else:
            response = await call_next(request)
        path = request.scope.get("route").path if request.scope.get("route") is not None else "other"
        seconds = time.perf_counter() - t0
        http_requests.labels(path, str(response.status_code)).inc()
        latency.labels(path).observe(seconds)
        log.info(json.dumps({"time": round(time.time(), 3), "method": request.method, "path": request.url.path,
                             "status": response.status_code, "ms": round(1e3 * seconds, 1),
                             "client": request.client.host if request.client else None}))
        return response

    def bearer(request: HTTPRequest) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "a valid Authorization: Bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})

    def completions_auth(request: HTTPRequest) -> None:
        if not open_completions:
            bearer(request)

    def ready() -> Service:
        if not svc.ready.is_set():
            raise HTTPException(503, "the model is loading" if svc.load_error is None else
                                f"the model did not load: {svc.load_error}")
        return svc

    def refuse(e: ServiceError):
        raise HTTPException(e.status, str(e))

    @api.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz():
        ready()
        return {"status": "ready", "facts": svc.facts, "queued": svc.todo.qsize()}

    @api.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/forget", status_code=202, dependencies=[Depends(bearer)])
    def forget(body: ForgetBody):
        try:
            r = ready().accept_forget(body.records, body.mode, body.settings)
        except ServiceError as e:
            refuse(e)
        return {"id": r.id, "status": r.status}

    @api.post("/v1/revoke", status_code=202, dependencies=[Depends(bearer)])
    def revoke(body: RevokeBody):
        try:
            r = ready().accept_revoke(body.request)
        except ServiceError as e:
            refuse(e)
        return {"id": r.id, "status": r.status}

    @api.get("/v1/requests/{request_id}", dependencies=[Depends(bearer)])
    def request_status(request_id: str):
        r = ready().requests.get(request_id)
        if r is None:
            raise HTTPException(404, f"no request {request_id!r} here")
        return r.public()

    @api.get("/v1/ledger", dependencies=[Depends(bearer)])
    def ledger():
        return {"entries": ready()._ledger()}

    @api.get("/v1/models", dependencies=[Depends(completions_auth)])
    def models():
        return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": 0,
                                            "owned_by": "lune_fast"}]}

    def run(prompt_ids, body, make_chunk, make_final):
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        cid = f"cmpl-{uuid.uuid4().hex[:16]}"
        pieces = svc.complete(prompt_ids, min(body.max_tokens, MAX_TOKENS), body.temperature, body.top_p, stop,
                              body.seed)
        if body.stream:
            def events():
                n = 0
                try:
                    for text, reason, n in pieces:
                        yield f"data: {json.dumps(make_chunk(cid, text, reason))}\n\n"
                finally:
                    tokens_out.inc(n)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = "", None, 0
        for piece, reason_, n in pieces:
            text += piece
            reason = reason_ or reason
        tokens_out.inc(n)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}
        return make_final(cid, text, reason, usage)

    @api.post("/v1/completions", dependencies=[Depends(completions_auth)])
    def completions(body: CompletionBody):
        ready()
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        created = int(time.time())

        def chunk(cid, text, reason):
            return {"id": cid, "object": "text_completion", "created": created, "model": svc.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        def final(cid, text, reason, usage):
            return {**chunk(cid, text, reason), "usage": usage}

        return run(svc.encode(prompt), body, chunk, final)

    @api.post("/v1/chat/completions", dependencies=[Depends(completions_auth)])
    def chat(body: ChatBody):
        ready()
        created = int(time.time())
        try:
            ids = svc.encode_chat([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise HTTPException(422, f"messages: {e}") from None

        def chunk(cid, text, reason):
            delta = {"role": "assistant", "content": text} if text or reason is None else {}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        def final(cid, text, reason, usage):
            return {"id": cid, "object": "chat.completion", "created": created, "model": svc.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason}], "usage": usage}

        return run(ids, body, chunk, final)

    return api
