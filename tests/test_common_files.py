"""The shared homes of issue 16: atomic writes (common/atomic.py), torn-line JSONL reading (common/jsonl.py) and
padding (common/padding.py), each tested once here for every module that uses it."""
import json
import os

import pytest
import torch

from common.atomic import atomic_open, atomic_path, write_atomic
from common.cli import InputError
from common.jsonl import drop_torn_line, read_jsonl
from common.padding import left_pad, left_pad_mask, right_pad, right_pad_mask


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "rows.jsonl"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half a ")
            raise RuntimeError("a refused row")
    assert target.read_text() == "old\n" and not (tmp_path / "rows.jsonl.partial").exists()
    write_atomic(target, b"new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_atomic_path_replaces_a_folder(tmp_path):
    out = tmp_path / "huggingface"
    (out / "stale").mkdir(parents=True)
    (tmp_path / "huggingface.partial").mkdir()  # left by a crashed write: removed first
    with atomic_path(out) as partial:
        partial.mkdir()
        (partial / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert not (tmp_path / "huggingface.partial").exists()


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_what_appears_has_the_permissions_the_umask_gives(umask, file_mode, folder_mode, tmp_path):
    """A writer that makes its files private (safetensors: 0600) or its folder with mkdtemp (0700) leaves them as a
    plain open()/mkdir() would under the umask: widened to 0644/0755 under 022, left private under 077."""
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "model") as partial:
            (partial / "sub").mkdir(parents=True, mode=0o700)
            (partial / "sub").chmod(0o700)
            for path in (partial / "model.safetensors", partial / "sub" / "part.bin"):
                path.write_bytes(b"weights")
                path.chmod(0o600)
    finally:
        os.umask(previous)
    model = tmp_path / "model"
    assert {path.name: path.stat().st_mode & 0o777 for path in [model, *model.rglob("*")]} == {
        "model": folder_mode, "sub": folder_mode, "model.safetensors": file_mode, "part.bin": file_mode}


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "re')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert path.read_text().endswith('"re')  # reading alone leaves the file as it is
    assert drop_torn_line(path) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n\n{"step": 2}\n'
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_bad_line_before_the_last_is_refused(tmp_path):
    path = tmp_path / "direct.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(InputError, match=r"direct.jsonl line 2 is not JSON"):
        read_jsonl(path)
    assert json.loads(path.read_text().splitlines()[2]) == {"index": 2}  # nothing rewritten


def test_left_and_right_padding_with_masks():
    rows = [torch.tensor([5, 6, 7]), torch.tensor([0])]  # a row may hold the pad id itself
    assert left_pad(rows, 0).tolist() == [[5, 6, 7], [0, 0, 0]]
    assert left_pad_mask([3, 1], 3).tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3]], 9).tolist() == [[1, 2], [9, 3]]
    assert right_pad(rows, 2, -1).tolist() == [[5, 6], [0, -1]]  # cut to the width
    assert right_pad_mask([3, 1], 3).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right_pad([torch.tensor([True])], 2, 0).dtype == torch.bool
