"""The server side of RFC 6455 WebSockets in the standard library, for the demo's live
microphone stream: the opening handshake, framing, and the closing handshake. No extensions
(permessage-deflate offers are declined by not echoing them), no subprotocols.

Every length is checked before it sizes a read: a message larger than `max_message` bytes
(fragments included) ends the connection with close code 1009, an unmasked client frame or a
malformed control frame with 1002, text that is not UTF-8 with 1007.
"""
from __future__ import annotations

import base64
import hashlib
import select
import socket
import struct
import threading

# RFC 6455 section 1.3: the accept key is SHA-1(key + this GUID), base64.
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes (RFC 6455 section 7.4.1).
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN_LATER = (
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013)

_MAX_CONTROL = 125  # control frames carry at most 125 bytes (section 5.5)


class ProtocolError(Exception):
    """The peer broke the protocol; `code` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Closed(Exception):
    """The peer sent a close frame (its code, or 1005 when it gave none)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed by the peer ({code})")
        self.code = code


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode("ascii")).digest()).decode("ascii")


def valid_client_key(key: str | None) -> bool:
    """Section 4.1: a base64-encoded 16-byte nonce."""
    if not key or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame. Servers send unmasked frames; a client passes its 4-byte mask."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + _xor(payload, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    # One big-integer XOR instead of a Python loop per byte: a 100 ms audio chunk is ~3 KB.
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class WebSocket:
    """A connection over a socket whose HTTP upgrade was answered (the peer sends no frame
    before the 101 response, so nothing of it waits in the HTTP handler's read buffer).
    receive() and wait_readable() are called from one thread; sends from any thread.
    `frame_timeout_s` bounds the wait for the rest of a frame once its first byte arrived."""

    def __init__(self, connection: socket.socket, *, max_message: int, require_mask: bool = True,
                 frame_timeout_s: float = 30.0) -> None:
        self.connection = connection
        self.connection.settimeout(frame_timeout_s)
        self.max_message = max_message
        self.require_mask = require_mask
        self._buffer = bytearray()
        self._write_lock = threading.Lock()
        self.close_sent = False

    def wait_readable(self, timeout: float) -> bool:
        """Whether a frame (or the connection's end) arrives within `timeout` seconds."""
        if self._buffer:
            return True
        readable, _, _ = select.select([self.connection], [], [], timeout)
        return bool(readable)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = self.connection.recv(max(65536, n - len(self._buffer)))
            if not data:
                raise ConnectionResetError("the connection closed")
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    # --- receiving ----------------------------------------------------------------------

    def receive(self) -> tuple[int, bytes]:
        """The next data message as (TEXT or BINARY, payload); answers pings itself.
        Raises Closed on a close frame, ProtocolError on a broken frame, OSError when the
        connection drops or its read timeout passes."""
        opcode, parts, size = None, [], 0
        while True:
            fin, frame_opcode, payload = self._frame()
            if frame_opcode >= CLOSE:
                self._control(frame_opcode, payload)
                continue
            if frame_opcode == CONTINUATION:
                if opcode is None:
                    raise ProtocolError(PROTOCOL_ERROR, "a continuation frame without a message to continue")
            elif frame_opcode in (TEXT, BINARY):
                if opcode is not None:
                    raise ProtocolError(PROTOCOL_ERROR, "a new message began before the last one ended")
                opcode = frame_opcode
            else:
                raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {frame_opcode:#x}")
            size += len(payload)
            if size > self.max_message:
                raise ProtocolError(TOO_BIG, f"a message is larger than {self.max_message} bytes")
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                if opcode == TEXT:
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError(INVALID_DATA, "a text message is not UTF-8") from None
                return opcode, data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        if b0 & 0x70:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if self.require_mask and not masked:
            raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= CLOSE and (not fin or length > _MAX_CONTROL):
            raise ProtocolError(PROTOCOL_ERROR, "a control frame must be whole and at most 125 bytes")
        if length == 126:
            length, = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            length, = struct.unpack("!Q", self._read_exact(8))
        # Checked before the read it sizes: the header alone may claim up to 2^63 bytes.
        if length > self.max_message:
            raise ProtocolError(TOO_BIG, f"a frame is larger than {self.max_message} bytes")
        mask = self._read_exact(4) if masked else None
        payload = self._read_exact(length) if length else b""
        return fin, opcode, _xor(payload, mask) if mask else payload

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            self._send(PONG, payload)
        elif opcode == CLOSE:
            if len(payload) == 1:
                raise ProtocolError(PROTOCOL_ERROR, "a close frame with a one-byte body")
            raise Closed(struct.unpack("!H", payload[:2])[0] if payload else 1005)
        elif opcode != PONG:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown control opcode {opcode:#x}")

    # --- sending ------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send(TEXT, text.encode("utf-8"))

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Sends a close frame once (the reason is cut to fit a control frame); errors from
        a connection already gone are ignored."""
        with self._write_lock:
            if self.close_sent:
                return
            self.close_sent = True
            reason_bytes = reason.encode("utf-8")[: _MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
            body = struct.pack("!H", code) + reason_bytes
            try:
                self.connection.sendall(encode_frame(CLOSE, body))
            except OSError:
                pass

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._write_lock:
            if self.close_sent:
                raise ConnectionResetError("the connection is closing")
            self.connection.sendall(encode_frame(opcode, payload))
