"""lune_fast.kernels, as a source checkout (`pip install -e .`) sees it: the Triton kernels live in the
top-level kernels/ folder, which setup.py installs as this subpackage (package_dir) when it builds a wheel.

kernels/ has no __init__.py on purpose. Hugging Face's `kernels` distribution (transformers >= 5 imports it)
has the same top-level name, and wherever the repository root is on sys.path (`python -m pytest`, `python -c`
run in the clone) a regular package there would shadow it. A folder without __init__.py is only a namespace
portion, which never wins over an installed package; this file points the subpackage's path at it instead.
"""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
