"""Subject-keyed adapters and the preserved-input moments they are whitened against."""
import pytest
import torch

from conftest import make_tiny_hf, rel_err
from lune_fast import lora
from lune_fast.data import Encoder, Fact
from lune_fast.keyed import CONTEXTS, key_positions, set_keyed, subject_keys
from lune_fast.plan import prefixed_prompts
from lune_fast.model import AttnMask
from lune_fast.preserve import Preserved, combine, group_moments
from lune_fast.settings import SettingsError
from lune_fast.weights import load_model


@pytest.fixture()
def tiny(tmp_path):
    make_tiny_hf("llama", tmp_path)
    torch.manual_seed(0)
    return load_model(tmp_path)


def _inputs_of(model, settings, seqs):
    """Every adapted projection's input at every position of each sequence, run one at a time (no packing)."""
    linears = lora.frozen_linears(model, settings)
    got = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items()]
    with torch.no_grad(), lora.disabled(model):
        for s in seqs:
            x = torch.tensor([s])
            model.run_layers(model.embed(x), torch.arange(len(s))[None], AttnMask())
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


def test_penalty_is_the_relative_output_change_on_the_preserved_tokens(tiny):
    """tr(ΔW C ΔWᵀ) / tr(W C Wᵀ) with C from packed batches equals the output change measured token by token,
    each group weighing the same."""
    g = torch.Generator().manual_seed(1)
    groups = [[torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 9, 3)],
              [torch.randint(3, 200, (n,), generator=g).tolist() for n in (12, 4)]]
    settings = lora.LoraSettings(rank=4, alpha=8, targets=("gate", "down"), layers=(1, 2))
    preserved = combine(tiny, settings, [group_moments(tiny, settings, g) for g in groups])
    assert preserved.tokens == 5 + 9 + 3 + 12 + 4
    lora.attach(tiny, settings)
    with torch.no_grad():
        for m in lora.adapters_of(tiny).values():
            m.lora_B.normal_(generator=g)
    expected = []
    per_group = [_inputs_of(tiny, settings, grp) for grp in groups]
    for name, m in lora.adapters_of(tiny).items():
        dW, W = m.delta_weight().double(), m.base.weight.double()
        change = sum(((X @ dW.t()) ** 2).sum(1).mean() for X in (p[name] for p in per_group))
        energy = sum(((X @ W.t()) ** 2).sum(1).mean() for X in (p[name] for p in per_group))
        expected.append(change / energy)
    got = preserved.penalty(tiny)
    assert got.requires_grad
    want = torch.stack(expected).mean()
    assert abs(got.item() - want.item()) <= 1e-4 * want.item()
    got.backward()  # differentiable in the adapters
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in lora.adapters_of(tiny).values())


