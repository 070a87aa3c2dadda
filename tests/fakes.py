"""Scriptable fake protocol servers for the STARTTLS tests, and a seeded mutator for fuzzing.

A FakeServer plays one script on every connection it accepts. A script is a list of steps,
made by the small functions below and played in order:

    send(data)               send bytes (data may be a function of the Session, e.g. tagged())
    pause(seconds)           wait, noting when the client's first byte arrives
    mark(name)               note the time under `name` (e.g. just before the greeting's end)
    line()                   read one client line (through LF); kept in session.lines
    until(marker)            read client bytes through marker (XMPP sends no line ends)
    read(count)              read exactly count client bytes (binary protocols)
    trickle(data, interval)  send data one byte every interval seconds
    forever(unit, interval)  send unit again and again until the client leaves
    drip(unit, interval)     the same, one byte every interval seconds
    tls()                    the upgrade point: TLS handshake with the chain, then hold
    hold()                   read and discard until the client leaves
    close()                  end the connection (the client reads end of stream)

Reads never consume more than the step asks for, so a ClientHello that follows the client's
last plaintext command is left for tls(). A client that leaves, or a read that waits longer
than `patience` seconds, ends the session quietly: that is what hostile tests expect.

Each connection leaves a Session in server.sessions: the client's lines and bytes, when its
first byte arrived (and session.seen_by(t): how many bytes it had sent by time t), the marks
(time, client bytes read by then), whether the TLS handshake completed, the ALPN protocol chosen
and how the session ended. Everything is bounded: no session outlives SESSION_LIMIT seconds,
no send blocks longer than a POLL, and stop() (leaving the `with` block) ends every thread.

    with FakeServer([send(b"220 ready\\r\\n"), line(), ...], certs / "ec2") as fake:
        run(fake.address, "--starttls", "smtp", ...)
    session = fake.sessions[0]

mutate(rng, data, binary) and loopback_pair(data) serve the fuzz tests.
"""

import random
import select
import socket
import ssl
import time

import servers

POLL = 0.05  # seconds; the longest a waiting loop goes without looking at the stop flag
NUDGE = 0.01  # seconds between looks at a partly arrived client line (select cannot wait)
PATIENCE = 10.0  # seconds a read step waits for the client before ending the session
SESSION_LIMIT = 30.0  # seconds; the longest a session lasts, whatever its script says
HANDSHAKE_TIMEOUT = 5.0  # seconds for the server side of the TLS handshake
PEEK = 65536  # bytes looked at when searching the client's data for a line end or marker
FOREVER_CAP = 64 << 20  # bytes; forever() stops after this much even if the client stays


class ClientGone(Exception):
    """The session ends: the client left, was too slow, or the server is stopping."""


# Steps ----------------------------------------------------------------------------------------

def send(data):
    return ("send", data)


def pause(seconds):
    return ("pause", seconds)


def mark(name):
    return ("mark", name)


def line():
    return ("line",)


def until(marker):
    return ("until", marker)


def read(count):
    return ("read", count)


def trickle(data, interval):
    return ("trickle", data, interval)


def forever(unit, interval=0.0):
    return ("forever", unit, interval)


def drip(unit, interval):
    """Send unit again and again, one byte every interval seconds, until the client leaves."""
    return ("drip", unit, interval)


def tls():
    return ("tls",)


def hold():
    return ("hold",)


def close():
    return ("close",)


def tagged(text, before=b""):
    """Data for send(): `before` (untagged lines), then the tag of the client's last line,
    a space and text (IMAP)."""
    return lambda session: before + session.lines[-1].split(b" ", 1)[0] + b" " + text


# The server -----------------------------------------------------------------------------------

class FakeServer(servers.ThreadedServer):
    """Plays `script` on each connection (assign .script to change it for the next ones);
    `chain_dir` holds fullchain.pem and key.pem for tls(); `alpn`: protocols the TLS side
    accepts (session.alpn tells what was chosen); `patience`: seconds a read step waits."""

    def __init__(self, script, chain_dir=None, alpn=None, patience=PATIENCE, host="127.0.0.1"):
        servers.ThreadedServer.__init__(self, host)
        self.script = list(script)
        self.patience = patience
        self.sessions = []
        self.server_names = []
        self.context = None
        if chain_dir is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(chain_dir / "fullchain.pem"),
                                         str(chain_dir / "key.pem"), password="")
            self.context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            if alpn:
                self.context.set_alpn_protocols(alpn)

    @property
    def handshakes(self):
        return sum(1 for s in self.sessions if s.handshake)

    def handle(self, conn):
        session = Session(self, conn)
        with self._lock:
            self.sessions.append(session)
        try:
            for step in self.script:
                getattr(session, "_" + step[0])(*step[1:])
            session.ended = "script done"
        except ClientGone as exc:
            session.ended = str(exc)
        finally:
            session.finished = time.monotonic()


