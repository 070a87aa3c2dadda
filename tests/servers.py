"""Loopback servers for the tests: real TLS servers and hostile ones.

Every server is a context manager that listens on a free port (bound to port 0) and exposes
`.host` and `.port`; leaving the `with` block stops its threads or process and closes every
socket. Nothing here can outlive a test: waits are bounded and threads are daemons.

    TLSServer(certfile, keyfile, tls="1.3")   stdlib ssl server in a thread; serves certfile
                                              exactly as given (load_cert_chain on the whole
                                              file), so out-of-order or junk chains can be served
                                              (port=N: on that port, e.g. the port another
                                              address of one host name already listens on)
    DelayedTLSServer(certfile, keyfile, delay)   a TLSServer that waits `delay` seconds (or
                                              (low, high)) after each accept, as a far server
                                              seems to; backlog 4096
    OpenSSLServer(certfile, keyfile, chainfile, tls="1.2")   `openssl s_server`
    SilentServer()          accepts and never says anything
    GarbageServer(payload)  sends bytes that are not TLS, then keeps the connection open
    HTTPServer()            answers the ClientHello with a plain HTTP 400 reply, then closes
    CloseServer(reset=False)  closes each connection at once (with a RST when reset=True)
    AlertServer()           reads the ClientHello, answers with a fatal TLS alert record
    InstalledFilesServer(certfile, keyfile)   a fleet member: serves the files as they are at
                            each connection (as after a reload), closes while there are none
    DripProxy(port)         forwards to a real server, but sends its replies one byte every
                            `interval` seconds (0.3 by default)
    closed_port()           a port where connections are refused (bound, never listening)
    free_ports(count)       ports no one listens on, for servers that need a port number

Needs Python 3.7+ (ssl.TLSVersion, sni_callback) in the process running pytest; certgrab
itself is run under older Pythons as a subprocess (test_matrix.py).
"""

import contextlib
import random
import re
import select
import socket
import ssl
import subprocess
import tempfile
import threading
import time

POLL = 0.05  # seconds; how often loops look at their stop flag
HOLD = 30.0  # seconds; the longest a handler keeps a connection open
JOIN = 5.0  # seconds; the longest stop() waits for a thread or process
READY = 10.0  # seconds; the longest OpenSSLServer waits for s_server to listen

TLS_VERSIONS = {
    "1.2": ("TLSv1_2", "TLSv1_2"),
    "1.3": ("TLSv1_3", "TLSv1_3"),
    "any": (None, None),
}


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url_host(host):
    return "[%s]" % host if ":" in host else host


class ThreadedServer(object):
    """Accept loop in a thread; each connection goes to self.handle(conn) in its own thread."""

    backlog = 16  # connections the kernel queues before accept; a fleet's server needs more

    def __init__(self, host="127.0.0.1", port=0):
        self.host = host
        self.port = None
        self._bind_port = port  # 0: a free port
        self.connections = 0  # how many clients connected
        self.errors = []  # exceptions raised while handling (a client hanging up is normal)
        self._stop = threading.Event()
        self._threads = []
        self._conns = []
        self._lock = threading.Lock()
        self._listener = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self):
        """host:port as a certgrab SOURCE would spell it."""
        return "%s:%d" % (_url_host(self.host), self.port)

    def start(self):
        self._listener = socket.socket(_family(self.host), socket.SOCK_STREAM)
        self._listener.bind((self.host, self._bind_port))
        self._listener.listen(self.backlog)
        self._listener.settimeout(POLL)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    def stop(self):
        self._stop.set()
        for t in list(self._threads):
            t.join(JOIN)
        with self._lock:
            for conn in self._conns:
                _close(conn)
        if self._listener is not None:
            self._listener.close()

    def _spawn(self, target, *args):
        t = threading.Thread(target=target, args=args)
        t.daemon = True
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn):
        try:
            conn.settimeout(HOLD)
            self.handle(conn)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self.errors.append(e)
        finally:
            _close(conn)

    def handle(self, conn):
        raise NotImplementedError

    # Helpers for handlers ------------------------------------------------------------------

    def wait_readable(self, sock, seconds):
        """True when sock has data (or EOF) within seconds; False on timeout or stop."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            if select.select([sock], [], [], POLL)[0]:
                return True
        return False

    def read_some(self, sock, seconds=5.0):
        """One recv after waiting up to seconds; b"" on EOF, timeout or stop."""
        if not self.wait_readable(sock, seconds):
            return b""
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def hold_until_closed(self, sock, seconds=HOLD):
        """Read and discard until the peer hangs up, the server stops, or seconds pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.read_some(sock, deadline - time.monotonic()):
                return


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


