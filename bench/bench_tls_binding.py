"""
Which Python TLS binding relays bytes with the least CPU (issue 10, item 4):
pyOpenSSL's memory BIOs (what Twisted's TLSMemoryBIOProtocol and so the L7R
use) against the stdlib C{ssl} module's C{MemoryBIO} + C{SSLContext.wrap_bio},
in one process, no sockets.

    PYTHONPATH=. .venv/bin/python bench/bench_tls_binding.py [--gb 1] [--tls 1.3]

For each binding a server and a client object do a TLS handshake through
memory BIOs (the server's context for pyOpenSSL is the L7R's own,
L{qvd.l7r.tls.make_context}; both negotiate the same cipher, printed). Then,
per write pattern (16 KiB and 64 KiB writes, as bulk relay sees them, and
1-4 KiB writes of a fixed pseudo-random sequence, as NX interactive traffic),
C{--gb} GB go through the server side, timed with C{time.process_time} around
the server's calls only:

- C{encrypt} (VM -> client): the server's C{write}s and the reads of its
  outgoing BIO;
- C{decrypt} (client -> VM): the client's records (made untimed beforehand)
  fed to the server in 64 KiB pieces (Twisted's socket read size) and read
  out as plaintext.

Bindings: C{pyopenssl-twisted} calls pyOpenSSL exactly as Twisted 26 does
(C{send} of 16 KiB slices, one C{bio_read(2**15)} after each; on receive
C{bio_write} then C{recv(2**15)} until C{WantReadError}); C{pyopenssl-whole}
gives it whole writes (C{send} until all is taken, then C{bio_read} until
empty); C{stdlib}
does C{SSLObject.write(data)} + C{MemoryBIO.read()}, and C{MemoryBIO.write} +
C{SSLObject.read(65536)} until C{SSLWantReadError}. The two bindings link
different OpenSSL builds (printed): the raw AES-GCM speed of each is printed
too, so the binding's own overhead can be told from the library's.
"""

import argparse
import os
import random
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

READ_PIECE = 65536          # Twisted's tcp.Connection bufferSize
BATCH = 8 * 1024 * 1024     # bytes of plaintext per timed batch


# --- pyOpenSSL ------------------------------------------------------------------

class PyOpenSSLSide:
    def __init__(self, conn, whole):
        self.conn = conn
        self.whole = whole

    def pump(self):
        """Outgoing bytes (handshake)."""
        from OpenSSL import SSL
        out = []
        while True:
            try:
                out.append(self.conn.bio_read(65536))
            except SSL.WantReadError:
                return b"".join(out)

    def feed(self, data):
        from OpenSSL import SSL
        if data:
            self.conn.bio_write(data)
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            pass

    def encrypt(self, data, out):
        from OpenSSL import SSL
        conn = self.conn
        if self.whole:
            # pyOpenSSL sets SSL_MODE_ENABLE_PARTIAL_WRITE: one record per send
            sent = 0
            while sent < len(data):
                sent += conn.send(data[sent:])
            while True:
                try:
                    out.append(conn.bio_read(65536))
                except SSL.WantReadError:
                    return
        # twisted.protocols.tls.TLSMemoryBIOProtocol._write
        sent = 0
        while sent < len(data):
            sent += conn.send(data[sent:sent + 2**14])
            try:
                out.append(conn.bio_read(2**15))
            except SSL.WantReadError:
                pass

    def decrypt(self, data):
        from OpenSSL import SSL
        conn = self.conn
        conn.bio_write(data)
        got = 0
        while True:
            try:
                got += len(conn.recv(2**15))
            except SSL.WantReadError:
                return got

    def cipher(self):
        return f"{self.conn.get_protocol_version_name()} {self.conn.get_cipher_name()}"


def pyopenssl_pair(paths, version, whole):
    from OpenSSL import SSL

    from qvd.config import Config
    from qvd.l7r import tls
    key, cert = paths
    config = Config.load(os.devnull)
    material = tls.TLSMaterial(key=open(key, "rb").read(), cert=open(cert, "rb").read())
    server_ctx = tls.make_context(material, config.get("l7r.ssl.ciphers"))
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    v = SSL.TLS1_3_VERSION if version == "1.3" else SSL.TLS1_2_VERSION
    client_ctx.set_min_proto_version(v)
    client_ctx.set_max_proto_version(v)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    return PyOpenSSLSide(server, whole), PyOpenSSLSide(client, True)


