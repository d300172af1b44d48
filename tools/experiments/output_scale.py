"""How large the adapted projection's output is on ordinary text, per layer: the scale a LoRA B step is measured
against. A keyed B step of `lr` moves each written entry by about lr whatever the model; what that does depends
on this scale (RESULTS.md section 12: Gemma 3's down_proj writes 5-8x smaller values than SmolLM2's).

    python tools/experiments/output_scale.py --model gemma3-270m [--layers 10%-30%] [--target down_proj]
"""
import argparse

import torch

from lune_fast import lora
from lune_fast.assets import asset
from lune_fast.data import read_lines
from lune_fast.weights import load_model, load_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="10%-30%")
    ap.add_argument("--texts", type=int, default=20, help="how many lines of the package's retain text")
    a = ap.parse_args()
    model, tok = load_model(a.model, dtype=torch.float32), load_tokenizer(a.model)
    layers = lora.parse_layers(a.layers, model.config.num_hidden_layers)
    outs = {i: [] for i in layers}
    hooks = [model.layers[i].mlp.down_proj.register_forward_hook(
        lambda mod, args, out, i=i: outs[i].append(out.reshape(-1, out.shape[-1]))) for i in layers]
    with torch.no_grad():
        for text in read_lines(asset("retain_text.jsonl"))[:a.texts]:
            model(torch.tensor([tok(text).input_ids]))
    for h in hooks:
        h.remove()
    print(f"{a.model}: rms of mlp.down_proj's output over {a.texts} retain lines")
    for i in layers:
        print(f"  layer {i}: {float(torch.cat(outs[i]).pow(2).mean().sqrt()):.3f}")


if __name__ == "__main__":
    main()