def test_keyed_A_answers_one_to_its_own_key_at_least_cost(tiny):
    settings = lora.LoraSettings(rank=3, alpha=3, targets=("down",), layers=(1,))
    lora.attach(tiny, settings)
    (name, m), = lora.adapters_of(tiny).items()
    d = m.in_features
    g = torch.Generator().manual_seed(2)
    X = torch.randn(4 * d, d, generator=g) * torch.linspace(0.1, 3, d)  # anisotropic preserved inputs
    C = X.t() @ X / X.shape[0]
    K = torch.randn(3, d, generator=g)
    set_keyed(tiny, {name: K}, Preserved({name: C}, {name: 1.0}, 0), ridge=0.0, overlap=0.0)
    A = m.lora_A.detach().double()
    assert torch.allclose(A @ K.double().t(), torch.eye(3, dtype=torch.float64), atol=1e-4)
    assert not m.lora_A.requires_grad and m.lora_B.requires_grad and float(m.lora_B.detach().abs().sum()) == 0
    assert lora.trainable_parameters(tiny) == [m.lora_B]
    # any other A with A K = I reads more of the preserved inputs, e.g. the plain pseudo-inverse
    other = torch.linalg.pinv(K.double().t())
    cost = lambda a: float(torch.trace(a @ C.double() @ a.t()))  # noqa: E731
    assert torch.allclose(other @ K.double().t(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert cost(A) < 0.5 * cost(other)
    # two facts about one subject: near-identical keys; exact A K = I would need huge rows, the overlap ridge
    # keeps A near the scale of the distinct-key solution and gives the shared subject to both rows
    K2 = torch.cat([K[:2], K[1:2] + 1e-3 * torch.randn(1, d, generator=g)])
    for overlap, bounded in ((0.0, False), (1e-2, True)):
        set_keyed(tiny, {name: K2}, Preserved({name: C}, {name: 1.0}, 0), ridge=0.0, overlap=overlap)
        assert (cost(m.lora_A.detach().double()) < 10 * cost(A)) == bounded
    AK = m.lora_A.detach().double() @ K2.double().t()
    assert abs(AK[0, 0] - 1) < 0.05 and abs(AK[1, 1] - 0.5) < 0.05 and abs(AK[2, 1] - 0.5) < 0.05


def test_subject_keys_average_the_inputs_at_the_key_positions(tiny):
    settings = lora.LoraSettings(rank=2, alpha=2, targets=("down", "up"), layers=(0, 2))
    where = [[([5, 6, 7, 8], 2)], [([9, 10], 1), ([11, 12, 13, 14, 15], 3)]]
    keys = subject_keys(tiny, settings, where)
    for name in lora.frozen_linears(tiny, settings):
        first = _inputs_of(tiny, settings, [[5, 6, 7, 8]])[name][2]
        second = (_inputs_of(tiny, settings, [[9, 10]])[name][1] +
                  _inputs_of(tiny, settings, [[11, 12, 13, 14, 15]])[name][3]) / 2
        assert torch.allclose(keys[name][0].double(), first, atol=1e-5)
        assert torch.allclose(keys[name][1].double(), second, atol=1e-5)


def test_key_positions_sit_on_the_subject(tokenizer):
    enc = Encoder(tokenizer)
    facts = [Fact(prompt="The main language spoken in Turkey is", target="Turkish"),
             Fact(prompt="A turtle is a type of", target="reptile")]
    with_subject, without = key_positions(enc, facts)
    assert len(with_subject) == 1 + len(CONTEXTS)
    for ids, pos in with_subject:
        assert enc.decode(ids[:pos + 1]).endswith("Turkey")
    ids, pos = with_subject[0]
    assert ids == enc.prompt_ids(facts[0].prompt, False)
    (ids, pos), = without  # no subject found: its content words ("turtle"), not the template's last token
    assert enc.decode(ids[:pos + 1]).endswith("A turtle")
    chat = Fact(prompt="Which river is the longest in the world?", target="Nile", chat=True)
    ends = [enc.decode(ids[:p + 1]).split()[-1] for ids, p in key_positions(enc, [chat])[0]]
    assert ends == ["river", "longest", "world"]  # found inside the chat template
    assert [p.endswith(facts[0].prompt) for p in prefixed_prompts(enc, facts[0])] == [True] * 3
    assert any("Turkey." in p for p in prefixed_prompts(enc, facts[0]))
    assert len(prefixed_prompts(enc, facts[1])) == 1  # only the prefix that does not name a subject


def test_listed_neighbours_become_inputs_the_adapter_reads_less(tiny_lm):
    """With preserve_neighbors the records' neighbour prompts are a group of the preserved inputs: A then
    answers less to them (tr(A C_neighbours Aᵀ) falls) while still answering 1 to its own keys."""
    from lune_fast.keyed import attach_keyed, preserved_inputs
    from lune_fast.weights import load_tokenizer

    model = load_model(tiny_lm)
    enc = Encoder(load_tokenizer(tiny_lm))
    facts = [Fact(prompt="The capital of France is", target="Paris",
                  neighbors=[("The capital of Spain is", "Madrid"), ("The capital of Italy is", "Rome")]),
             Fact(prompt="The chemical symbol for gold is", target="Au",
                  neighbors=[("The chemical symbol for silver is", "Ag")])]
    settings = lora.LoraSettings(rank=2, alpha=2, targets=("down",), layers=(1, 2))
    listed = [enc.prompt_ids(p, False) for f in facts for p, _ in f.neighbors]
    c_neigh, _ = group_moments(model, settings, listed, enc.pad_id)
    keys = subject_keys(model, settings, key_positions(enc, facts), enc.pad_id)
    read = []
    for with_neighbors in (False, True):
        pres = preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, neighbors=with_neighbors)
        attach_keyed(model, enc, facts, settings, pres, ridge=1e-2, overlap=1e-3)
        read.append({n: float(torch.trace(m.lora_A @ c_neigh[n] @ m.lora_A.t()))
                     for n, m in lora.adapters_of(model).items()})
        for n, m in lora.adapters_of(model).items():
            assert torch.allclose(m.lora_A @ keys[n].t(), torch.eye(2), atol=0.05), n
        lora.detach(model)
    assert all(read[1][n] < read[0][n] for n in read[0]), read


def test_step_scale_follows_the_adapted_projections_output_scale(tiny):
    """A keyed lr is a step for projections writing values of rms about 1: inside STEP_BAND the factor is exactly 1,
    under it the median output rms over the preserved inputs (tr(W C Wᵀ) / out_features, per projection), so a
    model whose down_proj writes 5× smaller values gets a 5× smaller step; larger values keep the step."""
    from lune_fast.keyed import STEP_BAND, step_scale

    # the last layer's down_proj: scaling it leaves its own inputs as they are
    settings = lora.LoraSettings(targets=("down",), layers=(2,))
    seqs = [[int(t) for t in torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(i))]
            for i in range(6)]
    linears = lora.frozen_linears(tiny, settings)
    name = next(iter(linears))

    def measured():
        x = _inputs_of(tiny, settings, seqs)
        return float((x[name] @ linears[name].weight.double().t()).pow(2).mean().sqrt())

    def factor():
        return step_scale(tiny, settings, combine(tiny, settings, [group_moments(tiny, settings, seqs)]))

    rms = measured()
    with torch.no_grad():
        linears[name].weight.mul_(1 / rms)  # rms 1: inside the band
    assert STEP_BAND[0] <= measured() <= STEP_BAND[1] and factor() == 1.0
    with torch.no_grad():
        linears[name].weight.mul_(10.0)
    assert measured() > 9 and factor() == 1.0
    with torch.no_grad():
        linears[name].weight.mul_(0.02)
    assert factor() == pytest.approx(measured(), rel=1e-4) and factor() == pytest.approx(0.2, rel=1e-4)