class TLSServer(ThreadedServer):
    """A stdlib TLS server: handshake, wait for the client to hang up, close.

    `server_names` lists the SNI each client sent (None when it sent none);
    `handshakes` counts completed handshakes.
    """

    def __init__(self, certfile, keyfile, host="127.0.0.1", tls="1.3", port=0):
        ThreadedServer.__init__(self, host, port)
        self.server_names = []
        self.handshakes = 0
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        low, high = TLS_VERSIONS[tls]
        if low:
            self.context.minimum_version = getattr(ssl.TLSVersion, low)
            self.context.maximum_version = getattr(ssl.TLSVersion, high)
        self.context.load_cert_chain(str(certfile), str(keyfile), password="")
        self.context.sni_callback = self._record_sni

    def _record_sni(self, sslsock, server_name, context):
        self.server_names.append(server_name)

    def handle(self, conn):
        tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(5.0)
        tls.do_handshake()
        self.handshakes += 1
        tls.settimeout(POLL)
        deadline = time.monotonic() + 5.0
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if not tls.recv(4096):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        _close(tls)


class DelayedTLSServer(TLSServer):
    """A TLSServer that waits `delay` seconds (or, given (low, high), a random time between
    them) after each accept before the handshake, as a far server seems to (where the kernel
    has no netem), with a queue long enough for a fleet's worth of clients. `most` is the most
    clients waiting at once: how many a client fetched at the same time when every source is
    this server."""

    backlog = 4096

    def __init__(self, certfile, keyfile, delay, **kwargs):
        TLSServer.__init__(self, certfile, keyfile, **kwargs)
        self.delay, self.waiting, self.most = delay, 0, 0
        self._count = threading.Lock()

    def handle(self, conn):
        with self._count:
            self.waiting += 1
            self.most = max(self.most, self.waiting)
        self._stop.wait(random.uniform(*self.delay) if isinstance(self.delay, tuple)
                        else self.delay)
        with self._count:
            self.waiting -= 1
        TLSServer.handle(self, conn)


class InstalledFilesServer(ThreadedServer):
    """A fleet member serving what it has installed: certfile and keyfile are read again for
    every connection (as a reload after each install would), and a connection is closed at
    once while there is nothing to serve. `handshakes` counts completed handshakes."""

    def __init__(self, certfile, keyfile, host="127.0.0.1"):
        ThreadedServer.__init__(self, host)
        self.certfile, self.keyfile = str(certfile), str(keyfile)
        self.handshakes = 0

    def handle(self, conn):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.certfile, self.keyfile, password="")
        except (OSError, ssl.SSLError):
            _close(conn)
            return
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(5.0)
        try:
            tls.do_handshake()
            self.handshakes += 1
            self.read_some(tls)
        except OSError:
            pass
        _close(tls)


class OpenSSLServer(object):
    """`openssl s_server` serving certfile + chainfile with keyfile, one TLS version.

    s_server handles one connection at a time, which is all the tests need.
    """

    def __init__(self, certfile, keyfile, chainfile=None, host="127.0.0.1", tls="1.3"):
        self.host = host
        self.port = None
        self.args = ["openssl", "s_server", "-accept", "%s:0" % _url_host(host),
                     "-cert", str(certfile), "-key", str(keyfile), "-no_ticket"]
        if chainfile:
            self.args += ["-cert_chain", str(chainfile)]
        self.args += {"1.2": ["-tls1_2"], "1.3": ["-tls1_3"], "any": []}[tls]
        self._proc = None
        self._log = None

    @property
    def address(self):
        return "%s:%d" % (_url_host(self.host), self.port)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._log = tempfile.TemporaryFile()
        # stdin stays an open pipe: s_server shuts down when its stdin reaches EOF.
        self._proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY
        while time.monotonic() < deadline:
            match = re.search(br"ACCEPT .*:(\d+)\s", self.output())
            if match:
                self.port = int(match.group(1))
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("openssl s_server did not start: %s\n%s" % (
            " ".join(self.args), self.output().decode(errors="replace")))

    def output(self):
        """Everything s_server printed so far."""
        self._log.seek(0)
        return self._log.read()

    def stop(self):
        if self._proc is None:
            return
        stop_process(self._proc)
        self._proc.stdin.close()
        self._log.close()
        self._proc = None


class SilentServer(ThreadedServer):
    """Accepts, reads whatever comes, never answers."""

    def handle(self, conn):
        self.hold_until_closed(conn)


class GarbageServer(ThreadedServer):
    """Sends payload (default: 1 KiB of seeded random bytes that are not a TLS record) at once,
    then keeps the connection open until the client leaves."""

    def __init__(self, payload=None, host="127.0.0.1"):
        ThreadedServer.__init__(self, host)
        if payload is None:
            rng = random.Random(1)
            payload = b"\xff" + bytes(rng.randrange(256) for _ in range(1023))
        self.payload = payload

    def handle(self, conn):
        conn.sendall(self.payload)
        self.hold_until_closed(conn)


