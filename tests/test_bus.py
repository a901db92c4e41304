"""The MMIO bus: routing by range, overlap refusal, and the policy for what no window serves."""

from __future__ import annotations

from typing import Any

import pytest
import structlog.testing

from tests.test_mmio_rig import RAM_BASE, EchoDevice, bring_up, make_rig
from vmmiod.bus import (
    MmioBus,
    UnknownWindowError,
    WindowOverlapError,
    WindowRangeError,
)
from vmmiod.ioreq import (
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    IoRequest,
)
from vmmiod.memory import MappedMemory
from vmmiod.mmio_regs import (
    CONFIG,
    DEVICE_ID,
    MAGIC_VALUE,
    MAGIC_VALUE_VIRT,
    QUEUE_NOTIFY,
    STATUS,
    WINDOW_SIZE,
)

BASE = 0x0200_0000


class RecordingWindow:
    """A window that remembers every access (the bus is the thing under test here)."""

    def __init__(self, answer: int = 0x1122_3344_5566_7788) -> None:
        self.answer = answer
        self.accesses: list[tuple[str, int, int, int]] = []
        self.memory: Any = None
        self.detached = 0

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, 0))
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))

    def attach(self, memory: Any) -> None:
        self.memory = memory

    def detach(self) -> None:
        self.memory = None
        self.detached += 1


class BrokenWindow(RecordingWindow):
    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("window bug")

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("window bug")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_routes_by_range_with_offsets() -> None:
    bus = MmioBus()
    wins = [RecordingWindow(answer=i) for i in range(3)]
    for i, w in enumerate(wins):  # registered out of order on purpose
        bus.register(BASE + WINDOW_SIZE * (2 - i), WINDOW_SIZE, w)
    assert bus.access(BASE + 0x10, 4, False) == 2
    assert bus.access(BASE + WINDOW_SIZE + 0x1FC, 4, False) == 1
    bus.access(BASE + 2 * WINDOW_SIZE + 0x50, 4, True, 7)
    assert wins[2].accesses == [("r", 0x10, 4, 0)]
    assert wins[1].accesses == [("r", 0x1FC, 4, 0)]
    assert wins[0].accesses == [("w", 0x50, 4, 7)]
    assert [b for b, _s, _w in bus.windows()] == [BASE, BASE + WINDOW_SIZE, BASE + 2 * WINDOW_SIZE]


def test_read_results_and_write_data_are_masked_to_size() -> None:
    bus = MmioBus()
    w = RecordingWindow(answer=0x1122_3344_5566_7788)
    bus.register(BASE, WINDOW_SIZE, w)
    assert bus.access(BASE, 1, False) == 0x88
    assert bus.access(BASE, 2, False) == 0x7788
    assert bus.access(BASE, 4, False) == 0x5566_7788
    assert bus.access(BASE, 8, False) == 0x1122_3344_5566_7788
    bus.access(BASE, 2, True, 0xABCDEF)
    assert w.accesses[-1] == ("w", 0, 2, 0xCDEF)


@pytest.mark.parametrize("base, size", [
    (BASE, WINDOW_SIZE), (BASE + 0x100, WINDOW_SIZE), (BASE - 0x100, WINDOW_SIZE),
    (BASE - 0x1000, 0x2000), (BASE + 0x1FF, 1),
])
def test_overlap_refused_with_both_ranges_named(base: int, size: int) -> None:
    bus = MmioBus()
    bus.register(BASE, WINDOW_SIZE, RecordingWindow())
    with pytest.raises(WindowOverlapError, match=f"{BASE:#x}"):
        bus.register(base, size, RecordingWindow())
    assert len(bus.windows()) == 1


def test_adjacent_windows_are_fine_and_bad_ranges_refused() -> None:
    bus = MmioBus()
    bus.register(BASE, WINDOW_SIZE, RecordingWindow())
    bus.register(BASE + WINDOW_SIZE, WINDOW_SIZE, RecordingWindow())
    bus.register(BASE - WINDOW_SIZE, WINDOW_SIZE, RecordingWindow())
    for base, size in ((BASE * 8, 0), (-1, 16), (2**64 - 8, 16)):
        with pytest.raises(WindowRangeError):
            bus.register(base, size, RecordingWindow())


def test_unregister() -> None:
    bus = MmioBus()
    w = RecordingWindow()
    bus.register(BASE, WINDOW_SIZE, w)
    bus.access(BASE, 4, False)  # now the cached window
    assert bus.unregister(BASE) is w
    assert bus.access(BASE, 4, False) == 0xFFFF_FFFF
    with pytest.raises(UnknownWindowError):
        bus.unregister(BASE)
    bus.register(BASE, WINDOW_SIZE, RecordingWindow())  # the range is free again


@pytest.mark.parametrize("size, ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF),
                                        (8, 0xFFFF_FFFF_FFFF_FFFF)])
def test_unclaimed_reads_all_ones_writes_dropped(size: int, ones: int) -> None:
    bus = MmioBus()
    w = RecordingWindow()
    bus.register(BASE, WINDOW_SIZE, w)
    assert bus.access(BASE - 0x1000, size, False) == ones
    assert bus.access(BASE + WINDOW_SIZE, size, False) == ones
    assert bus.access(0, size, False) == ones
    assert bus.access(BASE - 0x1000, size, True, 5) == 0
    assert w.accesses == []
    assert bus.unhandled == {"unclaimed": 4}


