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


def test_random_batches_are_seeded_disjoint_and_full():
    """bench quality --batch-size: the same seed gives the same batches; each batch is full (a last, smaller one
    is left out) and no record is in two batches."""
    from lune_fast.bench.quality import batches_of

    records = [{"prompt": f"p{i}"} for i in range(84)]
    got = batches_of(records, 24, seed=0)
    assert [len(b) for b in got] == [24, 24, 24]
    seen = [r["prompt"] for b in got for r in b]
    assert len(set(seen)) == 72
    assert batches_of(records, 24, seed=0) == got and batches_of(records, 24, seed=1) != got
    assert got[0] != records[:24]  # shuffled, not the file's order


def test_llamacpp_batches_pool_by_counts_not_by_averaging_rates():
    """Pooled recall is every batch's hits over every batch's prompts: 9 of 10 and 30 of 30 neighbours kept
    pool to 39/40, where the mean of the rates would say 0.95."""
    from lune_fast.bench.llamacpp import pooled

    def row(kept, n):
        return {"base": "q4_0 export", "deployed": "merged (--gguf)", "forget": 0.0, "forget_n": 32,
                "paraphrase": 0.5, "paraphrase_n": 2 * n, "neighbours_kept": kept, "neighbours_kept_n": n}

    (p,) = pooled([row(0.9, 10), row(1.0, 30)])
    assert p["batches"] == 2 and p["neighbours_kept_n"] == 40 and p["forget_n"] == 64
    assert p["neighbours_kept"] == 39 / 40 and p["paraphrase"] == 0.5 and p["forget"] == 0.0