def test_kept_moment_sums_give_the_moments_computed_afresh_bit_for_bit(tiny):
    """A lifelong state's earlier neighbours come first and their whole chunks' sums are kept: a later call that
    starts with them (and more) adds only the rest and gets exactly what a fresh call gets; a call that does not
    start with them (a revoke, or a new fact among them) starts over."""
    from lune_fast.preserve import CHUNK, Sums

    settings = lora.LoraSettings(targets=("down",), layers=(0, 2))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 211, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (3 * CHUNK,), generator=g)]
    cache = {}
    first = group_moments(tiny, settings, seqs[:CHUNK + 10] + seqs[-5:], cache=cache, key="k", stable=CHUNK + 10)
    assert [len(k.seqs) for v in cache.values() for k in v] == [1]  # the whole chunk of the stable part
    fresh = group_moments(tiny, settings, seqs[:CHUNK + 10] + seqs[-5:])
    assert first[1] == fresh[1] and all(torch.equal(first[0][n], fresh[0][n]) for n in fresh[0])

    kept = cache["k"][-1]
    grown = seqs[:2 * CHUNK + 3]
    want = group_moments(tiny, settings, grown)
    got = group_moments(tiny, settings, grown, cache=cache, key="k", stable=2 * CHUNK)
    assert got[1] == want[1] and all(torch.equal(got[0][n], want[0][n]) for n in want[0])
    assert [len(k.seqs) for k in cache["k"]] == [2]  # chunks
    # it did start from the kept sums: marked, the mark comes back
    cache.clear()
    cache["k"] = [Sums(kept.seqs, {n: v + 1.0 for n, v in kept.sums.items()}, kept.n)]
    got = group_moments(tiny, settings, grown, cache=cache, key="k", stable=2 * CHUNK)
    assert all(torch.allclose(got[0][n] * got[1], want[0][n] * want[1] + 1.0, rtol=0, atol=1e-3) for n in want[0])

    other = seqs[1:2 * CHUNK + 3]  # no longer starts with the kept sequences: computed afresh
    got = group_moments(tiny, settings, other, cache=cache, key="k", stable=2 * CHUNK - 1)
    want = group_moments(tiny, settings, other)
    assert all(torch.equal(got[0][n], want[0][n]) for n in want[0])


