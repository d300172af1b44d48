"""The benchmark harness's record of what was measured: the commit, and whether the tree differed from it."""
import subprocess

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
