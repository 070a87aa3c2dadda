#!/usr/bin/env python3
"""How fast certgrab.py is, measured side by side in one run (`make bench`).

The speed targets of issue 2, each a ratio of two commands timed in the same run:

  (a) fetch cost: `certgrab.py 127.0.0.1:PORT -n www.example.test --cafile root.pem` against a
      bare stdlib script (written here to a temp file) that only does the same verified
      handshake and prints the served chain as PEM, on the same interpreter. Printed for
      information. certgrab is a plain script that Python compiles whole on every run (a
      script gets no .pyc), which a cron job does not notice and which grows with every
      feature; the guard of 1.75x (issue 10), whose purpose is to catch a heavy import
      slipping into the fetch path, is therefore held by (a) less that compile: what the
      run does beyond compiling its own file (confirmed by the founders). The raw ratio,
      compile included, is held under 2.5x so that the file's growth stays in view.
  (b) system trust store: certgrab without --cafile against certgrab with --cafile.
      Limit 1.15x. Measured twice:
      (b1) the test root made trusted through a hashed CA directory (SSL_CERT_DIR pointing to a
           temp dir holding an `openssl rehash`-style HASH.0 link), so the fetch succeeds;
      (b2) the machine's real default store, untouched: verification then fails (unknown
           issuer, exit 4), but loading the store, the cost in question, is paid all the same.
  (c) round trips: over a 100 ms RTT link (a delay proxy in this process adds 50 ms each way on
      loopback) a fetch may take 2 RTT for TLS 1.3 and 3 RTT for TLS 1.2 (TCP connect + the
      handshake) beyond its local cost (the same fetch without the proxy). Limit: half an RTT
      of slack. `openssl s_client -showcerts` is shown beside it where installed.
  (d) a fleet: `certgrab.py --check` over 64 sources (64 delay proxies, 100 ms RTT, in front
      of 8 TLS 1.3 servers), wall time of the whole run. Limit 1.0 s (issue 5). Beside it a
      serial loop of `openssl s_client` over 4 of the sources, extrapolated to 64.

  (e) a thousand endpoints (issue 15): `certgrab.py --check` over 1,024 sources, with default
      flags, against a loopback server that waits 100-200 ms after each accept before its
      handshake (where the kernel has no netem, as here); wall time of the whole run. Limit
      3.0 s. `--check --same` over the same: limit 3.5 s. Beside them the same fleet checked by a parallel loop of
      `openssl s_client` (xargs -P32), and with every source the same, no fleet is needed:
      each SOURCE names the one server again.

  (f) ten thousand endpoints (issue 23): `certgrab.py --check` over 10,240 sources served by
      nginx on loopback (no delay: the run is CPU-bound), a fleet serving two chains (ec1 and
      its renewal ec1new, SCALE_PORTS server blocks, half each), against a bare floor script
      (written here) that does the same verified handshakes in 256 threads and reads each
      served chain, nothing else. Each command's client CPU (user+sys) and peak RSS come from
      its own rusage (os.wait4). Limits: CPU at most 1.2x the floor's, peak RSS at most 1.5x;
      and the same at 1,024 sources, for linearity: certgrab's CPU per endpoint may grow from
      1,024 to 10,240 sources at most 1.1x more than the floor's own does. The bench writes
      nginx's configuration, raises its open-files limit and stops it when done. For
      information, certgrab's peak RSS against a floor that compiles certgrab.py first: a
      script is compiled on every run, and the memory that compile frees stays with the
      process (about 14 MB here, certgrab.py at 7,000 lines), which the fetch's threads
      do not reuse.

      Beside (a), for information: how long a fresh interpreter takes to compile certgrab.py
      (reading and compiling it, less reading it). Python compiles a script anew on every
      run, never caching it, and that compile is nearly all of the difference. Where
      valgrind is installed, (a) is counted again in instructions (callgrind), which do
      not vary with the machine's load, for the same split.
Method: every command is a new process, as a user runs it. Runs are interleaved round-robin
(the order rotating each round) so that noise from the machine hits all commands alike, and
medians are compared. Exit status: 0 when every limit holds, 1 when one fails, 2 when the
measurement itself could not be made (certgrab failed, a tool is missing...).

Usage: python3 tests/bench.py [--runs N] [--rtt-runs N] [--fleet-runs N] [--thousand-runs N]
                              [--scale-runs N] [--python PYTHON] [--only ROWS]
"""

import argparse
import contextlib
import os
import queue
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
CERTGRAB = os.path.join(os.path.dirname(TESTS), "certgrab.py")
sys.path.insert(0, TESTS)

