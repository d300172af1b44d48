"""Causal tracing: where the facts live in the frozen model."""
from lune_fast.data import Encoder, Fact
from lune_fast.locate import choose_layers, trace


def test_causal_trace_finds_mid_layers(default_model, tokenizer):
    enc = Encoder(tokenizer)
    facts = [Fact(prompt="The capital city of Japan is", target="Tokyo"),
             Fact(prompt="The capital city of Italy is", target="Rome")]
    effect, n = trace(default_model, enc, facts)
    assert n == 2 and effect.shape == (30,)
    # restoring the subject's state late (after the answer is read out) brings nothing back
    assert float(effect[-3:].mean()) < float(effect[:15].max())
    layers = choose_layers(effect, 5)
    assert len(layers) == 5 and layers == tuple(range(layers[0], layers[0] + 5)) and layers[0] < 20
