"""Requests into a lifelong state (lune_fast.state), one at a time: what the API, the command line and the service
share around a request. Unlearner trains one request (plan -> train -> result); this module puts it into the state
and keeps the state's promises:

- before a request trains, the neighbour repairs that would write back one of its prompts are revoked;
- after it lands, the listed neighbours the state's earlier requests had flipped are put back by a repair request
  of its own (lune_fast.repair);
- a revocation takes one request's ranks out and records what that did.

Every change is a ledger line and an atomic swap of the state folder, under the state's lock: a kill leaves the old
state or the new one. `extra` fields go into the request's ledger line as they are (the service records its own
request id there, which is how it knows after a crash whether a request landed).
"""
from __future__ import annotations

from pathlib import Path

from . import repair
from .data import DataError, ReadResult, read_facts
from .evaluate import evaluate
from .io import folder_in_use
from .settings import SettingsError
from .state import State, StateError, fact_record, locked, now

# `u` below is the lune_fast.api.Unlearner that trains the requests (not imported: api imports this module), and a
# result its ForgetResult


def check_folder(into) -> None:
    """Before any work: a state is committed by swapping its folder, which cannot be the one the user is in."""
    if folder_in_use(into):
        raise StateError(f"{into} is the folder you are in (or holds it): a state is committed by replacing its "
                         f"folder; run from outside it")


def forget_into(u, read: ReadResult, into: str | Path, mode, retain, evaluate_before, evaluate_after,
                retain_texts, progress, overrides: dict, extra: dict | None = None):
    """One request into the state at `into` (created the first time): trained with the state's earlier requests
    acting, committed with a ledger line (result.request_id), then its neighbour repair. A request that diverges
    leaves the state as it was."""
    if u.dist is not None:
        raise SettingsError("a lifelong state (into=) is updated by one process; run without torchrun")
    check_folder(into)
    with u._lock, locked(into):
        st, revoked = revoke_repairs(State.open(into), read.facts)
        result = u.run_request(read, mode, retain, evaluate_before, evaluate_after, retain_texts, progress, None,
                               False, st, overrides)
        if revoked:
            result.cost["neighbor_repair"] = {"revoked": revoked}
        if result.error is None:
            repair_neighbours(u, commit_request(st, result, **(extra or {})), result)
        return result


def revoke_repairs(st: State, facts) -> tuple[State, list[str]]:
    """Revoke the neighbour repairs (lune_fast.repair) that hold a prompt of the request's `facts`, before it
    trains: a repair writes that very answer back. Returns the state and the repairs revoked."""
    asked = {f.prompt for f in facts}
    revoked = []
    for e in st.repairs():
        if any(r["prompt"] in asked for r in e["records"]):
            entry = {"id": st.next_id(), "op": "revoke", "request": e["id"], "time": now(),
                     "rank": e["rank"], "records": e["records"], "reason": "a repaired prompt is now forgotten"}
            st = st.without_request(e["id"], entry)
            st.commit()
            revoked.append(e["id"])
    return st, revoked


def repair_neighbours(u, st: State, result) -> None:
    """After `result`'s request landed in `st`: a repair request for the listed neighbours the state had flipped
    before it trained (lune_fast.repair), added to the state; result.cost["neighbor_repair"] says what was
    repaired, by which request, or why not (the request's own ledger line stays as it was written)."""
    lost = repair.lost(u.model, u.encoder, result.watch, u._base_leads)
    if not lost:
        return
    done = {**result.cost.get("neighbor_repair", {}), "repaired": [p for p, _ in lost]}
    c = result.config
    try:
        over = {**repair.REPAIR_SETTINGS, "layers": c["layers_spec"], "targets": ",".join(c["targets"]),
                "seed": c["seed"], "steps": c["steps"]}
        fixes = u.run_request(read_facts(repair.repair_records(lost)), "replace", None, False, False, None, False,
                              None, False, st, over)
        if fixes.error is None:
            commit_request(st, fixes, repair=True, **{"for": result.request_id})
            done["request"] = fixes.request_id
        else:
            done["error"] = fixes.error
    except (StateError, DataError, SettingsError) as e:  # e.g. no layer window has room left
        done["error"] = str(e)
    result.cost = {**result.cost, "neighbor_repair": done}


def commit_request(st: State, result, **extra) -> State:
    """Append the request to the state: its ranks after the earlier ones, its keys, its ledger line (with
    `extra` fields). Returns the new state."""
    entry = {"id": st.next_id(), "op": "forget", "time": now(), **extra,
             "records": [fact_record(f) for f in result.facts], "skipped": result.skipped,
             "settings": result.config, "rank": result.adapter_config["r"], "before": result.before,
             "after": result.after, "cost": result.cost, "stopped": result.stopped,
             "still_known": result.still_known}
    new = st.with_request(entry, result.adapter, result.adapter_config, result.keys)
    new.commit()
    result.request_id = entry["id"]
    return new


def revoke(u, into: str | Path, request_id: str, evaluate_after: bool = True,
           retain_texts: list[str] | str | None = None, progress: bool = False, extra: dict | None = None) -> dict:
    """Withdraw one request from a lifelong state: its ranks and keys are removed (its facts come back), the
    others stay. With evaluate_after, the ledger line records the revoked facts' and the remaining facts'
    METRICS on the new state. Returns that ledger line."""
    check_folder(into)
    with u._lock, locked(into):
        st = State.open(into)
        if not st.entries:
            raise StateError(f"{into}: no state here (nothing to revoke)")
        st.check_model(str(u.model_dir))
        target = st.entry(request_id)
        entry = {"id": st.next_id(), "op": "revoke", "request": request_id, "time": now(),
                 "rank": target["rank"], "records": target["records"], **(extra or {})}
        new = st.without_request(request_id, entry)
        if evaluate_after:
            texts = u.retain_texts(retain_texts)
            entry["after"] = {"revoked": state_metrics(u, new, target["records"], texts, progress),
                              "remaining": state_metrics(u, new, new.records(), texts, progress)}
        new.commit()
        return entry


def state_metrics(u, st: State, records: list[dict], texts: list[str], progress: bool) -> dict | None:
    """METRICS of `records` on the model with the state's adapter (over what the base model answered)."""
    if not records:
        return None
    facts = read_facts(records).facts
    known = u.base_evaluation(facts, texts, False, u.defaults.max_new_tokens, progress).known_mask()
    with st.on(u.model):
        return evaluate(u.model, u.encoder, facts, texts, False, u.defaults.max_new_tokens, progress).metrics(known)