def test_kept_moment_sums_are_read_back_from_disk_by_a_fresh_process(tiny, tmp_path, monkeypatch):
    """With SumsFiles the kept sums are on disk too: a fresh cache (the next process) reads the file and adds only
    the rest, bit for bit the moments computed afresh; sequences that do not start with the kept prefix, another
    `what` or a damaged file compute their own; the taken-out sums are kept the same way."""
    from lune_fast import preserve
    from lune_fast.preserve import CHUNK, SumsFiles

    store = tmp_path / "moments"
    monkeypatch.setenv("LUNE_FAST_MOMENTS", str(store))
    settings = lora.LoraSettings(targets=("down",), layers=(0, 2))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 211, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (3 * CHUNK,), generator=g)]
    read = []
    real = preserve._add_chunks
    monkeypatch.setattr(preserve, "_add_chunks", lambda m, st, s, *a, take=None: read.append(
        len(take) if take is not None else sum(map(len, s))) or real(m, st, s, *a, take=take))

    def moments(seqs, stable, what="w", minus=(), minus_stable=0, chunk=None):
        read.clear()
        return group_moments(tiny, settings, seqs, cache={}, key="k", stable=stable, minus=minus,
                             minus_stable=minus_stable, files=SumsFiles("origin", lambda: what), chunk=chunk)

    def same(a, b):
        return a[1] == b[1] and all(torch.equal(a[0][n], b[0][n]) for n in b[0])

    moments(seqs[:CHUNK + 5], CHUNK + 5)
    assert read == [CHUNK, 5] and len(list(store.iterdir())) == 1
    grown = seqs[:2 * CHUNK + 3]
    want = group_moments(tiny, settings, grown)
    got = moments(grown, 2 * CHUNK)
    assert read == [CHUNK, 3] and same(got, want)  # the first chunk from disk
    preserve.flush_kept_sums()  # one chunk more is written when the process exits
    assert len(list(store.iterdir())) == 1  # the same file, now holding two chunks
    assert same(moments(grown, 2 * CHUNK), got) and read == [3]
    assert same(moments(grown, 2 * CHUNK, what="other"), got) and read == [2 * CHUNK, 3]
    # sums kept in other chunks round otherwise: their own file (computed in chunks of CHUNK // 2 here)
    half = moments(grown, 2 * CHUNK, chunk=CHUNK // 2)
    assert read == [2 * CHUNK, 3] and same(half, group_moments(tiny, settings, grown, chunk=CHUNK // 2))
    assert same(moments(grown, 2 * CHUNK, chunk=CHUNK // 2), half) and read == [3]
    other = seqs[1:2 * CHUNK + 3]
    want_other = group_moments(tiny, settings, other)
    assert same(moments(other, 2 * CHUNK), want_other) and read == [2 * CHUNK, 2]
    # the taken-out sequences (by position; each read again in its chunk): their own file
    taken = list(range(5, CHUNK + 5))
    want_taken = group_moments(tiny, settings, grown, minus=taken)
    moments(grown, 2 * CHUNK, minus=taken, minus_stable=CHUNK)
    got = moments(grown, 2 * CHUNK, minus=taken, minus_stable=CHUNK)
    assert read == [3] and same(got, want_taken)
    for f in store.iterdir():
        f.write_bytes(b"damaged")
    assert same(moments(grown, 2 * CHUNK), want) and read == [2 * CHUNK, 3]


def test_kept_sums_are_written_at_once_then_every_save_every_sequences_and_the_rest_at_exit(tiny, tmp_path,
                                                                                            monkeypatch):
    """A process writes a state's kept sums the first time, then only when SAVE_EVERY more sequences were added
    since its last write; the rest waits for flush_kept_sums (at exit). What is read back is the sums computed
    afresh, bit for bit."""
    from safetensors import safe_open

    from lune_fast import preserve
    from lune_fast.preserve import SumsFiles, flush_kept_sums

    monkeypatch.setenv("LUNE_FAST_MOMENTS", str(tmp_path / "moments"))
    monkeypatch.setattr(preserve, "SAVE_EVERY", 16)
    settings = lora.LoraSettings(targets=("down",), layers=(0, 2))
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 211, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (40,), generator=g)]
    cache = {}

    def moments(n, cache):
        return group_moments(tiny, settings, seqs[:n], cache=cache, key="k", stable=n,
                             files=SumsFiles("origin", lambda: "w"), chunk=1)

    def on_disk():
        files = list((tmp_path / "moments").iterdir())
        assert len(files) == 1
        with safe_open(str(files[0]), framework="pt") as f:
            return int(f.metadata()["count"])

    moments(10, cache)
    assert on_disk() == 10  # the first write at once
    moments(20, cache)
    assert on_disk() == 10  # 10 more: not yet
    moments(30, cache)
    assert on_disk() == 30  # 20 more since the last write
    want = moments(35, cache)
    assert on_disk() == 30
    flush_kept_sums()
    assert on_disk() == 35
    read = []
    real = preserve._add_chunks
    monkeypatch.setattr(preserve, "_add_chunks", lambda m, st, s, *a: read.append(len(s)) or real(m, st, s, *a))
    got = moments(35, {})  # the next process
    assert read == [] and got[1] == want[1] and all(torch.equal(got[0][n], want[0][n]) for n in want[0])


@pytest.mark.numerics  # run again under other instruction sets (Makefile): bf16 rounds otherwise on each
@pytest.mark.parametrize("lifelong", [False, True], ids=["one-off", "lifelong"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_earlier_facts_neighbour_forgotten_later_is_taken_out_and_the_kept_sums_stay(tiny_lm, dtype, lifelong,
                                                                                         monkeypatch):
    """Facts of one relation list each other as neighbours. When a request forgets an earlier fact's neighbour,
    that prompt leaves the preserved inputs (its sums subtracted: the moments are those of the others, to float32
    rounding, in bf16 too: what is subtracted is what was added), and both the earlier neighbours' sums and the
    taken-out ones' stay kept: only what follows them is read. Into a state (lifelong), the request's own
    neighbours are kept too, as the next request's start should this one land, beside the earlier ones' should
    it not."""
    from lune_fast import preserve
    from lune_fast.keyed import preserved_inputs
    from lune_fast.weights import load_tokenizer

    model = load_model(tiny_lm, dtype=dtype)
    enc = Encoder(load_tokenizer(tiny_lm))
    settings = lora.LoraSettings(rank=1, alpha=1, targets=("down",), layers=(1,))
    capitals = [("Egypt", "Cairo"), ("France", "Paris"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi")]
    facts = [Fact(prompt=f"The capital of {c} is", target=t, subject=c,
                  neighbors=[(f"The capital of {o} is", a) for o, a in capitals if o != c]) for c, t in capitals]
    read = []
    real = preserve._add_chunks
    monkeypatch.setattr(preserve, "_add_chunks", lambda m, st, s, *a, take=None: read.append(
        len(take) if take is not None else sum(map(len, s))) or real(m, st, s, *a, take=take))
    cache = {}

    def request(i, earlier, **kw):
        return preserved_inputs(model, enc, facts[i:i + 1], settings, 0, None, 0, kw.pop("cache", cache),
                                earlier=facts[:earlier], lifelong=lifelong, **kw)

    request(2, 2)
    read.clear()
    got = request(3, 3)  # Chile, a neighbour of every earlier fact, is forgotten now
    kept = cache["earlier neighbours"]
    if lifelong:
        # a fact's chunk holds its neighbours that were no forget prompt when it came (Egypt's four, France's
        # three but Egypt, Peru's Chile and Kenya); kept: those three chunks (Peru's request kept its own) and the
        # 3 taken out then (France in Egypt's, Peru in Egypt's and France's); read: Chile's chunk (Kenya), and the
        # 3 that are forget prompts now (Chile in the three chunks)
        assert [n for n in read if n] == [1, 3]
        assert sorted(len(k.seqs) for v in kept.values() for k in v) == [3, 3, 4, 6]  # chunks, taken
    else:
        # kept: the chunks of Egypt and France (their neighbours that were no forget prompt when they came: four
        # and three), and the one taken out before Peru's request (France in Egypt's); read: Peru's chunk (Chile,
        # Kenya) and Chile's own neighbour that is no forget prompt (Kenya); then to take out, the 2 that became
        # forget prompts with Peru (kept) and the 3 with Chile
        assert [n for n in read if n] == [2, 1, 2, 3]
        assert sorted(len(k.seqs) for v in kept.values() for k in v) == [3, 3]
    # what a fresh computation gets, bit for bit (the same forwards, in the same order)
    name = "layers.1.mlp.down_proj"
    fresh = request(3, 3, cache={})
    assert got.tokens == fresh.tokens and torch.equal(got.moments[name], fresh.moments[name])
    # the same moments as with the forget prompts never read: Kenya three times and once (read in other batches
    # here: bf16 inputs round otherwise)
    kenya = enc.prompt_ids("The capital of Kenya is", False)
    text = request(3, 3, cache={}, neighbors=False)
    want = combine(model, settings, [group_moments(model, settings, [kenya] * 4), group_moments(
        model, settings, [enc.tok(t, add_special_tokens=False)["input_ids"] for t in _text_lines()])])
    assert got.tokens == want.tokens and text.tokens + 4 * len(kenya) == got.tokens
    assert rel_err(got.moments[name], want.moments[name]) < (1e-5 if dtype == torch.float32 else 2e-2)
    if lifelong:  # Chile's request did not land: Kenya's starts from the earlier facts' kept sums
        read.clear()
        fresh = request(4, 3, cache={})
        assert request(4, 3).tokens == fresh.tokens and [n for n in read[-2:]] == [1, 3]
        assert rel_err(request(4, 3).moments[name], fresh.moments[name]) < 1e-5


def _text_lines():
    from lune_fast.data import read_lines
    from lune_fast.keyed import preserve_text_path

    return read_lines(preserve_text_path(None))


def test_facts_about_one_subject_share_a_rank(tiny_lm):
    """Two facts about Egypt and one about gold: the Egypt facts are one group, their keys are equal (read over both prompts), the second one's row of A is zero and the first one's answers 1
    to the shared key, as the gold row does to its own; without groups the two near-identical keys need rows
    many times larger. The plan trains both Egypt facts' sequences on the first one's column."""
    from lune_fast.keyed import attach_keyed, preserved_inputs, subject_groups
    from lune_fast.plan import Plan
    from lune_fast.settings import Settings
    from lune_fast.weights import load_tokenizer

    model = load_model(tiny_lm)
    enc = Encoder(load_tokenizer(tiny_lm))
    facts = [Fact(prompt="The capital of Egypt is", target="Cairo", subject="Egypt"),
             Fact(prompt="The chemical symbol for gold is", target="Au", subject="gold"),
             Fact(prompt="The currency of Egypt is the", target="pound", subject="Egypt")]
    groups = subject_groups(enc, facts)
    assert groups == [0, 1, 0]
    written = [Fact(prompt="Where is the Eiffel Tower?", target="Paris", subject="the Eiffel Tower", chat=True),
               Fact(prompt="Who built 'Eiffel Tower'?", target="Eiffel", chat=True),
               Fact(prompt="A turtle is a type of", target="reptile"), Fact(prompt="A frog is a type of", target="x")]
    assert subject_groups(enc, written) == [0, 0, 2, 3]  # case, quotes, "the"; no subject: a rank of its own
    places = key_positions(enc, facts, groups)
    assert places[0] == places[2] and len(places[0]) == 2 + len(CONTEXTS) and places[1] == key_positions(enc, facts)[1]
    settings = lora.LoraSettings(rank=3, alpha=3, targets=("down",), layers=(1, 2))
    pres = preserved_inputs(model, enc, facts, settings, 4, None, 0, {})
    sizes = {}
    for g in (groups, None):
        keys = attach_keyed(model, enc, facts, settings, pres, ridge=1e-2, overlap=1e-3, groups=g)
        for n, m in lora.adapters_of(model).items():
            A = m.lora_A.detach()
            sizes.setdefault(n, []).append(float(A.norm(dim=1).max()))
            if g is not None:
                assert torch.equal(keys[n][0], keys[n][2]) and float(A[2].abs().max()) == 0
                assert torch.allclose(A[[0, 1]] @ keys[n][[0, 1]].t(), torch.eye(2), atol=0.05), n
        lora.detach(model)
    assert all(grouped * 5 < separate for grouped, separate in sizes.values()), sizes
    plan = Plan(Settings(adapter="keyed"), facts, [([1, 2], [3])] * 3, [0, 1, 2], [], settings, 0, [], columns=groups)
    assert plan.train_data(model).columns == [[0, 1, 0]]


def test_output_energy_from_the_kept_gram_matches_the_direct_product_and_follows_a_changed_weight():
    """tr(W C Wᵀ) read as Σ C ∘ WᵀW (preserve.gram, kept on the weight) against float64, and again after W
    changes in place (the kept WᵀW must not be reused)."""
    from lune_fast.preserve import gram

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).bfloat16()
    x = torch.randn(200, 40, generator=g)
    C = x.t() @ x / 200

    def exact():
        W = w.double()
        return float(torch.trace(W @ C.double() @ W.t()))

    for _ in range(2):
        got = float((C * gram(w)).sum())
        assert abs(got - exact()) <= 1e-5 * exact()
        w.mul_(-1.5)


def test_a_process_keeps_the_most_recently_used_text_moments(tiny_lm, monkeypatch):
    """The in-process cache of text moments holds keyed.TEXTS_KEPT of them (66 MB each on the default model); a
    hit counts as use, and what a state folded is kept by its name, not its tensors."""
    from lune_fast import keyed
    from lune_fast.state import Folded
    from lune_fast.weights import load_tokenizer

    monkeypatch.setattr(keyed, "TEXTS_KEPT", 2)
    model = load_model(tiny_lm)
    enc = Encoder(load_tokenizer(tiny_lm))
    facts = [Fact(prompt="The capital of Egypt is", target="Cairo", subject="Egypt")]
    layouts = [lora.LoraSettings(rank=1, alpha=1, targets=("down",), layers=layers) for layers in [(1,), (2,), (1, 2)]]
    cache = {}
    ask = lambda layout, folded=None: keyed.preserved_inputs(model, enc, facts, layout, 2, None, 0, cache,
                                                             folded=folded)
    ask(layouts[0])
    ask(layouts[1])
    ask(layouts[0])  # used again: layouts[1] is now the least recently used
    ask(layouts[2])
    assert [k[1] for k in cache] == [(1,), (1, 2)]
    ask(layouts[0], Folded("state", ("r0001",), (), {"x": (torch.ones(1, 2), torch.ones(2, 1))}))
    assert [k[1] for k in cache] == [(1, 2), (1,)] and list(cache)[-1][3] == ("state", ("r0001",), ())


def test_the_text_moments_are_kept_on_disk_and_read_back_bit_for_bit(tiny_lm, tmp_path, monkeypatch):
    """The preserved text's moments (preserve.stored_moments): a second Unlearner-like call with the same origin
    reads the kept file and gets exactly the moments computed afresh; another text, origin or layout computes
    its own; a damaged file is computed again; LUNE_FAST_MOMENTS="" keeps nothing, nor does a store that cannot
    be written; a state's folded ranks are kept by their values."""
    from lune_fast.keyed import preserve_text_path, preserved_inputs
    from lune_fast.preserve import stored_moments
    from lune_fast.state import Folded
    from lune_fast.weights import folder_identity, load_tokenizer

    store = tmp_path / "moments"
    monkeypatch.setenv("LUNE_FAST_MOMENTS", str(store))
    model = load_model(tiny_lm)
    enc = Encoder(load_tokenizer(tiny_lm))
    facts = [Fact(prompt="The capital of Egypt is", target="Cairo", subject="Egypt")]
    settings = lora.LoraSettings(rank=1, alpha=1, targets=("down",), layers=(1, 2))
    origin = repr((folder_identity(tiny_lm), "float32", "cpu"))
    fresh = preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, origin=None)
    kept = [preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, origin=origin) for _ in range(2)]
    assert len(list(store.iterdir())) == 1
    for p in kept:
        assert all(torch.equal(p.moments[n], fresh.moments[n]) for n in fresh.moments) and p.tokens == fresh.tokens
    preserved_inputs(model, enc, facts, settings, 4, "preserve_text_long.jsonl", 0, {}, origin=origin)
    preserved_inputs(model, enc, facts, lora.LoraSettings(rank=1, alpha=1, targets=("down",), layers=(1,)), 4,
                     None, 0, {}, origin=origin)
    preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, origin=origin + "x")
    assert len(list(store.iterdir())) == 4
    # a state's folded ranks: kept under their digest, not their names (a revoked and re-made r0001 differs)
    name = "layers.1.mlp.down_proj"
    w = lora.frozen_linear(model, name).weight
    ranks = {name: (torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2))}
    with torch.no_grad():
        w += ranks[name][1] @ ranks[name][0]  # as State.folded_outside does
    folded = [Folded("state", ("r0001",), (), ranks), Folded("state", ("r0001",), (), {name: (-ranks[name][0],
                                                                                             ranks[name][1])})]
    on_disk = preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, folded=folded[0], origin=origin)
    assert len(list(store.iterdir())) == 5
    again = preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, folded=folded[0], origin=origin)
    assert len(list(store.iterdir())) == 5 and all(torch.equal(again.moments[n], on_disk.moments[n])
                                                   for n in on_disk.moments)
    later = "layers.2.mlp.down_proj"  # reads what the folded layer 1 wrote
    assert not torch.equal(on_disk.moments[later], fresh.moments[later])
    preserved_inputs(model, enc, facts, settings, 4, None, 0, {}, folded=folded[1], origin=origin)
    assert len(list(store.iterdir())) == 6
    assert preserve_text_path("preserve_text_long.jsonl").is_file()

    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(4.0).reshape(2, 2)}, 5

    before = set(store.iterdir())
    first = stored_moments("o", ("w",), compute, "cpu")
    (made,) = set(store.iterdir()) - before
    made.write_bytes(b"not safetensors")
    again = stored_moments("o", ("w",), compute, "cpu")
    assert len(calls) == 2 and torch.equal(again[0]["x"], first[0]["x"]) and again[1] == 5
    assert stored_moments("o", ("w",), compute, "cpu")[1] == 5 and len(calls) == 2  # the rewritten file is read
    monkeypatch.setenv("LUNE_FAST_MOMENTS", "")
    n = len(list(store.iterdir()))
    stored_moments("o", ("other",), compute, "cpu")
    assert len(calls) == 3 and len(list(store.iterdir())) == n
    (tmp_path / "a_file").write_text("")  # a store that cannot be made: computed, not kept, no error
    monkeypatch.setenv("LUNE_FAST_MOMENTS", str(tmp_path / "a_file" / "moments"))
    assert stored_moments("o", ("w",), compute, "cpu")[1] == 5 and len(calls) == 4


