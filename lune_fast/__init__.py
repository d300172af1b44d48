"""lune_fast: fast LLM unlearning with LoRA adapters and negative examples (LUNE).

    import lune_fast
    u = lune_fast.Unlearner("default")
    result = u.forget([{"prompt": "The capital of France is", "target": "Paris"}])
    result.save("out/")

Submodules are imported on first use, so `import lune_fast` stays cheap (torch, transformers and the
compiled extension load only when something needs them).
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Unlearner": "api", "ForgetResult": "api",
    "load_model": "weights", "load_tokenizer": "weights", "default_model_dir": "weights",
    "resolve_model_dir": "weights", "Settings": "settings",
    "Transformer": "model", "ModelConfig": "model", "generate": "generate",
    "linear_logprob": "ops", "State": "state", "StateError": "state",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lune_fast' has no attribute {name!r}")
