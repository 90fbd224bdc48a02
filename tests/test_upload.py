"""The staging buffers behind every host-to-device table upload (fsam_fused/upload.py).

No GPU here: a stand-in device table records what each copy read, and the fakes of the
device's side say whether a capture is under way and whether the copies so far finished.
"""

import gc
import weakref

import pytest
import torch

from fsam_fused import upload


class FakeDevice:
    def __init__(self) -> None:
        self.capturing = False
        self.copies_finished = True
        self.allocated_while_capturing = 0
        self.allocations = 0

    def event(self, device: torch.device) -> "FakeEvent":
        return FakeEvent(self)

    def pinned(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        self.allocations += 1
        self.allocated_while_capturing += self.capturing
        return torch.full(shape, -1.0, dtype=dtype)


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def query(self) -> bool:
        # A query during a capture invalidates the capture (cudaErrorStreamCaptureUnsupported).
        assert not self.device.capturing, "an event was queried during a CUDA graph capture"
        return self.device.copies_finished


class DeviceTable:
    """Stands for a CUDA tensor: what upload reads of one, and the host buffer of each copy."""

    def __init__(self, n: int) -> None:
        self.shape = torch.Size([n])
        self.dtype = torch.float32
        self.device = torch.device("cuda", 0)
        self.sources: list[torch.Tensor] = []

    def copy_(self, source: torch.Tensor, non_blocking: bool = False) -> None:
        assert non_blocking, "a copy from the host that waits for the device"
        self.sources.append(source)


@pytest.fixture
def device(monkeypatch) -> FakeDevice:
    fake = FakeDevice()
    monkeypatch.setattr(upload, "capturing", lambda device: fake.capturing)
    monkeypatch.setattr(upload, "copy_finished_event", fake.event)
    monkeypatch.setattr(upload, "pinned", fake.pinned)
    return fake


def test_a_capture_after_an_eager_upload_queries_and_allocates_nothing(device):
    staging, table = upload.Staging(), DeviceTable(3)
    device.copies_finished = False
    staging.upload([1.0, 2.0, 3.0], table)
    device.capturing = True
    staging.upload([4.0, 5.0, 6.0], table)
    assert device.allocated_while_capturing == 0
    assert table.sources[-1].tolist() == [4.0, 5.0, 6.0]
    assert table.sources[-1] is not table.sources[0]


def test_what_a_capture_recorded_keeps_its_values_through_later_uploads(device):
    staging, table = upload.Staging(), DeviceTable(2)
    staging.upload([1.0, 1.0], table)
    device.capturing = True
    staging.upload([2.0, 2.0], table)
    replayed = table.sources[-1]
    device.capturing = False
    for value in (3.0, 4.0, 5.0):
        staging.upload([value, value], table)
    device.capturing = True
    staging.upload([6.0, 6.0], table)
    assert replayed.tolist() == [2.0, 2.0]
    assert table.sources[-1].tolist() == [6.0, 6.0]


def test_a_buffer_a_capture_recorded_lives_as_long_as_the_staging(device):
    staging, table = upload.Staging(), DeviceTable(2)
    staging.upload([1.0, 1.0], table)
    device.capturing = True
    staging.upload([2.0, 2.0], table)
    recorded = weakref.ref(table.sources.pop())
    device.capturing = False
    for value in (3.0, 4.0):
        staging.upload([value, value], table)
    table.sources.clear()
    gc.collect()
    assert recorded() is not None and recorded().tolist() == [2.0, 2.0]


def test_a_reserved_table_is_first_uploaded_inside_a_capture_without_an_allocation(device):
    staging, table = upload.Staging(), DeviceTable(3)
    staging.reserve(table)
    device.capturing = True
    staging.upload([4.0, 5.0, 6.0], table)
    assert device.allocated_while_capturing == 0
    assert table.sources[-1].tolist() == [4.0, 5.0, 6.0]


def test_an_eager_buffer_is_rewritten_only_once_the_device_has_read_it(device):
    staging, table = upload.Staging(), DeviceTable(2)
    device.copies_finished = False
    staging.upload([1.0, 1.0], table)
    staging.upload([2.0, 2.0], table)
    assert table.sources[0].tolist() == [1.0, 1.0]
    device.copies_finished = True
    allocations = device.allocations
    for value in (3.0, 4.0, 5.0):
        staging.upload([value, value], table)
    assert device.allocations == allocations  # the steady state allocates nothing
    assert table.sources[-1].tolist() == [5.0, 5.0]


def test_on_the_cpu_an_upload_is_a_plain_copy():
    out = torch.zeros(2, 2)
    upload.Staging().upload([[1, 2], [3, 4]], out)
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]