class Session(object):
    """One connection's run through the script, and what the client did."""

    def __init__(self, server, conn):
        self.server, self.conn = server, conn
        self.started = time.monotonic()
        self.deadline = self.started + SESSION_LIMIT
        self.first_byte_at = None  # monotonic time the client's first byte was seen
        self.marks = {}  # name -> (monotonic time, client bytes read by then)
        self.arrivals = []  # (monotonic time, client bytes seen in all by then)
        self.lines = []  # client lines (bytes, without CR LF) read by line()
        self.received = b""  # every plaintext byte read from the client
        self.sent = 0  # bytes sent before TLS
        self.handshake = False  # the TLS handshake completed
        self.tls_error = None  # why it did not, when it was tried
        self.alpn = None
        self.ended = None
        self.finished = None
        conn.settimeout(POLL)

    # Waiting ---------------------------------------------------------------------------------

    def _check(self):
        if self.server._stop.is_set():
            raise ClientGone("server stopped")
        if time.monotonic() > self.deadline:
            raise ClientGone("session limit")

    def _peek(self, wait=POLL):
        """The client's unread bytes (b"" at end of stream); None when there are none yet."""
        if not select.select([self.conn], [], [], wait)[0]:
            return None
        try:
            data = self.conn.recv(PEEK, socket.MSG_PEEK)
        except socket.timeout:
            return None
        except OSError:
            raise ClientGone("client reset")
        total = len(self.received) + len(data)
        if data and (not self.arrivals or total > self.arrivals[-1][1]):
            self.arrivals.append((time.monotonic(), total))
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
        return data

    def seen_by(self, moment):
        """How many bytes the client had sent by moment (as far as the polls saw)."""
        return max([total for when, total in self.arrivals if when <= moment] or [0])

    def _wait(self, seconds):
        """Let seconds pass; note the client's first byte; end when the client leaves."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check()
            data = self._peek(min(POLL, max(0.0, end - time.monotonic())))
            if data == b"":
                raise ClientGone("client left")
            if data:  # unread client data keeps select() returning at once
                time.sleep(min(POLL, max(0.0, end - time.monotonic())))

    def _take(self, find):
        """Read through the end that find(peeked bytes) returns (None: not there yet)."""
        give_up = time.monotonic() + self.server.patience
        while True:
            self._check()
            if time.monotonic() > give_up:
                raise ClientGone("client too slow")
            data = self._peek()
            if data == b"":
                raise ClientGone("client left")
            end = find(data) if data else None
            if end is not None:
                return self._recv_exactly(end)
            if data:
                time.sleep(NUDGE)  # partial data: let more arrive

    def _recv_exactly(self, count):
        data = b""
        while len(data) < count:
            try:
                chunk = self.conn.recv(count - len(data))
            except socket.timeout:
                self._check()
                continue
            except OSError:
                raise ClientGone("client reset")
            if not chunk:
                raise ClientGone("client left")
            data += chunk
        self.received += data
        return data

    def _send_all(self, data):
        view = memoryview(data)
        while view:
            self._check()
            try:
                count = self.conn.send(view[:PEEK])
            except socket.timeout:
                continue
            except OSError:
                raise ClientGone("client left while we sent")
            view = view[count:]
            self.sent += count

    # Steps -----------------------------------------------------------------------------------

    def _send(self, data):
        self._send_all(data(self) if callable(data) else data)

    def _pause(self, seconds):
        self._wait(seconds)

    def _mark(self, name):
        self.marks[name] = (time.monotonic(), len(self.received))

    def _line(self):
        def find(data):
            end = data.find(b"\n")
            return None if end < 0 else end + 1
        self.lines.append(self._take(find).rstrip(b"\r\n"))

    def _until(self, marker):
        def find(data):
            end = data.find(marker)
            return None if end < 0 else end + len(marker)
        self._take(find)

    def _read(self, count):
        self._take(lambda data: count if len(data) >= count else None)

    def _trickle(self, data, interval):
        for i in range(len(data)):
            self._send_all(data[i:i + 1])
            self._wait(interval)

    def _forever(self, unit, interval):
        while self.sent < FOREVER_CAP:
            self._send(unit)  # fails soon after the client has left
            if interval:
                self._wait(interval)

    def _drip(self, unit, interval):
        while self.sent < FOREVER_CAP:
            for i in range(len(unit)):
                self._send_all(unit[i:i + 1])
                self._wait(interval)

    def _tls(self):
        if self.server.context is None:
            raise ValueError("tls() needs a FakeServer with chain_dir")
        self._take(lambda data: 0)  # wait (with patience) until the ClientHello begins
        sock = self.server.context.wrap_socket(self.conn, server_side=True,
                                               do_handshake_on_connect=False)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # the client gave up or refused: recorded
            self.tls_error = exc
            raise ClientGone("TLS handshake failed")
        self.handshake = True
        self.alpn = sock.selected_alpn_protocol()
        sock.settimeout(POLL)
        self.conn = sock
        self._hold()

    def _hold(self):
        while True:
            self._check()
            try:
                if not self.conn.recv(PEEK):
                    raise ClientGone("client left")
            except socket.timeout:
                continue
            except OSError:
                raise ClientGone("client reset")

    def _close(self):
        try:
            self.conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._wait(self.server.patience)  # the client reads end of stream and leaves


# Fuzzing --------------------------------------------------------------------------------------

LENGTH_FORMS = (b"\x80", b"\x84\xff\xff\xff\xff", b"\x83\xff\xff\xff", b"\x84\x7f\xff\xff\xff",
                b"\x81\xff", b"\x85\x00\x00\x00\x00\x10", b"\x8f", b"\xff")


def mutate(rng, data, binary=False):
    """One seeded mutation of a server reply: a bit flip, truncation, random insertion,
    a dropped or doubled CR or LF, a duplicated slice, or (binary=True) an oversized or
    malformed length field. Returns (description, mutated bytes)."""
    kinds = ["flip", "truncate", "insert", "crlf", "duplicate", "zero"]
    if binary:
        kinds += ["length", "length", "ber"]
    kind = rng.choice(kinds)
    data = bytearray(data)
    at = rng.randrange(len(data) + 1)
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        junk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 8, 100, 9000))))
        data[at:at] = rng.choice((junk, b"\r\n", b"\n", b"\0", b".\r\n", b"-", b" ", b"<"))
    elif kind == "crlf":
        ends = [i for i, b in enumerate(data) if b in b"\r\n"]
        if ends:
            i = rng.choice(ends)
            data[i:i + 1] = rng.choice((b"", data[i:i + 1] * 2, b"\r" if data[i] == 10 else b"\n"))
    elif kind == "duplicate" and data:
        start = rng.randrange(len(data))
        data[at:at] = data[start:start + rng.randint(1, 64)] * rng.randint(1, 50)
    elif kind == "zero" and data:
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x80, 0x7F))
    elif kind == "length" and len(data) >= 4:
        # MySQL: the 3-byte little-endian packet length; PostgreSQL: a 4-byte big-endian one
        if rng.random() < 0.5:
            data[0:3] = rng.choice((0xFFFFFF, 0x10000, 0, 1, 70000)).to_bytes(3, "little")
        else:
            data[1:5] = rng.choice((0x7FFFFFFF, 0xFFFFFFFF, 0, 3, 65537)).to_bytes(4, "big")
    elif kind == "ber" and len(data) >= 2:
        i = rng.randrange(1, len(data))  # replace a byte (often a BER length) by a long form
        data[i:i + 1] = rng.choice(LENGTH_FORMS)
    return kind, bytes(data)


def loopback_pair(data, listener=None):
    """(client, server): a connected TCP pair on 127.0.0.1 with data already sent by the
    server side, followed by end of stream; the server side stays open for reading, so
    the client's sends do not fail. Pass a listening socket to reuse it."""
    own = listener is None
    if own:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
    try:
        client = socket.create_connection(listener.getsockname(), timeout=5.0)
        server, _ = listener.accept()
    finally:
        if own:
            listener.close()
    server.settimeout(5.0)
    server.sendall(data)  # loopback buffers hold far more than MAX_PLAINTEXT
    server.shutdown(socket.SHUT_WR)
    return client, server


def seeded(seed, *parts):
    """A Random seeded from seed and parts (a protocol name, a case number)."""
    return random.Random("%s:%s" % (seed, ":".join(str(p) for p in parts)))


__all__ = ["FakeServer", "Session", "ClientGone", "send", "pause", "mark", "line", "until",
           "read", "trickle", "forever", "drip", "tls", "hold", "close", "tagged", "mutate",
           "loopback_pair", "seeded"]
