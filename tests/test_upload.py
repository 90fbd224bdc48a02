"""The staging buffer behind every host-to-device table upload (fsam_fused/upload.py)."""

import pytest
import torch

from fsam_fused import upload


class QueryRefused:
    """An event that must not be asked: inside a capture, a query invalidates the capture."""

    def query(self) -> bool:
        raise AssertionError("the staging buffer queried an event during a CUDA graph capture")


class QueryAnswered:
    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


@pytest.fixture
def staging(monkeypatch):
    """A Staging whose pinned buffers are plain CPU tensors (no GPU here)."""
    monkeypatch.setattr(upload, "pinned", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    return upload.Staging()


def test_a_capture_takes_a_new_buffer_without_asking_whether_the_last_copy_finished(staging):
    out = torch.empty(3)
    eager = staging._buffer_for(torch.zeros(3), out, captured=False)
    staging._done = QueryRefused()
    captured = staging._buffer_for(torch.zeros(3), out, captured=True)
    assert captured is not eager


@pytest.mark.parametrize("done", [True, False])
def test_an_eager_upload_reuses_the_buffer_only_once_its_copy_finished(staging, done):
    out = torch.empty(3)
    first = staging._buffer_for(torch.zeros(3), out, captured=False)
    staging._done = QueryAnswered(done)
    second = staging._buffer_for(torch.zeros(3), out, captured=False)
    assert (second is first) == done
