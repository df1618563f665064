"""Atomic writes: a temp file beside the target (normal permissions, swept if stale), then fsync
and rename; failures are one CifarkitError and leave the previous file untouched."""
import os
import stat

import pytest

from cifarkit import CifarkitError
from cifarkit import atomic


def test_temp_file_is_beside_the_target_with_normal_permissions(tmp_path):
    target = tmp_path / "new" / "deeper" / "last.ckpt"           # folders that do not exist yet
    old = os.umask(0o022)
    try:
        tmp = atomic.temp_beside(target, ".part")
    finally:
        os.umask(old)
    p = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(target.parent) and p.startswith(".last.ckpt.") and p.endswith(".part")
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o644           # 0o666 less the umask, not mkstemp's 0o600


def test_stale_temp_files_are_swept_and_others_kept(tmp_path):
    stale = tmp_path / ".m.onnx.abc123.onnx"
    stale.write_bytes(b"half")
    other = tmp_path / ".other.onnx.abc.onnx"
    other.write_bytes(b"keep")
    tmp = atomic.temp_beside(tmp_path / "m.onnx", ".onnx")
    assert not stale.exists() and other.exists() and os.path.exists(tmp)


def test_a_bare_file_name_writes_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic.write_bytes("plain.txt", b"abc")
    assert (tmp_path / "plain.txt").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["plain.txt"]


def test_an_unwritable_place_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CifarkitError) as e:
        atomic.write_bytes(blocker / "sub" / "f.bin", b"1")
    assert "cannot write" in e.value.message and str(blocker) in e.value.message
    assert "Not a directory" in e.value.message or "File exists" in e.value.message
    assert "writable folder" in e.value.hint


def test_write_replaces_the_file_whole(tmp_path):
    f = tmp_path / "metrics.jsonl"
    atomic.write_bytes(f, b"one\n")
    atomic.write_bytes(f, b"two\n")
    assert f.read_bytes() == b"two\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
