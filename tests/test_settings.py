"""Settings: the measured defaults fill what is left at None, bad values are refused, and every trainer
setting is carried into the run."""
from dataclasses import fields

import pytest

from lune_fast.settings import MODE_DEFAULTS, Settings, SettingsError, train_settings
from lune_fast.trainer import TrainSettings


def test_every_trainer_setting_comes_from_the_run_settings():
    values = {"objective": "ul", "lr": 0.123, "steps": 17, "beta": 0.7, "stop_prob": 0.011, "replace_prob": 0.77,
              "grad_clip": 2.5, "weight_decay": 0.05, "warmup_steps": 3, "schedule": "cosine", "seed": 9,
              "per_example_stop": True, "retain_weight": 4.0, "retain_loss": "kl", "preserve_weight": 0.3,
              "checkpoint_every": 5, "hold_done": True, "hold_margin": 0.3, "optimizer": "column"}
    ts = train_settings(Settings(mode="replace", **values))
    names = {f.name for f in fields(TrainSettings)}
    # a new trainer setting must be added here and to train_settings
    assert names == set(values) | {"replace", "retain_keep"}
    assert ts.replace is True
    for name, v in values.items():
        assert getattr(ts, name) == v, name
        assert v != getattr(TrainSettings(), name), f"{name}: pick a value that is not the default"
    assert train_settings(Settings(steps=30, lr=1.0), steps=4).steps == 4  # a continuation's budget
    assert ts.retain_keep == () and train_settings(Settings(lr=1.0), retain_keep=[0.5, 0.2]).retain_keep == (0.5, 0.2)


@pytest.mark.parametrize("mode,adapter", sorted(MODE_DEFAULTS))
def test_defaults_fill_only_what_is_unset(mode, adapter):
    s = Settings(mode=mode, adapter=adapter).resolved()
    for key, value in MODE_DEFAULTS[(mode, adapter)].items():
        assert getattr(s, key) == value, key
    mine = Settings(mode=mode, adapter=adapter, lr=0.5, objective="ga").resolved()
    assert mine.lr == 0.5 and mine.objective == "ga"
    s.check()


def test_default_adapter_is_keyed_but_plain_under_fsdp_and_for_chat_questions():
    assert Settings().resolved().adapter == "keyed"
    assert Settings().resolved(sharded=True).adapter == "plain" and Settings().resolved(chat=True).adapter == "plain"
    assert Settings(adapter="keyed").resolved(chat=True).adapter == "keyed"  # asked for: kept


def test_keyed_adapters_take_column_steps_and_asking_for_another_optimiser_gives_its_own_step():
    from lune_fast.settings import KEYED_LR

    s = Settings().resolved()
    assert (s.optimizer, s.lr) == ("column", KEYED_LR["column"]["suppress"])
    for mode in ("suppress", "replace"):  # each mode's default step is its default optimiser's entry
        s = Settings(mode=mode).resolved()
        assert s.lr == KEYED_LR[MODE_DEFAULTS[(mode, "keyed")]["optimizer"]][mode]
    assert (Settings(optimizer="adamw").resolved().lr, Settings(optimizer="adamw", lr=0.5).resolved().lr) == \
        (KEYED_LR["adamw"]["suppress"], 0.5)  # an lr asked for is kept
    assert Settings(mode="replace").resolved().optimizer == "settle"
    assert Settings(mode="replace", optimizer="adamw").resolved().lr == KEYED_LR["adamw"]["replace"]
    plain_settle = Settings(mode="replace", optimizer="settle", adapter="plain").resolved()
    assert plain_settle.lr == 1e-3  # the plain default: no keyed step for an adapter that check() refuses
    with pytest.raises(SettingsError, match="keyed"):
        plain_settle.check()
    for mode, adapter in (("suppress", "plain"), ("replace", "plain")):
        assert Settings(mode=mode, adapter=adapter).resolved().optimizer == "adamw"


