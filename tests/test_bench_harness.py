"""The benchmark harness's record of what was measured: the commit, and whether the tree differed from it."""
import subprocess

import pytest

from lune_fast.bench.harness import _commit


def _git(where, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=where, check=True,
                   capture_output=True)


def test_the_commit_says_dirty_when_tracked_files_differ_from_it(tmp_path):
    assert _commit(tmp_path) == "unknown"  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not change what ran\n")
    assert _commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _commit(tmp_path) == head + "-dirty"


@pytest.mark.parametrize("replace", [False, True])
def test_the_stream_curves_are_drawn_from_the_rows_the_bench_writes(tmp_path, replace):
    pytest.importorskip("matplotlib")
    from lune_fast.bench.stream import plot

    scores = {"efficacy": 0.99, "paraphrase": 0.7, "neighbourhood": 0.8} if replace else \
        {"forget": 0.0, "para": 0.1, "indirect": 0.5}
    rows = [{"facts": n, **scores, "neigh_rel": 0.9, "ppl_rel": 1.0 + n / 1000} for n in (8, 16, 24)]
    out = tmp_path / "curves.png"
    assert plot(rows, [1.5, 2.0, 1.7], 8, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