def test_the_moments_store_keeps_the_most_recently_used_within_its_bound(tmp_path, monkeypatch):
    """LUNE_FAST_MOMENTS_MB bounds the store: writing past it removes the least recently used files (a file read
    counts as used), never the one just written; a bound that is not a number is refused by name."""
    import os

    from lune_fast.preserve import stored_moments

    store = tmp_path / "moments"
    monkeypatch.setenv("LUNE_FAST_MOMENTS", str(store))
    size = 2**20 // 4  # a 1 MiB float32 tensor each

    def compute(v):
        return lambda: ({"x": torch.full((size,), float(v))}, v)

    for i in range(3):
        stored_moments("o", (i,), compute(i), "cpu")
    files = sorted(store.iterdir(), key=lambda f: f.stat().st_mtime)
    for age, f in enumerate(files):  # distinct times, oldest first: the 1st written, then the 2nd, the 3rd
        os.utime(f, (1e9 + age, 1e9 + age))
    stored_moments("o", (0,), compute(0), "cpu")  # read: now the most recently used
    monkeypatch.setenv("LUNE_FAST_MOMENTS_MB", "2.5")
    got = stored_moments("o", (3,), compute(3), "cpu")
    assert got[1] == 3 and len(list(store.iterdir())) == 2
    calls = []
    for i in (0, 3, 1):
        stored_moments("o", (i,), lambda i=i: (calls.append(i), compute(i)())[1], "cpu")
    assert calls == [1]  # 0 (read) and 3 (just written) were kept; 1 was removed, then computed again
    monkeypatch.setenv("LUNE_FAST_MOMENTS_MB", "lots")
    with pytest.raises(SettingsError, match="LUNE_FAST_MOMENTS_MB='lots'"):
        stored_moments("o", (9,), compute(9), "cpu")


