"""Data shipped with the package (facts for the demo, retain and preservation text, refusals, the subject
bank), written for the project."""
from importlib import resources
from pathlib import Path


def asset(name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(name)))