import make_certs  # noqa: E402  (tests/ is put on sys.path just above)
import servers  # noqa: E402
from make_certs import NAME, pem_ders  # noqa: E402
CHAIN = "ec1"                 # one intermediate, like most public chains
RUNS = 21                     # rounds for (a) and (b); each round runs every command once
RTT_RUNS = 7                  # rounds for (c), where each proxied run takes 0.2-0.4 s
WARMUP = 2                    # rounds run first and thrown away (page cache, CPU clocks)
ONE_WAY = 0.050               # seconds the proxy holds data in each direction: RTT 100 ms
RTT = 2 * ONE_WAY
RTT_SLACK = 0.5               # RTTs allowed beyond the floor before we call it an extra trip
COMMAND_TIMEOUT = 30          # seconds; a fetch on loopback takes well under one
GUARD_A = 1.75                # (a) less compile: above, something heavy slipped into a fetch
LIMIT_A_RAW = 2.5             # (a) as measured, compile included: the file's size stays in view
LIMIT_B = 1.15
ROUND_TRIPS = {"1.3": 2, "1.2": 3}   # TCP connect + TLS handshake
FLEET = 64                    # sources for (d), as in issue 5
FLEET_SERVERS = 8             # TLS servers behind the 64 proxies (a listen backlog is 16)
FLEET_RUNS = 5                # rounds for (d)
LIMIT_D = 1.0                 # seconds for the whole --check run over the fleet
SERIAL_SAMPLE = 4             # sources the serial s_client loop visits, scaled to FLEET
THOUSAND = 1024               # sources for (e), as in issue 15
THOUSAND_DELAY = (0.1, 0.2)   # seconds the (e) server waits after each accept
THOUSAND_RUNS = 3             # rounds for (e); a round takes ~10 s, mostly the s_client loop
LIMIT_E, LIMIT_E_SAME = 3.0, 3.5    # seconds: issue 15's acceptance 1 and 2
XARGS_PARALLEL = 32           # s_client processes at once in the (e) loop
ROWS = "abcdef"               # every row; --only measures some of them
SCALE = 10240                 # sources for (f), as in issue 23: every endpoint of an organisation
SCALE_SMALL = 1024            # (f) again at a tenth: CPU per endpoint must not grow with the fleet
SCALE_CHAINS = ("ec1", "ec1new")  # (f)'s fleet serves two chains: a renewal half rolled out
SCALE_PORTS = 8               # nginx server blocks for (f), half per chain: spreads the
                              # 20,000 connections of a round over 8 ports' TIME_WAIT space
SCALE_THREADS = 256           # the floor's threads: certgrab's default --parallel
SCALE_RUNS = 3                # rounds for (f); a round takes ~45 s
SCALE_TIMEOUT = 600           # seconds for one (f) command; 10,240 handshakes take ~20 s
LIMIT_F_CPU, LIMIT_F_RSS = 1.2, 1.5     # (f) at 10,240 sources, x the floor: issue 23's
LIMIT_F_GROWTH = 1.1                    # acceptance 1 and 2
NGINX_CONNECTIONS = 4096      # nginx's worker_connections: 256 clients at once, with room
NGINX_FILES = 8192            # nginx's open-files limit, raised in the child (ulimit -n)
NGINX_READY = 10              # seconds nginx may take to listen

BARE_SCRIPT = r'''
"""Only a verified handshake, then the served chain as PEM: the floor certgrab is held to."""
import socket, ssl, sys
host, port, name, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=None if cafile == "-" else cafile)
sock = socket.create_connection((host, port), timeout=10)
try:
    tls = context.wrap_socket(sock, server_hostname=name)
except ssl.SSLError as e:
    sys.exit("bare: %s" % e)
if hasattr(tls, "get_unverified_chain"):      # 3.13+: DER bytes
    chain = tls.get_unverified_chain()
else:                                         # 3.10-3.12: private, _ssl.Certificate objects
    chain = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in tls._sslobj.get_unverified_chain()]
tls.close()
sys.stdout.write("".join(ssl.DER_cert_to_PEM_cert(der) for der in chain))
'''


# (f) measures each command's peak memory from its rusage. Linux starts a child's peak RSS at
# what the process had before exec: a command started by the bench (by then a large process,
# and through vfork its very memory) would report the bench's peak as its own. This small
# process starts it instead, and writes "exit-code user sys maxrss-KiB" to the file argv[1].
USAGE_LAUNCHER = r'''
import os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write("%d %r %r %d\n" % (os.waitstatus_to_exitcode(status), usage.ru_utime,
                                usage.ru_stime, usage.ru_maxrss))
'''