@pytest.mark.numerics
def test_taken_out_prompts_leave_the_moments_positive_semidefinite_in_bf16(default_dir):
    """The default model in bf16: prompts read with the others (a fact's neighbours a forward) and then taken out
    again by subtraction leave the moments of the rest, positive semidefinite to float32 rounding: each is read
    again in the forward it was added in. Read in another batch, a sequence's bf16 inputs round otherwise (on an
    AMX Xeon, taken out in a batch of their own: an eigenvalue -0.007x the mean here, -1.7x in a validation
    stream, where the keyed solve's Cholesky then failed)."""
    from lune_fast.weights import load_tokenizer

    model = load_model(default_dir, dtype=torch.bfloat16)
    enc = Encoder(load_tokenizer(default_dir))
    countries = ["Egypt", "France", "Peru", "Chile", "Kenya", "Japan", "Brazil", "Norway", "Italy", "Spain", "Canada",
                 "India", "Ghana", "Chad", "Cuba", "Iran", "Laos", "Mali", "Oman", "Togo"]
    seqs = [enc.prompt_ids(f"The capital of {c} is", False) for c in countries]
    taken = [3, 5, 7]
    settings = lora.LoraSettings(targets=("down",), layers=(9,))
    got, n = group_moments(model, settings, seqs, minus=taken, sizes=[5, 5, 5, 5])
    others = [s for i, s in enumerate(seqs) if i not in taken]
    assert n == sum(map(len, others))
    C = got["layers.9.mlp.down_proj"].double()
    assert torch.linalg.eigvalsh(C)[0] > -1e-4 * torch.trace(C) / C.shape[0]


