"""A WebSocket server on port 8765 that echoes each text or binary message
back (unmasked, as a server sends), one thread per connection; standard
library only. Run inside a capsule by the agent's proxy test and the SDK
suite's proxy test."""
import base64, hashlib, socket, struct, threading
def handle(c):
    req = b''
    while b'\r\n\r\n' not in req:
        d = c.recv(4096)
        if not d:
            return
        req += d
    key = [l.split(b':', 1)[1].strip() for l in req.split(b'\r\n') if l.lower().startswith(b'sec-websocket-key:')][0]
    acc = base64.b64encode(hashlib.sha1(key + b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest())
    c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + acc + b'\r\n\r\n')
    f = c.makefile('rb')
    while True:
        h = f.read(2)
        if len(h) < 2:
            return
        op, n = h[0] & 0x0f, h[1] & 0x7f
        if n == 126:
            n = struct.unpack('>H', f.read(2))[0]
        mask = f.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8:
            c.sendall(b'\x88\x00')
            return
        head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else b'\x7e' + struct.pack('>H', n))
        c.sendall(head + data)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 8765))
s.listen()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