# --- stdlib ssl -------------------------------------------------------------------

class StdlibSide:
    def __init__(self, obj, incoming, outgoing):
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing

    def pump(self):
        return self.outgoing.read()

    def feed(self, data):
        if data:
            self.incoming.write(data)
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass

    def encrypt(self, data, out):
        self.obj.write(data)
        out.append(self.outgoing.read())

    def decrypt(self, data):
        self.incoming.write(data)
        got = 0
        read = self.obj.read
        while True:
            try:
                got += len(read(65536))
            except ssl.SSLWantReadError:
                return got

    def cipher(self):
        return f"{self.obj.version()} {self.obj.cipher()[0]}"


def stdlib_pair(paths, version):
    key, cert = paths
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    from qvd.config import Config
    server_ctx.set_ciphers(Config.load(os.devnull).get("l7r.ssl.ciphers"))
    server_ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = client_ctx.maximum_version = v
    sides = []
    for ctx, server_side in ((server_ctx, True), (client_ctx, False)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sides.append(StdlibSide(ctx.wrap_bio(incoming, outgoing, server_side=server_side),
                                incoming, outgoing))
    return sides


# --- the measurement --------------------------------------------------------------

def handshake(server, client):
    client.feed(b"")
    for _ in range(20):
        data = client.pump()
        server.feed(data)
        back = server.pump()
        client.feed(back)
        if not data and not back:
            break
    # TLS 1.3: the client reads the server's session tickets (no data yet)
    tickets = server.pump()
    if tickets:
        client.decrypt(tickets)


def writes(pattern, total):
    """The write sizes of one pattern adding up to at least C{total} bytes."""
    if pattern == "1-4KiB":
        rng = random.Random(10)
        sizes, n = [], 0
        while n < BATCH:
            s = rng.randint(1024, 4096)
            sizes.append(s)
            n += s
    else:
        size = {"16KiB": 16384, "64KiB": 65536}[pattern]
        sizes = [size] * (BATCH // size)
    per_batch = sum(sizes)
    return sizes, max(1, round(total / per_batch)), per_batch


def measure(make, pattern, total, payload):
    server, client = make()
    handshake(server, client)
    sizes, batches, per_batch = writes(pattern, total)
    views = [payload[:s] for s in sorted(set(sizes))]
    by_size = {len(v): v for v in views}
    chunks = [by_size[s] for s in sizes]
    # encrypt: the server writes, its records are dropped
    enc = 0.0
    for _ in range(batches):
        out = []
        began = time.process_time()
        for chunk in chunks:
            server.encrypt(chunk, out)
        enc += time.process_time() - began
    # decrypt: the client's records of one batch, fed in 64 KiB pieces
    dec, got = 0.0, 0
    for _ in range(batches):
        out = []
        for chunk in chunks:
            client.encrypt(chunk, out)
        wire = b"".join(out)
        pieces = [wire[i:i + READ_PIECE] for i in range(0, len(wire), READ_PIECE)]
        began = time.process_time()
        for piece in pieces:
            got += server.decrypt(piece)
        dec += time.process_time() - began
    if got != batches * per_batch:
        raise AssertionError(f"decrypted {got} bytes, expected {batches * per_batch}")
    gb = batches * per_batch / 1e9
    return enc / gb, dec / gb, server.cipher()


def raw_aes_gcm():
    """
    Raw AES-256-GCM of 16 KiB blocks, s/GB: the cryptography wheel's OpenSSL
    (pyOpenSSL's) and Debian's libcrypto (the stdlib's, via openssl speed).
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead = AESGCM(os.urandom(32))
    block = os.urandom(16384)
    nonce = os.urandom(12)
    n = 20000
    began = time.process_time()
    for _ in range(n):
        aead.encrypt(nonce, block, None)
    wheel = (time.process_time() - began) / (n * 16384 / 1e9)
    debian = None
    try:
        done = subprocess.run(["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "16384",
                               "-seconds", "2"], capture_output=True, text=True, timeout=60)
        line = [x for x in done.stdout.splitlines() if x.lower().startswith("aes-256-gcm")][-1]
        kbs = float(line.split()[-1].rstrip("k"))    # 1000s of bytes per second
        debian = 1e9 / (kbs * 1000)
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        pass
    return wheel, debian


def ktls_findings():
    """
    Whether kernel TLS could be used here: the kernel's TLS ULP, Debian's
    OpenSSL (the stdlib's) built with it, Python's option for it. One line each.
    """
    import socket
    lines = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as c:
            try:
                c.setsockopt(socket.IPPROTO_TCP, 31, b"tls")      # TCP_ULP
                lines.append("kernel: the tls ULP is there (kTLS possible)")
            except OSError as e:
                lines.append(f"kernel: setsockopt(TCP_ULP, 'tls') fails: {e.strerror} "
                             "(no CONFIG_TLS, or its module is not loaded)")
    try:
        done = subprocess.run(["openssl", "s_client", "-help"], capture_output=True, text=True,
                              timeout=10)
        built = "-ktls" in done.stdout + done.stderr
        lines.append(f"Debian's OpenSSL ({ssl.OPENSSL_VERSION}): "
                     + ("built with ktls" if built else "built without ktls (no -ktls option)"))
    except OSError:
        pass
    lines.append("Python's ssl: " + ("has OP_ENABLE_KTLS" if hasattr(ssl, "OP_ENABLE_KTLS")
                                      else f"no OP_ENABLE_KTLS ({sys.version.split()[0]}; 3.12+)"))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB per binding and pattern")
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.3")
    parser.add_argument("--patterns", default="16KiB,64KiB,1-4KiB")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (each --gb/rounds); medians are printed")
    args = parser.parse_args()
    from OpenSSL import SSL

    from qvd.l7r import tls
    tmp = tempfile.mkdtemp(prefix="qvd-bench-tls-")
    paths = tls.self_signed(os.path.join(tmp, "ssl"), "localhost")
    bindings = {
        "pyopenssl-twisted": lambda: pyopenssl_pair(paths, args.tls, whole=False),
        "pyopenssl-whole": lambda: pyopenssl_pair(paths, args.tls, whole=True),
        "stdlib": lambda: stdlib_pair(paths, args.tls),
    }
    payload = memoryview(os.urandom(65536))
    print(f"pyOpenSSL links {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} (the "
          f"cryptography wheel's); stdlib ssl links {ssl.OPENSSL_VERSION}")
    rounds = {}
    try:
        for make in bindings.values():      # warm-up: allocator, caches, clocks
            measure(make, "16KiB", 64e6, payload)
        for r in range(args.rounds):
            for pattern in args.patterns.split(","):
                for name, make in bindings.items():
                    enc, dec, cipher = measure(make, pattern, args.gb * 1e9 / args.rounds,
                                               payload)
                    rounds.setdefault((pattern, name), []).append((enc, dec))
                    print(f"  round {r + 1} {pattern:7s} {name:18s} encrypt {enc:6.3f} CPU-s/GB"
                          f"  decrypt {dec:6.3f} CPU-s/GB  ({cipher})", flush=True)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    import statistics
    results = {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1))
               for k, v in rounds.items()}
    wheel, debian = raw_aes_gcm()
    print()
    for line in ktls_findings():
        print("kTLS: " + line)
    print(f"CPU-s per GB through the server side, TLS {args.tls}, {args.gb:g} GB each "
          f"(median of {args.rounds} rounds; ratio: stdlib / pyopenssl-twisted)")
    names = list(bindings)
    print(f"{'writes':8s} {'direction':9s}" + "".join(f"{n:>19s}" for n in names)
          + f"{'ratio':>8s}")
    for pattern in args.patterns.split(","):
        for i, direction in enumerate(("encrypt", "decrypt")):
            row = [results[(pattern, n)][i] for n in names]
            print(f"{pattern:8s} {direction:9s}" + "".join(f"{v:19.3f}" for v in row)
                  + f"{row[2] / row[0]:8.2f}")
    print(f"raw AES-256-GCM, 16 KiB blocks: cryptography wheel's OpenSSL {wheel:.3f} CPU-s/GB"
          + (f", Debian's libcrypto (openssl speed) {debian:.3f} CPU-s/GB" if debian else ""))


if __name__ == "__main__":
    main()