# (f)'s floor: the handshakes certgrab cannot avoid, in as many threads, reading each chain.
# FLOOR_COMPILING (for information) compiles the file argv[1] first, and throws the code away.
FLOOR_SCRIPT = r'''
"""Verified handshakes with 256 threads, each reading the served chain: (f)'s floor."""
import socket, ssl, sys, threading
name = sys.argv[1].encode("ascii")  # bytes, as certgrab passes it: a str costs the idna codec
cafile, threads, sources = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
context = ssl.create_default_context(cafile=cafile)
pending, lock, chains = list(reversed(sources)), threading.Lock(), []

def served_chain(source):
    host, port = source.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            if hasattr(tls, "get_unverified_chain"):      # 3.13+: DER bytes
                return tls.get_unverified_chain()
            return [c.public_bytes(ssl._ssl.ENCODING_DER)
                    for c in tls._sslobj.get_unverified_chain()]

def worker():
    while True:
        with lock:
            if not pending:
                return
            source = pending.pop()
        chain = served_chain(source)
        with lock:
            chains.append(len(chain))

workers = [threading.Thread(target=worker) for _ in range(min(threads, len(sources)))]
for worker_thread in workers:
    worker_thread.start()
for worker_thread in workers:
    worker_thread.join()
print("%d chains read" % sum(1 for count in chains if count))
'''
FLOOR_COMPILING = r'''
import sys
compile(open(sys.argv.pop(1)).read(), "certgrab.py", "exec")
''' + FLOOR_SCRIPT

NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl backlog={backlog};
        server_name {name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate     {fullchain};
        ssl_certificate_key {key};
        return 204;
    }}
"""


class BenchError(Exception):
    """The measurement could not be made; exit 2 with this message."""


# ---------------------------------------------------------------- running and timing commands

class Command(object):
    """One command line to time, with its environment and the exit codes it may end with."""

    def __init__(self, label, argv, env=None, codes=(0,)):
        self.label, self.argv, self.env, self.codes = label, argv, env, codes
        self.times = []     # wall seconds, what the user waits for: the verdicts use these
        self.cpu_times = []  # user+system seconds of the process: steadier, shown beside

    def run(self):
        """Run once; record and return (seconds, stdout). Raise BenchError on a wrong exit."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=COMMAND_TIMEOUT)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode not in self.codes:
            raise BenchError("%s: exit %d, expected %s\n  $ %s\n%s" % (
                self.label, proc.returncode, "/".join(map(str, self.codes)),
                " ".join(self.argv), proc.stderr.decode(errors="replace").strip()))
        self.times.append(elapsed)
        self.cpu_times.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return elapsed, proc.stdout

    def clear(self):
        self.times, self.cpu_times = [], []

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def cpu_median(self):
        return statistics.median(self.cpu_times)


class MeasuredCommand(Command):
    """A Command whose CPU time and peak memory are its own: it runs under launcher (a file
    holding USAGE_LAUNCHER), which writes the rusage os.wait4 returns for it (user+sys and
    ru_maxrss of the process and of any child it waited for) to a file read here."""

    def __init__(self, label, argv, launcher, env=None, codes=(0,), timeout=SCALE_TIMEOUT):
        Command.__init__(self, label, argv, env, codes)
        self.launcher, self.timeout = launcher, timeout
        self.peak_rss = []      # bytes, one per run

    def run(self):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.NamedTemporaryFile("r") as usage:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, self.launcher, usage.name] + self.argv,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)     # the launcher and the command
                proc.wait()
                raise BenchError("%s: still running after %d s" % (self.label, self.timeout))
            elapsed = time.perf_counter() - start
            fields = usage.read().split()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        code = int(fields[0]) if len(fields) == 4 else proc.returncode
        if code not in self.codes:
            raise BenchError("%s: exit %d, expected %s\n  $ %s ...\n%s" % (
                self.label, code, "/".join(map(str, self.codes)), " ".join(self.argv[:8]),
                stderr.decode(errors="replace").strip()[-2000:]))
        self.times.append(elapsed)
        self.cpu_times.append(float(fields[1]) + float(fields[2]))
        self.peak_rss.append(int(fields[3]) * 1024)     # Linux counts it in KiB
        return elapsed, stdout

    def clear(self):
        Command.clear(self)
        self.peak_rss = []

    @property
    def rss_median(self):
        return statistics.median(self.peak_rss)


def measure(commands, runs, warmup=WARMUP):
    """Run every command `runs` times, interleaved round-robin, rotating the order each round."""
    for _ in range(warmup):
        for command in commands:
            command.run()
        for command in commands:
            command.clear()
    for i in range(runs):
        shift = i % len(commands)
        for command in commands[shift:] + commands[:shift]:
            command.run()


# ---------------------------------------------------------------- the delay proxy

class DelayProxy(object):
    """Forward 127.0.0.1:self.port to a loopback port, holding data ONE_WAY seconds each way.

    The kernel completes a TCP connect to the proxy at once, so the connect round trip is
    added to the client's first bytes instead: in real life the client could send them only
    one RTT after calling connect(). From the client's side every exchange then costs what it
    would over the slow link, connect included.
    """

    def __init__(self, target_port, one_way=ONE_WAY):
        self.target_port, self.one_way = target_port, one_way
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]

    def __enter__(self):
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.listener.close()

    def _accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [threading.Thread(target=self._pump, args=(client, upstream, 2 * self.one_way)),
                 threading.Thread(target=self._pump, args=(upstream, client, 0.0))]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        client.close()
        upstream.close()

    def _pump(self, src, dst, first_extra):
        """Copy src to dst, each chunk delivered one_way after it arrived (EOF too)."""
        chunks = queue.Queue()
        writer = threading.Thread(target=self._deliver, args=(chunks, dst))
        writer.start()
        extra = first_extra
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.one_way + extra, data))
            extra = 0.0
            if not data:
                break
        writer.join()

    @staticmethod
    def _deliver(chunks, dst):
        broken = False
        while True:
            due, data = chunks.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if not broken:
                    dst.sendall(data)
            except OSError:
                broken = True  # peer gone: keep draining until EOF
                if not data:
                    return


