"""Imports run one way: no module of the package imports, directly or through others, a module that imports
it back, and the low layers (the model, the data, the ops and kernels) import nothing above them."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"lune_fast": REPO / "lune_fast", "lune_fast.kernels": REPO / "kernels"}
LOW = {"lune_fast.model", "lune_fast.data", "lune_fast.ops", "lune_fast.io", "lune_fast.assets",
       "lune_fast.kernels.lora_linear", "lune_fast.kernels.frozen_linear", "lune_fast.kernels.tma_gemm",
       "lune_fast.generate", "lune_fast.progress", "lune_fast.recompute"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((pkg, *parts))] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (function bodies too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph():
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_low_layers_import_nothing_above_them():
    allowed = LOW | {"lune_fast", "lune_fast.kernels"}
    for name, deps in _graph().items():
        if name in LOW:
            assert deps <= allowed, f"{name} imports {sorted(deps - allowed)}"


def test_every_public_name_resolves():
    import lune_fast

    for name in lune_fast.__all__:
        assert getattr(lune_fast, name) is not None, name


def test_kernels_folder_shadows_no_installed_package():
    """kernels/ shares its top-level name with Hugging Face's `kernels` distribution, which transformers >= 5
    imports when it builds a model. Run from the repository root, where `python -c` puts the root first on
    sys.path: `import kernels` must give the installed distribution (a regular package there made every
    transformers model fail with "cannot import name 'CUDAProperties'"), and lune_fast.kernels stays ours."""
    import importlib.metadata
    import json
    import subprocess
    import sys

    code = ("import json, kernels, lune_fast.kernels.lora_linear as L\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=2, vocab_size=50))\n"
            "print(json.dumps([getattr(kernels, '__file__', None), L.__file__]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, ours = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(ours) == REPO / "kernels" / "lora_linear.py"
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert theirs is None, f"`import kernels` found {theirs}, with no kernels distribution installed"
    else:
        assert theirs is not None and Path(theirs).resolve().parent != REPO / "kernels", theirs


def test_triton_is_imported_only_where_its_kernels_can_run():
    """Without a CUDA device or TRITON_INTERPRET=1 the Triton kernels cannot run: the package must not import
    triton then (73 MB and ~0.1 s at import); under the interpreter, or after the caller imported triton itself
    (the PTX compile check), the kernels are there."""
    import os
    import subprocess
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device: triton is imported, as it should be")
    pytest.importorskip("triton")
    code = ("import sys, lune_fast.api\nfrom lune_fast.kernels import tma_gemm as G\n"
            "print('triton' in sys.modules, G.HAVE_TRITON)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for prefix, interpret, expected in (("", False, "False False"), ("", True, "True True"),
                                        ("import triton\n", False, "True True")):
        run_env = {**env, "TRITON_INTERPRET": "1"} if interpret else env
        proc = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, env=run_env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[-2] == expected, (prefix, interpret, proc.stdout)
