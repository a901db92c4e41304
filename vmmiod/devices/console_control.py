"""virtio-console control messages (VIRTIO 1.2, 5.3.6.2): constants and a sans-IO codec.

With VIRTIO_CONSOLE_F_MULTIPORT the driver and the device talk over the control queues
(c_ivq: device to driver, c_ovq: driver to device). Every message starts with
`struct virtio_console_control { le32 id; le16 event; le16 value; }`; PORT_NAME is followed
by the name, RESIZE by `struct virtio_console_resize { le16 cols; le16 rows; }`.

The flow Linux's drivers/char/virtio_console.c follows (and the device answers):
  driver: DEVICE_READY(1)             -> device: DEVICE_ADD for every port
  driver: PORT_READY(id, 1)           -> device: CONSOLE_PORT (port 0) + RESIZE,
                                                 PORT_NAME (named ports),
                                                 PORT_OPEN(1) when a host client is attached
  driver: PORT_OPEN(id, 1|0)          (a guest process opened/closed the port; hvc sends 1)
  device: PORT_OPEN(id, 1|0)          (a host client attached/left)
  device: RESIZE(id)                  (window size of the console port changed)

Parsing returns a named reason for every malformed message, so the device can log it and drop
it (a misbehaving guest loses that message, nothing else).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

CONTROL = struct.Struct("<IHH")  # id, event, value
RESIZE = struct.Struct("<HH")  # cols, rows (the spec's order; Linux >= 5.x reads it this way)

# The "no port" id the driver uses with DEVICE_READY (Linux: VIRTIO_CONSOLE_BAD_ID).
VIRTIO_CONSOLE_BAD_ID = 0xFFFFFFFF

# Longest port name sent: Linux copies whatever fits its PAGE_SIZE control buffer.
MAX_NAME_BYTES = 255


class ControlEvent(enum.IntEnum):
    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


# Events a driver may send (the rest only flow from the device to the driver).
DRIVER_EVENTS = frozenset({ControlEvent.DEVICE_READY, ControlEvent.PORT_READY,
                           ControlEvent.PORT_OPEN})


class ControlError(enum.Enum):
    """Why a driver's control message was dropped."""

    SHORT = "shorter than the 8-byte header"
    UNKNOWN_EVENT = "unknown event"
    WRONG_DIRECTION = "event only a device may send"
    BAD_PORT = "port id out of range"


@dataclass(frozen=True)
class ControlMessage:
    id: int
    event: ControlEvent
    value: int


def parse_driver_message(data: bytes, nr_ports: int) -> ControlMessage | ControlError:
    """Check one driver-to-device message rule by rule; the message or why it is refused."""
    if len(data) < CONTROL.size:
        return ControlError.SHORT
    port_id, event, value = CONTROL.unpack_from(data)
    try:
        ev = ControlEvent(event)
    except ValueError:
        return ControlError.UNKNOWN_EVENT
    if ev not in DRIVER_EVENTS:
        return ControlError.WRONG_DIRECTION
    # DEVICE_READY is about the device, not a port: Linux sends BAD_ID, other drivers 0.
    if ev is not ControlEvent.DEVICE_READY and port_id >= nr_ports:
        return ControlError.BAD_PORT
    return ControlMessage(port_id, ev, value)


def encode(port_id: int, event: ControlEvent, value: int = 0) -> bytes:
    return CONTROL.pack(port_id, event, value)


def encode_resize(port_id: int, cols: int, rows: int) -> bytes:
    return CONTROL.pack(port_id, ControlEvent.RESIZE, 0) + RESIZE.pack(cols, rows)


def encode_name(port_id: int, name: str) -> bytes:
    # NUL-terminated like QEMU; Linux copies up to the used length and terminates itself.
    raw = name.encode("utf-8")[:MAX_NAME_BYTES]
    return CONTROL.pack(port_id, ControlEvent.PORT_NAME, 1) + raw + b"\0"