# ---------------------------------------------------------------- the measurements

def make_hashed_ca_dir(root_pem, directory):
    """A CA directory holding root_pem as HASH.0, as `openssl rehash` makes it."""
    proc = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", root_pem],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    os.makedirs(directory)
    os.symlink(root_pem, os.path.join(directory, proc.stdout.decode().strip() + ".0"))
    return directory


def check_outputs(certgrab, bare, served_pem):
    """Both programs must print exactly the served chain, or the timing compares nothing."""
    served = make_certs.read_ders(served_pem)
    for command in (certgrab, bare):
        _, out = command.run()
        printed = pem_ders(out.decode())
        if printed != served:
            raise BenchError("%s did not print the served chain (%d certificates, expected %d)"
                             % (command.label, len(printed), len(served)))
        command.clear()


def bench_local(python, certs, tmp, port, runs):
    """(a) and (b): returns (commands, result rows)."""
    chain = os.path.join(certs, CHAIN)
    root = os.path.join(chain, "root.pem")
    bare_path = os.path.join(tmp, "bare_handshake.py")
    with open(bare_path, "w") as f:
        f.write(BARE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    hashed_env = dict(env, SSL_CERT_DIR=make_hashed_ca_dir(root, os.path.join(tmp, "capath")))
    source = "127.0.0.1:%d" % port

    cg_cafile = Command("certgrab --cafile root.pem",
                        [python, CERTGRAB, source, "-n", NAME, "--cafile", root], env)
    bare_cafile = Command("bare handshake script, root.pem",
                          [python, bare_path, "127.0.0.1", str(port), NAME, root], env)
    cg_hashed = Command("certgrab, system store = hashed dir (SSL_CERT_DIR)",
                        [python, CERTGRAB, source, "-n", NAME], hashed_env)
    cg_default = Command("certgrab, real default store (exit 4 expected)",
                         [python, CERTGRAB, source, "-n", NAME], env, codes=(4,))
    bare_default = Command("bare handshake script, default store (for reference)",
                           [python, bare_path, "127.0.0.1", str(port), NAME, "-"], env, codes=(1,))
    start = Command("python -c pass: interpreter start (for reference)", [python, "-c", "pass"],
                    env)
    read = Command("python reading certgrab.py (for reference)",
                   [python, "-c", "open(%r).read()" % CERTGRAB], env)
    compile_code = "compile(open(%r).read(), %r, 'exec')" % (CERTGRAB, CERTGRAB)
    compiled = Command("python reading and compiling certgrab.py (for reference)",
                       [python, "-c", compile_code], env)
    check_outputs(cg_cafile, bare_cafile, os.path.join(chain, "fullchain.pem"))
    commands = [cg_cafile, bare_cafile, cg_hashed, cg_default, bare_default, start, read,
                compiled]
    measure(commands, runs)
    instructions = (cg_cafile, bare_cafile, read, compiled)   # for count_instructions

    a = cg_cafile.median / bare_cafile.median
    compile_ms = (compiled.median - read.median) * 1000     # Python redoes it on every run
    a_run = (cg_cafile.median - compile_ms / 1000) / bare_cafile.median
    b1 = cg_hashed.median / cg_cafile.median
    b2 = cg_default.median / cg_cafile.median
    rows = [
        ("(a) certgrab / bare handshake script", "%.2fx" % a, "", "%.2fx" % LIMIT_A_RAW,
         _verdict(a <= LIMIT_A_RAW)),
        ("    the same in CPU time", "%.2fx" % (cg_cafile.cpu_median / bare_cafile.cpu_median),
         "", "", "(for information)"),
        ("    compiling certgrab.py, ms of the difference", "%.0f/%.0f" % (
            compile_ms, (cg_cafile.median - bare_cafile.median) * 1000), "", "",
         "(for information)"),
        ("    (a) less that compile: the guard", "%.2fx" % a_run, "", "%.2fx" % GUARD_A,
         _verdict(a_run <= GUARD_A)),
        ("(b1) system store (hashed dir) / --cafile", "%.2fx" % b1, "", "%.2fx" % LIMIT_B,
         _verdict(b1 <= LIMIT_B)),
        ("(b2) real default store / --cafile", "%.2fx" % b2, "", "%.2fx" % LIMIT_B,
         _verdict(b2 <= LIMIT_B)),
        ("    the same in CPU time", "%.2fx" % (cg_default.cpu_median / cg_cafile.cpu_median),
         "", "", "(for information)"),
    ]
    return commands, rows, instructions


def count_instructions(command, tmp):
    """Instructions the command executes, counted by valgrind's callgrind: unlike time, the
    same from run to run, whatever else the machine is doing."""
    out = os.path.join(tmp, "callgrind.out")
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out]
                          + command.argv, env=command.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=COMMAND_TIMEOUT * 10)
    if os.path.exists(out):
        os.remove(out)
    found = re.search(rb"Collected : (\d+)", proc.stderr)
    if proc.returncode not in command.codes or not found:
        raise BenchError("%s under valgrind: exit %d\n%s" % (
            command.label, proc.returncode, proc.stderr.decode(errors="replace")[-2000:]))
    return int(found.group(1))


