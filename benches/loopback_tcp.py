#!/usr/bin/env python3
"""Raw loopback TCP throughput: one stream, 127.0.0.1, BYTES bytes (default 1 GiB).

The reference ceiling for benches/drain_bench.sh: what one TCP connection on this host moves
with no protocol, no disk and no TLS. The receiver is a separate process (fork), so sender and
receiver can run on different cores like turnpike and its customer do. Both sides use 1 MiB
buffers. The time runs from the receiver's accept() to EOF, after it has counted every byte;
a short count is an error, not a figure.

Usage: loopback_tcp.py [BYTES]
Prints one line: "loopback BYTES bytes in SECONDS s = MBPS MB/s" (MB = 10^6 bytes).
"""

import os
import socket
import sys
import time

CHUNK = 1 << 20


def receiver(listener, result_w):
    conn, _ = listener.accept()
    t0 = time.perf_counter()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        total += n
    secs = time.perf_counter() - t0
    conn.close()
    os.write(result_w, f"{total} {secs:.6f}\n".encode())


def main():
    want = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_r)
            receiver(listener, result_w)
        finally:
            os._exit(0)
    os.close(result_w)
    listener.close()

    payload = b"x" * CHUNK
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = want
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(payload[:n] if n < CHUNK else payload)
            left -= n
        s.shutdown(socket.SHUT_WR)
        with os.fdopen(result_r) as r:
            line = r.readline().split()
    os.waitpid(pid, 0)
    if len(line) != 2:
        sys.exit("loopback_tcp: the receiver reported nothing")
    total, secs = int(line[0]), float(line[1])
    if total != want:
        sys.exit(f"loopback_tcp: received {total} bytes, sent {want}")
    print(f"loopback {total} bytes in {secs:.3f} s = {total / secs / 1e6:.1f} MB/s")


if __name__ == "__main__":
    main()
