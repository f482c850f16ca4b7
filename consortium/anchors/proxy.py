"""A delaying TCP proxy: emulated link latency for the anchor benchmark (this kernel has no netem).

Every byte is really forwarded; each chunk read from one side is held until `one_way_ms` after it was
read, then written to the other side, in order, in both directions. A round trip therefore gains
2 x one_way_ms. Bandwidth is not limited: only latency is emulated, and the output says so.

Run as a process, so it takes none of the benchmark's own interpreter time:
    python -m consortium.anchors.proxy LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS
It prints its bound port on stdout once listening (PORT may be 0).
"""
from __future__ import annotations

import asyncio
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)   # the emulated propagation delay of this chunk
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay_s, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((0.0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def serve(listen: tuple[str, int], target: tuple[str, int], one_way_ms: float, ready=None) -> None:
    delay_s = one_way_ms / 1000.0

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        for w in (client_w, up_w):   # small RPC messages: no Nagle delay on top of the emulated one
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(client_r, up_w, delay_s), _pump(up_r, client_w, delay_s))

    server = await asyncio.start_server(handle, *listen)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        listen, target, one_way = _hostport(argv[0]), _hostport(argv[1]), float(argv[2])
        if one_way < 0:
            raise ValueError("ONE_WAY_MS must be >= 0")
    except ValueError as e:
        print(f"delay proxy: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(listen, target, one_way, ready=lambda port: print(port, flush=True)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
