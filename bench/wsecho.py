"""``python -m bench.wsecho --port P``: the benchmark's WebSocket backend, an echo server.

One job: accept plain-HTTP WebSocket upgrades (RFC 6455) on 127.0.0.1 and send
every data frame back, unmasked, with the same opcode and payload; answer a
close frame with a close frame and end the connection.  The peers relay the
upgraded connection as bytes, so the benchmark measures their relay cost per
message, not this server's.

It must not listen anywhere but 127.0.0.1, and it serves only what the
benchmark's load generator (`bench.websocket`) sends: no extensions, no
fragmented messages, payloads of at most `MAX_PAYLOAD` bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import struct
import sys

#: The GUID RFC 6455 appends to the client's key.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest payload echoed; a longer frame ends the connection.
MAX_PAYLOAD = 1 << 20
_CLOSE = 0x8


def accept_value(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def unmask(payload: bytes, mask: bytes) -> bytes:
    """The payload of a masked frame, unmasked."""
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def _key_of(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    return None


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        key = _key_of(head)
        if key is None:
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
        )
        while True:
            first, second = await reader.readexactly(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            if n > MAX_PAYLOAD:
                return
            mask = await reader.readexactly(4) if second & 0x80 else b""
            payload = await reader.readexactly(n)
            if mask:
                payload = unmask(payload, mask)
            writer.write(frame(opcode, payload))
            if opcode == _CLOSE:
                return
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    ns = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(ns.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