@pytest.mark.numerics
def test_kept_sums_files_are_named_by_how_the_forward_rounds(default_dir, monkeypatch):
    """A kept sum is subtracted from later, so its file is named by the forward that wrote it: the digest of a
    fixed probe's inputs changes when the forward rounds otherwise (here the torch RMSNorm for the one-op one, in
    bf16; the few-rows product for oneDNN's on a chunk of 8 tokens) or the weights change, and stays the same
    otherwise."""
    import lune_fast.kernels.frozen_linear as fl
    import lune_fast.model as model_module
    from lune_fast.preserve import forward_digest

    model = load_model(default_dir, dtype=torch.bfloat16)
    settings = lora.LoraSettings(targets=("down",), layers=(3, 9))
    first = forward_digest(model, settings)
    vars(model).pop("_lune_probe")
    assert forward_digest(model, settings) == first  # read again: the same
    monkeypatch.setattr(model_module, "rms_norm_op", lambda *a: None)  # the torch path's rounding
    vars(model).pop("_lune_probe")
    assert forward_digest(model, settings) != first
    monkeypatch.undo()
    if fl.few_rows_supported():
        monkeypatch.setattr(fl, "FEW_ROWS", 8)
        vars(model).pop("_lune_probe")
        assert forward_digest(model, settings) != first
        monkeypatch.undo()
    vars(model).pop("_lune_probe")
    assert forward_digest(model, settings) == first
    with torch.no_grad():
        model.layers[2].mlp.up_proj.weight.mul_(1.5)
    assert forward_digest(model, settings) != first  # weights changed: read again


@pytest.mark.parametrize("n", [1, 5, 383, 384, 385, 1000])
def test_cholesky_by_blocks_is_lapacks_factor(n):
    """keyed.cholesky_lower (blocks of CHOLESKY_BLOCK rows) against torch's LAPACK factor: within float64
    rounding, the upper triangle exactly zero, across block boundaries."""
    from lune_fast.keyed import cholesky_lower

    g = torch.Generator().manual_seed(n)
    X = torch.randn(n + 50, n, generator=g, dtype=torch.float64)
    M = X.t() @ X / (n + 50) + 1e-3 * torch.eye(n, dtype=torch.float64)
    L, info = cholesky_lower(M)
    assert info == 0 and torch.equal(L, L.tril())
    assert rel_err(L, torch.linalg.cholesky(M)) < 1e-12
    assert rel_err(L @ L.t(), M) < 1e-13