def instruction_rows(python, quartet, tmp):
    """(a) again in instructions, with what compiling certgrab.py accounts for."""
    if not _which("valgrind"):
        return [("(a) in instructions", "-", "", "", "(valgrind not installed)")]
    real = subprocess.run([python, "-c", "import sys; print(sys.executable)"],
                          stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    counts = []
    for command in quartet:     # valgrind needs the interpreter itself, not a pyenv shim
        counts.append(count_instructions(Command(command.label, [real] + command.argv[1:],
                                                 command.env, command.codes), tmp))
    certgrab, bare, read, compiled = counts
    compiling = compiled - read
    return [
        ("(a) in instructions (callgrind: %.1fM / %.1fM)" % (certgrab / 1e6, bare / 1e6),
         "%.2fx" % (certgrab / bare), "", "", "(for information)"),
        ("    compiling certgrab.py, M of the difference", "%.1f/%.1f" % (
            compiling / 1e6, (certgrab - bare) / 1e6), "", "", "(for information)"),
        ("    (a) less that compile, in instructions", "%.2fx" % (
            (certgrab - compiling) / bare), "", "", "(for information)"),
    ]


def bench_round_trips(python, certs, ports, runs):
    """(c): returns (commands, result rows)."""
    root = os.path.join(certs, CHAIN, "root.pem")
    tools = [("certgrab", lambda p: [python, CERTGRAB, "127.0.0.1:%d" % p, "-n", NAME,
                                     "--cafile", root])]
    if _which("openssl"):
        tools.append(("openssl s_client -showcerts",
                      lambda p: ["openssl", "s_client", "-connect", "127.0.0.1:%d" % p,
                                 "-servername", NAME, "-CAfile", root,
                                 "-verify_return_error", "-showcerts"]))
    commands, pairs = [], []
    with contextlib.ExitStack() as stack:
        for tls, port in sorted(ports.items(), reverse=True):
            proxy = stack.enter_context(DelayProxy(port))
            for who, argv in tools:
                pair = [Command("%s, TLS %s, %s" % (who, tls, via), argv(p))
                        for via, p in (("direct", port), ("100 ms RTT", proxy.port))]
                pairs.append((tls, who, pair))
                commands += pair
        measure(commands, runs)

    rows = []
    for tls, who, (direct, proxied) in pairs:
        trips = (proxied.median - direct.median) / RTT
        floor = ROUND_TRIPS[tls]
        label = "(c) %s, TLS %s: RTTs beyond local" % (who.split(" -")[0], tls)
        if who == "certgrab":
            rows.append((label, "%.2f" % trips, "%d" % floor, "%.1f" % (floor + RTT_SLACK),
                         _verdict(trips <= floor + RTT_SLACK)))
        else:
            rows.append((label, "%.2f" % trips, "%d" % floor, "", "(for comparison)"))
    return commands, rows


def check_fleet_output(command, sources):
    """--check must report every source OK, one line each in order, or the time means nothing."""
    _, out = command.run()
    lines = out.decode().splitlines()
    if not lines or not lines[0].startswith("CERTGRAB OK - %d source(s)" % len(sources)) or \
            [line.split(": ")[0] for line in lines[1:]] != ["OK - " + s for s in sources]:
        raise BenchError("%s: not one OK line per source, in order:\n%s"
                         % (command.label, out.decode()[:2000]))
    command.clear()


def bench_fleet(python, certs, runs):
    """(d): returns (commands, result rows)."""
    chain = os.path.join(certs, CHAIN)
    root = os.path.join(chain, "root.pem")
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(servers.TLSServer(
            os.path.join(chain, "fullchain.pem"), os.path.join(chain, "key.pem"), tls="1.3"))
            for _ in range(FLEET_SERVERS)]
        proxies = [stack.enter_context(DelayProxy(upstreams[i % FLEET_SERVERS].port))
                   for i in range(FLEET)]
        sources = ["127.0.0.1:%d" % proxy.port for proxy in proxies]
        certgrab = Command("certgrab --check, %d sources, 100 ms RTT" % FLEET,
                           [python, CERTGRAB, "--check", "-n", NAME, "--cafile", root] + sources)
        check_fleet_output(certgrab, sources)
        commands = [certgrab]
        if _which("openssl"):
            loop = " ".join(
                "openssl s_client -connect %s -servername %s -CAfile %s -verify_return_error "
                "-showcerts </dev/null >/dev/null 2>&1 || exit 1;" % (source, NAME, root)
                for source in sources[:SERIAL_SAMPLE])
            commands.append(Command("serial openssl s_client loop, %d sources" % SERIAL_SAMPLE,
                                    ["sh", "-c", loop]))
        measure(commands, runs)

    rows = [("(d) %d sources, 100 ms RTT, --check" % FLEET, "%.2f s" % certgrab.median, "",
             "%.1f s" % LIMIT_D, _verdict(certgrab.median <= LIMIT_D))]
    if len(commands) > 1:
        serial = commands[1].median * FLEET / SERIAL_SAMPLE
        rows.append(("    serial s_client loop, scaled to %d" % FLEET, "%.1f s" % serial, "",
                     "", "(for comparison: %.0fx)" % (serial / certgrab.median)))
    return commands, rows