@pytest.mark.parametrize("bad,match", [({"mode": "erase"}, "mode must be"), ({"objective": "kl"}, "objective"),
                                       ({"schedule": "linear"}, "schedule"), ({"prompt_variants": 9}, "0-3"),
                                       ({"recall_rounds": -1}, "recall_rounds"), ({"optimizer": "sgd"}, "optimizer"),
                                       ({"optimizer": "column", "adapter": "plain"}, "keyed adapter"),
                                       ({"optimizer": "settle", "adapter": "plain"}, "keyed adapter"),
                                       ({"check_dtypes": "float32,fp8"}, "check_dtypes: expected")])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(SettingsError, match=match):
        Settings(**bad).resolved().check()


def test_micro_batches_under_fsdp_are_as_many_on_every_rank():
    """Sharded blocks all-gather in every forward: ranks must run the same number of micro-batches."""
    from lune_fast.distributed import Dist
    from lune_fast.plan import micro_batches

    pairs = [([1] * n, [2]) for n in (30, 5, 30, 5, 30, 5, 5)]  # rank 0 gets the three long ones
    plain = [len(micro_batches(pairs, 40, Dist(r, 2))) for r in (0, 1)]
    fsdp = [micro_batches(pairs, 40, Dist(r, 2, fsdp=True)) for r in (0, 1)]
    assert plain[0] != plain[1] and len(fsdp[0]) == len(fsdp[1])
    assert sorted(p for r in fsdp for g in r for p in map(id, g)) == sorted(map(id, pairs))  # every pair, once


def test_robust_to_names_its_types_and_needs_the_recall_rounds():
    from lune_fast.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="robust_to must be one of"):
        Settings(robust_to="q3_k").resolved().check()
    with pytest.raises(SettingsError, match="recall rounds"):
        Settings(robust_to="q4_1", recall_rounds=0).resolved().check()
    with pytest.raises(SettingsError, match="recall rounds"):
        Settings(robust_to="q4_1", mode="replace").resolved().check()
    Settings(robust_to="q4_1").resolved().check()


@pytest.mark.parametrize("adapter", ["keyed", "plain"])
def test_keyed_data_names_each_sequence_s_column(tiny_llama, adapter):
    """A keyed request's batches say which column of B (which fact) each sequence trains, across micro-batches
    and for pairs given with their owners (the recall rounds'); plain adapters have no columns."""
    from lune_fast import lora
    from lune_fast.plan import Plan
    from lune_fast.weights import load_model

    model = load_model(tiny_llama)
    pairs = [([3 + i] * (5 + 3 * i), [7, 8]) for i in range(6)]
    owners = [0, 0, 1, 2, 2, 3]
    s = Settings(adapter=adapter, max_batch_tokens=30).resolved()
    plan = Plan(s, [], pairs, owners, [], lora.LoraSettings(rank=4, targets=("down",), layers=(1,)), 0, [])
    data = plan.train_data(model)
    assert len(data.batches) > 1
    if adapter == "plain":
        assert data.columns is None
        return
    # a batch's sequences are its pairs, in order: their prompts say which pair each is
    got = [(b.pairs[j][0][0] - 3, col) for b, cols in zip(data.batches, data.columns) for j, col in enumerate(cols)]
    assert got == [(i, owners[i]) for i in range(6)]
    again = plan.train_data(model, pairs[4:], owners=[9, 8])
    assert [c for cols in again.columns for c in cols] == [9, 8]


def test_check_dtypes_default_to_float32_below_float32_only():
    import torch

    from lune_fast.settings import check_dtypes

    assert check_dtypes(Settings(), torch.bfloat16) == [torch.float32]
    assert check_dtypes(Settings(), torch.float16) == [torch.float32]
    assert check_dtypes(Settings(), torch.float32) == []
    assert check_dtypes(Settings(check_dtypes="none"), torch.bfloat16) == []
    both = Settings(check_dtypes="float16,float32,bfloat16")
    assert check_dtypes(both, torch.bfloat16) == [torch.float16, torch.float32]  # never the training dtype