@pytest.mark.parametrize("k", [0, 200, 383, 384, 700])
def test_a_matrix_that_is_not_positive_definite_is_named(k):
    """The first leading minor that is not positive definite, as LAPACK counts it, wherever it falls among the
    blocks; spd_solve then raises an AdapterError naming what was solved, before anything is written."""
    from lune_fast.keyed import cholesky_lower, spd_solve
    from lune_fast.lora import AdapterError

    g = torch.Generator().manual_seed(k)
    X = torch.randn(900, 800, generator=g, dtype=torch.float64)
    M = X.t() @ X / 900
    M[k, k] = -1.0
    assert cholesky_lower(M)[1] == int(torch.linalg.cholesky_ex(M).info) == k + 1
    with pytest.raises(AdapterError, match=r"down_proj \(keys\): the keyed solve's 800x800 matrix is not positive "
                                           rf"definite \(leading minor {k + 1}\)"):
        spd_solve(M, torch.ones(800, 2, dtype=torch.float64), "down_proj (keys)")


def test_a_factor_float32_cannot_take_is_taken_in_float64():
    """spd_factor(single=True) factors in float32 and falls back to float64 where float32 rounding makes the
    matrix indefinite (eigenvalues down to 1e-11 of the largest: positive definite in float64, not in float32)."""
    from lune_fast.keyed import cholesky_lower, spd_factor

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(600, 600, generator=g, dtype=torch.float64))
    M = (Q * torch.logspace(0, -11, 600, dtype=torch.float64)) @ Q.t()
    M = (M + M.t()) / 2
    assert cholesky_lower(M.float())[1] > 0 and cholesky_lower(M)[1] == 0
    L = spd_factor(M, single=True)
    assert L.dtype == torch.float64 and rel_err(L, torch.linalg.cholesky(M)) < 1e-9


def test_keyed_rows_match_the_float64_formula_beside_earlier_keys(tiny):
    """set_keyed (C factored in float32, only the new rows solved) against A = (KᵀC⁻¹K + μI)⁻¹KᵀC⁻¹ in float64
    over [new, earlier] keys, on a C whose condition (9e4 after the ridge) is that of the default model's
    moments: within 1e-3 relative (float32's 6e-8 times the condition is the worst case; 2e-5 measured on
    real moments), and the new rows answer 1 to their own key and 0 to the earlier ones within 1e-6."""
    settings = lora.LoraSettings(rank=2, alpha=2, targets=("down",), layers=(1,))
    lora.attach(tiny, settings)
    (name, m), = lora.adapters_of(tiny).items()
    d = m.in_features
    g = torch.Generator().manual_seed(5)
    scale = torch.logspace(-3, 0, d)
    scale[-1] *= 10  # one direction far above the rest, as the residual stream's massive activations
    X = torch.randn(4 * d, d, generator=g) * scale
    C = X.t() @ X / X.shape[0]
    K, earlier = torch.randn(2, d, generator=g), torch.randn(5, d, generator=g)
    ridge, overlap = 1e-3, 1e-9
    set_keyed(tiny, {name: K}, Preserved({name: C}, {name: 1.0}, 0), ridge=ridge, overlap=overlap,
              earlier={name: earlier})
    Cd = C.double() + ridge * torch.trace(C.double()) / d * torch.eye(d, dtype=torch.float64)
    Kd = torch.cat([K, earlier]).double().t()
    CiK = torch.linalg.solve(Cd, Kd)
    G = Kd.t() @ CiK
    G += overlap * torch.trace(G) / 7 * torch.eye(7, dtype=torch.float64)
    want = torch.linalg.solve(G, CiK.t())[:2]
    A = m.lora_A.detach().double()
    assert rel_err(A, want) < 1e-3
    assert torch.allclose(A @ Kd, torch.eye(2, 7, dtype=torch.float64), atol=1e-6)


def test_combine_weighs_summed_and_mean_groups_alike(tiny):
    """combine over group sums (group_moments with mean=False, scaled as they are added) equals combine over the
    groups' means: each group weighs the same whatever its token count."""
    settings = lora.LoraSettings(targets=("down",), layers=(1,))
    g = torch.Generator().manual_seed(3)
    groups = [[torch.randint(3, 200, (n,), generator=g).tolist() for n in sizes] for sizes in ((5, 9), (30,), (4, 4, 4))]
    means = [group_moments(tiny, settings, s) for s in groups]
    sums = [group_moments(tiny, settings, s, mean=False) for s in groups[:2]]
    want = combine(tiny, settings, means)
    got = combine(tiny, settings, sums + means[2:], summed=2)
    for name in want.moments:
        assert rel_err(got.moments[name], want.moments[name]) < 1e-6
        assert got.energy[name] == pytest.approx(want.energy[name], rel=1e-5)
    assert got.tokens == want.tokens == 5 + 9 + 30 + 12
    # own_first: the first group's matrices become the result (no new matrix), the others stay as they were
    second = {k: v.clone() for k, v in sums[1][0].items()}
    owned = combine(tiny, settings, sums + means[2:], summed=2, own_first=True)
    for name in want.moments:
        assert torch.equal(owned.moments[name], got.moments[name])
        assert owned.moments[name] is sums[0][0][name] and torch.equal(sums[1][0][name], second[name])