def bench_thousand(python, certs, runs):
    """(e): returns (commands, result rows)."""
    chain = os.path.join(certs, CHAIN)
    root = os.path.join(chain, "root.pem")
    with servers.DelayedTLSServer(os.path.join(chain, "fullchain.pem"),
                                  os.path.join(chain, "key.pem"), THOUSAND_DELAY) as server:
        sources = [server.address] * THOUSAND
        argv = [python, CERTGRAB, "--check", "-n", NAME, "--cafile", root] + sources
        check = Command("certgrab --check, %d sources, default flags" % THOUSAND, argv)
        same = Command("certgrab --check --same, %d sources" % THOUSAND, argv + ["--same"])
        for command in (check, same):
            check_fleet_output(command, sources)
        commands = [check, same]
        if _which("openssl") and _which("xargs"):
            loop = ("printf '%%s\\n' \"$@\" | xargs -P%d -n1 sh -c 'openssl s_client "
                    "-connect \"$0\" -servername %s -CAfile %s -verify_return_error "
                    "</dev/null >/dev/null 2>&1'" % (XARGS_PARALLEL, NAME, root))
            commands.append(Command("openssl s_client loop, xargs -P%d, %d sources"
                                    % (XARGS_PARALLEL, THOUSAND), ["sh", "-c", loop, "sh"]
                                    + sources))
        measure(commands, runs)
    rows = [("(e) %d sources, 100-200 ms, --check" % THOUSAND, "%.2f s" % check.median, "",
             "%.1f s" % LIMIT_E, _verdict(check.median <= LIMIT_E)),
            ("(e) the same with --same", "%.2f s" % same.median, "", "%.1f s" % LIMIT_E_SAME,
             _verdict(same.median <= LIMIT_E_SAME))]
    if len(commands) > 2:
        loop = commands[2].median
        rows.append(("    s_client loop, xargs -P%d" % XARGS_PARALLEL, "%.1f s" % loop, "", "",
                     "(for comparison: %.1fx)" % (loop / check.median)))
    return commands, rows


class NginxFleet(object):
    """nginx on loopback for (f): SCALE_PORTS server blocks on ports of their own, half
    serving each chain of SCALE_CHAINS; one process (master_process off), its open-files
    limit raised to NGINX_FILES in the child, its configuration and logs in directory,
    stopped on leaving the `with` block."""

    def __init__(self, nginx, certs, directory):
        self.nginx, self.certs, self.dir = nginx, certs, directory
        self.proc, self.ports = None, []

    def __enter__(self):
        os.makedirs(self.dir)
        self.ports = servers.free_ports(SCALE_PORTS)
        servers_text = "".join(NGINX_SERVER.format(
            port=port, backlog=NGINX_CONNECTIONS, name=NAME,
            fullchain=os.path.join(self.certs, chain, "fullchain.pem"),
            key=os.path.join(self.certs, chain, "key.pem"))
            for port, chain in zip(self.ports, SCALE_CHAINS * SCALE_PORTS))
        config = os.path.join(self.dir, "nginx.conf")
        with open(config, "w") as f:
            f.write(servers.nginx_config(self.dir, servers_text, connections=NGINX_CONNECTIONS,
                                         log_level="warn", master=False))
        self.proc = subprocess.Popen([self.nginx, "-p", self.dir, "-c", config,
                                      "-e", os.path.join(self.dir, "error.log")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, preexec_fn=_raise_file_limit)
        try:
            self._wait_listening()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_listening(self):
        deadline = time.monotonic() + NGINX_READY
        waiting = list(self.ports)
        while waiting:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.dir, "error.log")) as f:
                    raise BenchError("nginx does not listen on port %d:\n%s"
                                     % (waiting[0], f.read()[-2000:]))
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.05)

    def __exit__(self, *exc):
        if self.proc is not None:
            servers.stop_process(self.proc, 10)

    def sources(self, count):
        """count SOURCEs over the ports in turn: the two chains alternate."""
        return ["127.0.0.1:%d" % self.ports[i % len(self.ports)] for i in range(count)]


