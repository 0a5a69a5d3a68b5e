"""
The two ends of a half-close check, run as real programs in the test's
namespaces.

  server PORT           accept connections; read each to EOF, then answer
                        with the SHA-256 of what was read and close.
  proxy PORT            the same, behind a CONNECT handshake answered 200:
                        an upstream proxy that keeps half-closed tunnels
                        open (Squid closes both sides on the first EOF).
  client HOST PORT N    send N random bytes, shut down the sending side,
                        read the answer to EOF; print the local and the
                        received digest.
"""

import hashlib
import os
import socket
import sys


def server(port: int, proxy: bool = False) -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        digest = hashlib.sha256()
        if proxy:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(1)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        while chunk := conn.recv(65536):
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())
        conn.close()


def client(host: str, port: int, size: int) -> None:
    payload = os.urandom(size)
    conn = socket.create_connection((host, port), timeout=20)
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    print(hashlib.sha256(payload).hexdigest(), answer.decode())


if __name__ == "__main__":
    if sys.argv[1] in ("server", "proxy"):
        server(int(sys.argv[2]), proxy=sys.argv[1] == "proxy")
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