def test_access_spanning_the_end_of_a_window() -> None:
    bus = MmioBus()
    a, b = RecordingWindow(), RecordingWindow()
    bus.register(BASE, WINDOW_SIZE, a)
    bus.register(BASE + WINDOW_SIZE, WINDOW_SIZE, b)
    assert bus.access(BASE + WINDOW_SIZE - 2, 4, False) == 0xFFFF_FFFF
    bus.access(BASE + 2 * WINDOW_SIZE - 4, 8, True, 1)  # runs off the last window
    assert a.accesses == [] and b.accesses == []
    assert bus.unhandled == {"spanning": 2}


def test_unhandled_kinds_logged_once_each_and_counted() -> None:
    with structlog.testing.capture_logs() as logs:
        bus = MmioBus()
        w = RecordingWindow()
        bus.register(BASE, WINDOW_SIZE, w)
        reqs = [
            IoRequest(BASE, 4, False, 0, IOREQ_TYPE_COPY, count=4),
            IoRequest(BASE, 4, True, RAM_BASE, IOREQ_TYPE_COPY, count=1, data_is_ptr=True),
            IoRequest(0x3F8, 1, False, 0, IOREQ_TYPE_PIO),
            IoRequest(0xCF8, 4, False, 0, IOREQ_TYPE_PCI_CONFIG),
            IoRequest(0, 8, True, 12345, IOREQ_TYPE_TIMEOFFSET),
            IoRequest(BASE, 4, False, 0, 0x42),
            IoRequest(BASE, 3, False),
            IoRequest(BASE, 0, True, 1),
        ]
        answers = [bus.dispatch(r) for r in reqs * 3]
    assert answers[:4] == [0xFFFF_FFFF, 0, 0xFF, 0xFFFF_FFFF]
    assert answers[5:7] == [0xFFFF_FFFF, 0xFF_FFFF]
    assert reqs[0].data == 0xFFFF_FFFF  # reads also carry their answer in the request
    assert w.accesses == []
    assert bus.unhandled == {"rep": 3, "data_is_ptr": 3, "pio": 3, "pci_config": 3,
                             "timeoffset": 3, "unknown_type": 3, "bad_size": 6}
    logged = events(logs, "ioreq_unhandled")
    assert sorted(e["kind"] for e in logged) == sorted(
        ["rep", "data_is_ptr", "pio", "pci_config", "timeoffset", "unknown_type", "bad_size"])
    assert bus.stats()["unhandled_pio"] == 3


def test_invalidate_reaches_guest_memory() -> None:
    bus = MmioBus()
    mem = MappedMemory()
    mem.add_buffer(RAM_BASE, bytearray(0x1000))
    bus.dispatch(IoRequest(0, 8, True, 2**64 - 1, IOREQ_TYPE_INVALIDATE))  # no memory yet: fine
    bus.attach_memory(mem)
    gen = mem.generation
    assert bus.dispatch(IoRequest(0, 8, True, 2**64 - 1, IOREQ_TYPE_INVALIDATE)) == 0
    assert mem.generation == gen + 1
    assert bus.invalidations == 2 and bus.unhandled == {}


def test_memory_goes_to_every_window_including_later_ones() -> None:
    bus = MmioBus()
    a, b = RecordingWindow(), RecordingWindow()
    bus.register(BASE, WINDOW_SIZE, a)
    mem = MappedMemory()
    bus.attach_memory(mem)
    bus.register(BASE + WINDOW_SIZE, WINDOW_SIZE, b)
    assert a.memory is mem and b.memory is mem
    bus.detach_memory()
    assert a.memory is None and b.memory is None and a.detached == b.detached == 1
    bus.unregister(BASE)  # no memory attached: nothing more to detach
    assert a.detached == 1


def test_window_exception_is_answered_and_logged() -> None:
    with structlog.testing.capture_logs() as logs:
        bus = MmioBus()
        bus.register(BASE, WINDOW_SIZE, BrokenWindow())
        assert bus.access(BASE, 4, False) == 0xFFFF_FFFF
        assert bus.access(BASE, 4, True, 1) == 0
    assert len(events(logs, "window_error")) == 2
    assert bus.unhandled == {"window_error": 2}


def test_real_windows_through_the_bus_and_detach_resets_devices() -> None:
    bus = MmioBus()
    rigs = [make_rig(2, attach=False), make_rig(1, attach=False)]
    for i, rig in enumerate(rigs):
        bus.register(BASE + i * WINDOW_SIZE, WINDOW_SIZE, rig.window)
    bus.attach_memory(rigs[0].memory)
    for i, rig in enumerate(rigs):
        assert bus.access(BASE + i * WINDOW_SIZE + MAGIC_VALUE, 4, False) == MAGIC_VALUE_VIRT
        assert bus.access(BASE + i * WINDOW_SIZE + DEVICE_ID, 4, False) == EchoDevice.device_id
        rig.memory = rigs[0].memory  # the bus's memory is the one both windows use
        assert rig.window.memory is rigs[0].memory
    rig = rigs[0]
    dqs = bring_up(rig)
    out, in_ = rig.buffer(b"via bus"), rig.buffer(7)
    dqs[0].add([out], [in_], token=0)
    dqs[0].kick_prepare()
    bus.access(BASE + QUEUE_NOTIFY, 4, True, 0)
    assert rig.memory.read(in_[0], 7) == b"sub aiv"
    assert bus.access(BASE + CONFIG, 1, False) == 0x10  # config through the bus, 1 byte
    bus.detach_memory()
    assert not rig.device.active
    assert bus.access(BASE + STATUS, 4, False) == 0
    assert rigs[1].window.memory is None and rig.window.memory is None