def _raise_file_limit():
    """In nginx's child: its open-files limit up to NGINX_FILES (as far as the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NGINX_FILES if hard == resource.RLIM_INFINITY else min(NGINX_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))


def check_floor_output(command, count):
    """The floor must have read a chain from every source, or its CPU means nothing."""
    _, out = command.run()
    if out.decode().strip() != "%d chains read" % count:
        raise BenchError("%s: %r, expected %d chains read" % (command.label, out[:200], count))
    command.clear()


def bench_scale(python, certs, tmp, runs):
    """(f): returns (commands, result rows)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not nginx:
        raise BenchError("(f) needs nginx (apt-get install nginx)")
    root = os.path.join(certs, SCALE_CHAINS[0], "root.pem")
    floor_path = os.path.join(tmp, "floor_handshakes.py")
    compiling_path = os.path.join(tmp, "floor_compiling.py")
    launcher = os.path.join(tmp, "usage_launcher.py")
    for path, text in ((floor_path, FLOOR_SCRIPT), (compiling_path, FLOOR_COMPILING),
                       (launcher, USAGE_LAUNCHER)):
        with open(path, "w") as f:
            f.write(text)
    pairs = {}
    with NginxFleet(nginx, certs, os.path.join(tmp, "nginx")) as fleet:
        for count in (SCALE, SCALE_SMALL):
            sources = fleet.sources(count)
            certgrab = MeasuredCommand("certgrab --check, %d sources, nginx" % count,
                                       [python, CERTGRAB, "--check", "-n", NAME, "--cafile",
                                        root] + sources, launcher)
            floor = MeasuredCommand("floor: handshakes in %d threads, %d sources"
                                    % (SCALE_THREADS, count),
                                    [python, floor_path, NAME, root, str(SCALE_THREADS)]
                                    + sources, launcher)
            check_fleet_output(certgrab, sources)       # also the warm-up round
            check_floor_output(floor, count)
            pairs[count] = certgrab, floor
        compiling = MeasuredCommand("floor, compiling certgrab.py first, %d sources" % SCALE,
                                    [python, compiling_path, CERTGRAB, NAME, root,
                                     str(SCALE_THREADS)] + fleet.sources(SCALE), launcher)
        check_floor_output(compiling, SCALE)
        commands = [command for count in (SCALE, SCALE_SMALL) for command in pairs[count]]
        measure(commands + [compiling], runs, warmup=0)
    return commands + [compiling], _scale_rows(pairs, compiling)


def _scale_rows(pairs, compiling):
    """(f)'s ratios: CPU and peak RSS at SCALE, CPU per endpoint's growth from SCALE_SMALL;
    for information, peak RSS against the floor that compiled certgrab.py first (compiling
    leaves megabytes the process keeps, which the fetch does not reuse: what certgrab is,
    apart from what it does)."""
    certgrab, floor = pairs[SCALE]
    cpu, rss = certgrab.cpu_median / floor.cpu_median, certgrab.rss_median / floor.rss_median
    per_endpoint = dict((count, [command.cpu_median / count * 1000 for command in pair])
                        for count, pair in pairs.items())    # ms: [certgrab, floor]
    growth = [big / small for big, small in zip(per_endpoint[SCALE], per_endpoint[SCALE_SMALL])]
    return [
        ("(f) %d sources: client CPU / floor's" % SCALE, "%.2fx" % cpu, "",
         "%.2fx" % LIMIT_F_CPU, _verdict(cpu <= LIMIT_F_CPU)),
        ("(f) peak RSS / floor's (%.0f / %.0f MB)" % (certgrab.rss_median / 2 ** 20,
                                                     floor.rss_median / 2 ** 20),
         "%.2fx" % rss, "", "%.2fx" % LIMIT_F_RSS, _verdict(rss <= LIMIT_F_RSS)),
        ("(f) CPU/endpoint growth %d->%d / floor's" % (SCALE_SMALL, SCALE),
         "%.2fx" % (growth[0] / growth[1]), "", "%.2fx" % LIMIT_F_GROWTH,
         _verdict(growth[0] / growth[1] <= LIMIT_F_GROWTH)),
        ("    CPU ms/endpoint, certgrab %d, %d" % (SCALE_SMALL, SCALE), "%.2f/%.2f" % (
            per_endpoint[SCALE_SMALL][0], per_endpoint[SCALE][0]), "", "", "(for information)"),
        ("    CPU ms/endpoint, floor %d, %d" % (SCALE_SMALL, SCALE), "%.2f/%.2f" % (
            per_endpoint[SCALE_SMALL][1], per_endpoint[SCALE][1]), "", "", "(for information)"),
    ] + [("    peak RSS MB, %s %d, %d" % (who, SCALE_SMALL, SCALE), "%.0f/%.0f" % (
        pairs[SCALE_SMALL][index].rss_median / 2 ** 20, pairs[SCALE][index].rss_median / 2 ** 20),
        "", "", "(for information)") for index, who in enumerate(("certgrab", "floor"))] + [
        ("    peak RSS / floor compiling certgrab.py (%.0f)" % (compiling.rss_median / 2 ** 20),
         "%.2fx" % (certgrab.rss_median / compiling.rss_median), "", "", "(for information)")]


