"""Neighbour repair: the neighbours a request into a lifelong state lists that the state's earlier requests had
already flipped are put back right after it lands.

Along a stream of requests each new rank also writes a little wherever it half-reads, and answers the base model
gave by a small lead tip over one by one. Most of the neighbours a stream loses are lost that way before their own
fact is asked to be forgotten — by an earlier request about something else (RESULTS.md section 11, "Where the
stream's neighbours go"): no guard of that earlier request could see them, and the request that lists them cannot
move them with its own ranks, which read only its subjects. So a request reads its listed neighbours' leads
before it trains, on the model as the state serves it (teacher-forced, as the guard reads them, in the guard's own
forward where it runs), and after it lands, any whose lead the state had cut under the guard's rule (min(ln 2,
half the base model's lead)) gets a repair request: a keyed replace request whose "replacement" is the base
model's own answer — a rank that reads the neighbour's subject and writes its answer back, to REPAIR_PROB.

A repair is a request of its own in the ledger ("repair": true, "for": the request that found it; that request's
result says what under cost.neighbor_repair). Revoking a request leaves the repairs it triggered; a repair whose
prompt a later request asks to forget is revoked before that request trains (with a ledger line saying why).
Repairs are not forgotten facts: the state's fact count, its records and the neighbours later requests keep leave
them out, and a prompt a repair holds is not repaired again.
"""
from __future__ import annotations

from .data import Encoder, Fact, listed_neighbors
from .guard import MAX_LEAD, leads
from .model import Transformer

# the mean token probability a repaired answer is trained back to (replace mode's stop): over an answer of two
# tokens, 0.75 puts each above 0.5, so that greedy decoding says it; at 0.5 a repair could stop with a first token
# still behind (facts-dev, 100 one-fact requests, repairs then made before the request: neighbours kept .951
# at 100 against .927, the same perplexity)
REPAIR_PROB = 0.75
# the repair request's own settings: the suppress request's preserved text (its moments are cached for the
# window already; replace mode's long text, ~60,000 tokens, would be read once more per window), and no guard or
# repair of its own
REPAIR_SETTINGS = {"replace_prob": REPAIR_PROB, "preserve_text": "preserve_text.jsonl", "neighbor_guard": "off",
                   "repair_neighbors": False}


def watched(model: Transformer, enc: Encoder, facts: list[Fact], skip: set[str], seen: dict
            ) -> dict[tuple[str, str], float]:
    """(prompt, answer) -> lead on `model` as it is (the state acting, before the request trains) of the facts'
    listed neighbours whose lead is under MAX_LEAD: the only ones a repair can be for. Leads come from `seen`
    (the guard's forward) where it has them, else from one forward. Chat questions and prompts in `skip` (forget
    prompts, prompts a repair holds) are left out."""
    listed = list(dict.fromkeys((p, t) for f, p, t in listed_neighbors(facts) if not f.chat and p not in skip))
    new = [x for x in listed if x not in seen]
    now = {**seen, **dict(zip(new, leads(model, [enc.pair(p, t, False) for p, t in new], enc.pad_id)))}
    return {x: now[x] for x in listed if now[x] < MAX_LEAD}


def lost(model: Transformer, enc: Encoder, watch: dict[tuple[str, str], float], base_leads: dict
         ) -> list[tuple[str, str]]:
    """Of `watch` (watched()), the neighbours the base model answers (lead > 0) whose lead the state had cut under
    min(MAX_LEAD, half the base lead). Call it on the base model: nothing attached or folded. `base_leads`: the
    base model's leads by (prompt, answer), read from and added to (they never change)."""
    new = [x for x in watch if x not in base_leads]
    base_leads.update(zip(new, leads(model, [enc.pair(p, t, False) for p, t in new], enc.pad_id)))
    return [x for x, m in watch.items() if base_leads[x] > 0 and m < min(MAX_LEAD, base_leads[x] / 2)]


def repair_records(lost: list[tuple[str, str]]) -> list[dict]:
    """The replace records that write each lost answer back (the old answer and the new are the same text: the
    request only trains the replacement)."""
    return [{"prompt": p, "target": t, "replacement": t} for p, t in lost]