class HTTPServer(ThreadedServer):
    """A web server on a port the client thought was TLS: it reads the request, answers 400."""

    REPLY = (b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\n"
             b"Content-Length: 48\r\nConnection: close\r\n\r\n"
             b"<html><body>400 Bad Request</body></html>\r\n\r\n\r\n")

    def handle(self, conn):
        self.read_some(conn)
        conn.sendall(self.REPLY)


class CloseServer(ThreadedServer):
    """Closes every connection as soon as it is accepted (reset=True: abortively, RST)."""

    def __init__(self, reset=False, host="127.0.0.1"):
        ThreadedServer.__init__(self, host)
        self.reset = reset

    def handle(self, conn):
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            return
        # Closing with the ClientHello unread would send a RST; send our FIN first instead,
        # so the client reads a clean end of stream.
        conn.shutdown(socket.SHUT_WR)
        self.hold_until_closed(conn, 5.0)


class AlertServer(ThreadedServer):
    """Reads the ClientHello and answers with one fatal alert record (default: 40,
    handshake_failure), the way a server with no common cipher or protocol does."""

    def __init__(self, description=40, host="127.0.0.1"):
        ThreadedServer.__init__(self, host)
        self.record = b"\x15\x03\x03\x00\x02\x02" + bytes([description])

    def handle(self, conn):
        self.read_some(conn)
        conn.sendall(self.record)
        self.hold_until_closed(conn, 2.0)


class DripProxy(ThreadedServer):
    """A TCP proxy to upstream that passes the client's bytes at once but the server's bytes
    one at a time, every `interval` seconds: each read makes progress, only an overall
    deadline ends the handshake."""

    def __init__(self, upstream_port, upstream_host="127.0.0.1", interval=0.3,
                 host="127.0.0.1"):
        ThreadedServer.__init__(self, host)
        self.upstream = (upstream_host, upstream_port)
        self.interval = interval
        self.dripped = 0  # bytes sent to clients so far

    def handle(self, conn):
        up = socket.create_connection(self.upstream, timeout=5.0)
        with self._lock:
            self._conns.append(up)
        pending = b""
        next_drip = time.monotonic()
        deadline = time.monotonic() + HOLD
        while not self._stop.is_set() and time.monotonic() < deadline:
            wait = POLL
            if pending:
                wait = min(POLL, max(0.0, next_drip - time.monotonic()))
            readable = select.select([conn, up], [], [], wait)[0]
            if conn in readable:
                data = conn.recv(65536)
                if not data:
                    break
                up.sendall(data)
            if up in readable:
                data = up.recv(65536)
                if not data and not pending:
                    break
                pending += data
            if pending and time.monotonic() >= next_drip:
                conn.sendall(pending[:1])
                pending = pending[1:]
                self.dripped += 1
                next_drip = time.monotonic() + self.interval
        _close(up)


@contextlib.contextmanager
def closed_port(host="127.0.0.1"):
    """Yield a port on host where a connection is refused: bound by us, never listening."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def stop_process(proc, wait=JOIN):
    """Stop proc (a Popen) if it still runs: SIGTERM, then SIGKILL after wait seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(wait)


def free_ports(count, host="127.0.0.1"):
    """count distinct free TCP ports on host (bound together, then released), for servers
    that pick no port of their own (daemons, nginx, node_exporter)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


NGINX_CONFIG = """\
daemon off;
{master}pid {dir}/nginx.pid;
error_log {dir}/error.log {log_level};
events {{ worker_connections {connections}; }}
http {{
    access_log {access_log};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}}}
"""


def nginx_config(directory, servers, connections=64, log_level="info", access_log="off",
                 master=True):
    """An nginx.conf that runs nginx in the foreground, with every file in directory
    (run it with -p directory), serving servers (server blocks, as text); without a
    master process (one worker: what a bench measures) unless master."""
    return NGINX_CONFIG.format(dir=directory, servers=servers, connections=connections,
                               log_level=log_level, access_log=access_log,
                               master="" if master else "master_process off;\n")


def ipv6_available():
    """True when ::1 can be bound (some containers have no IPv6 loopback)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def openssl_available():
    try:
        return subprocess.run(["openssl", "version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


__all__ = ["TLSServer", "OpenSSLServer", "SilentServer", "GarbageServer", "HTTPServer",
           "CloseServer", "AlertServer", "DripProxy", "closed_port", "free_ports", "ipv6_available",
           "openssl_available", "ThreadedServer"]