def _verdict(within_limit, within_target=True):
    if not within_limit:
        return "FAIL"
    return "PASS" if within_target else "PASS (over target)"


def _which(program):
    return any(os.access(os.path.join(d, program), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep))


# ---------------------------------------------------------------- report and main

def print_report(commands, rows):
    print()
    print("%-58s %8s %8s" % ("command (medians of interleaved runs)", "wall ms", "cpu ms"))
    for command in commands:
        print("%-58s %8.1f %8.1f" % (command.label, command.median * 1000,
                                     command.cpu_median * 1000))
    print()
    print("%-48s %9s %7s %7s  %s" % ("target", "measured", "target", "limit", "result"))
    for row in rows:
        print("%-48s %9s %7s %7s  %s" % row)
    print()


def interpreter_info(python):
    code = "import sys, ssl; print(sys.version.split()[0], ssl.OPENSSL_VERSION)"
    out = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, check=True).stdout
    return out.decode().strip()


def _row_letters(text):
    """--only's value: some of ROWS, in any order, a and b together."""
    letters = set(text.lower())
    if not letters or not letters <= set(ROWS):
        raise argparse.ArgumentTypeError("rows are letters among %s" % ROWS)
    if letters & set("ab"):
        letters |= set("ab")
    return "".join(sorted(letters))


def measure_rows(args, tmp):
    """The commands and result rows of the rows args.only names, in order."""
    certs = make_certs.generate(os.path.join(tmp, "certs"))
    commands, rows = [], []
    if set(args.only) & set("abc"):
        fullchain = os.path.join(certs, CHAIN, "fullchain.pem")
        key = os.path.join(certs, CHAIN, "key.pem")
        with servers.TLSServer(fullchain, key, tls="1.3") as s13, \
                servers.TLSServer(fullchain, key, tls="1.2") as s12:
            if "a" in args.only:
                local, local_rows, quartet = bench_local(args.python, certs, tmp, s13.port,
                                                         args.runs)
                local_rows[4:4] = instruction_rows(args.python, quartet, tmp)  # after (a)
                commands, rows = commands + local, rows + local_rows
            if "c" in args.only:
                remote, rtt_rows = bench_round_trips(args.python, certs,
                                                     {"1.3": s13.port, "1.2": s12.port},
                                                     args.rtt_runs)
                commands, rows = commands + remote, rows + rtt_rows
    for letter, bench, runs in (("d", bench_fleet, args.fleet_runs),
                                ("e", bench_thousand, args.thousand_runs)):
        if letter in args.only:
            more, more_rows = bench(args.python, certs, runs)
            commands, rows = commands + more, rows + more_rows
    if "f" in args.only:
        scale, scale_rows = bench_scale(args.python, certs, tmp, args.scale_runs)
        commands, rows = commands + scale, rows + scale_rows
    return commands, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="rounds for (a), (b)")
    parser.add_argument("--rtt-runs", type=int, default=RTT_RUNS, help="rounds for (c)")
    parser.add_argument("--fleet-runs", type=int, default=FLEET_RUNS, help="rounds for (d)")
    parser.add_argument("--thousand-runs", type=int, default=THOUSAND_RUNS,
                        help="rounds for (e)")
    parser.add_argument("--scale-runs", type=int, default=SCALE_RUNS, help="rounds for (f)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for certgrab and the bare script (3.10+)")
    parser.add_argument("--only", type=_row_letters, default=ROWS, metavar="ROWS",
                        help="measure only these rows, e.g. f or ce (a and b are measured "
                             "together); default: all")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        info = interpreter_info(args.python)
        print("certgrab bench: Python %s, %s" % tuple(info.split(" ", 1)))
        if tuple(map(int, info.split()[0].split(".")[:2])) < (3, 10):
            raise BenchError("the bare reference script needs Python 3.10+ (--python)")
        if not _which("openssl"):
            raise BenchError("needs the openssl command (apt-get install openssl)")
        print("%d interleaved rounds for (a)/(b), %d for (c), %d for (d), %d for (e), %d for "
              "(f), medians; RTT %d ms; rows %s" % (
                  args.runs, args.rtt_runs, args.fleet_runs, args.thousand_runs,
                  args.scale_runs, RTT * 1000, args.only))
        with tempfile.TemporaryDirectory(prefix="certgrab-bench-") as tmp:
            commands, rows = measure_rows(args, tmp)
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        print("bench: %s" % e, file=sys.stderr)
        return 2
    print_report(commands, rows)
    failed = [row[0] for row in rows if row[-1] == "FAIL"]
    print("%s in %.0f s" % ("FAIL: " + "; ".join(failed) if failed else "all limits met",
                            time.monotonic() - started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
