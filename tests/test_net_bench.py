"""The net benchmark's rig moves real frames: what it times arrives, byte for byte."""

from __future__ import annotations

import asyncio
import socket

from vmmiod.bench import net as bench
from vmmiod.config import DgramBackend, SocketAddress


def test_benchmark_rig_moves_every_frame_both_ways() -> None:
    async def body() -> None:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        rig = bench.Rig(DgramBackend(local=SocketAddress("udp", "127.0.0.1", 0),
                                     remote=SocketAddress("udp", "127.0.0.1",
                                                          sink.getsockname()[1])))
        await rig.start()
        try:
            frame, hdr, _tso = bench.frames(rig.device.mac)["1514B"]
            dev_s, wall_s = await rig.tx(frame, hdr, 300)
            assert 0 < dev_s <= wall_s
            got = [sink.recv(2048) for _ in range(300)]
            assert got == [frame] * 300
            assert rig.device.counters["tx_frames"] == 300
            port = rig.device.backend.local_address[1]  # type: ignore[attr-defined]
            inbound = bench.ether(rig.device.mac, bench.PEER_MAC, 0x88B5, bytes(100))
            for _ in range(100):
                sink.sendto(inbound, ("127.0.0.1", port))
            n, dev_s, wall_s = await rig.rx(0.3)
            assert n == 100 and 0 < dev_s < wall_s
        finally:
            sink.close()
            await rig.stop()
    asyncio.run(body())
