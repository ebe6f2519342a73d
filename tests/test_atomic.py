"""Write-then-rename: a failed write leaves nothing behind, a finished one replaces the old output whole."""

import os

import pytest

from instune.atomic import atomic_dir, write_text


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    with atomic_dir(final) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old directories left


def test_write_text_uses_normal_permissions(tmp_path):
    path = write_text(tmp_path / "sub" / "f.txt", "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
