"""The constants and helpers the test modules share: one of each, here (fixtures: conftest.py).

    Where things are     TESTS, ROOT, CERTGRAB, IN_CI; which(name), tool(name)
    Exit codes           OK, INTERNAL, USAGE, FETCH, VERIFY, WRITE, REFUSED, HOOK_PENDING;
                         --check's WARNING, CRITICAL, UNKNOWN
    Running certgrab     Result; grab_args(server, chain_dir, *extra), grab(run, server,
                         chain_dir, *extra); run_subprocess(argv), popen(argv), completed(proc)
    What it said         error_lines(err), warnings(err), assert_one_error(result),
                         assert_refused(result, code), assert_only_certgrabs_perfdata
    Files                OUT_FILES, LOCK, TEMP_MARK, PENDING_MTIME; snapshot, expected,
                         files_ders, entries, temp_files, hook_command, hook_runs,
                         openssl_verify, assert_verifies, assert_fullchain_verifies
    Certificate facts    load_cert, iso, serial_hex, sha256, describe (pyca/cryptography)
    The docstring        docstring_exit_codes(certgrab)
    Other Pythons        MINORS, find_interpreter(minor), interpreter(minor), certgrab_run
    Minimal roots        ROOTS, CHROOT, CHROOT_ENV, SYSTEMS; minimal_root(suite),
                         minimal_host(suite, files): a MinimalHost
    Mount namespaces     UNSHARE, run_with_mounts(mounts, argv), run_with_dev_log(directory,
                         *argv), received(sock)
    --prometheus         parse_metrics, metric_values, source_metric, install_outcome,
                         assert_promtool_accepts
    A bug, injected      inject_bug, bug_line, call_main
    Real daemons         grab_daemon, served_chain, explain, assert_prints_served_chain,
                         failed_fetch_line

The server name every test certificate carries, and DAY and HOUR, are make_certs.py's
(NAME, DAY, HOUR): that script runs on its own, as does bench.py, without this module.
"""

import collections
import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from daemons import HOST
from make_certs import NAME, ders_to_pem, pem_ders, read_ders

# ---------------------------------------------------------------- where things are

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CERTGRAB = os.path.join(ROOT, "certgrab.py")
IN_CI = os.environ.get("CI", "").lower() == "true"
SBIN = os.defpath + ":/usr/sbin:/sbin"   # root's programs (chroot, unshare, nginx) too


def which(name):
    """The path of program name on PATH or in the sbin directories, or None."""
    return shutil.which(name, path=os.environ.get("PATH", os.defpath) + ":" + SBIN)


def tool(name):
    """The path of a program the tests need (a name, or an absolute path); a test without it
    is skipped locally and fails under CI, which installs it."""
    path = which(name) if not os.path.isabs(name) else (name if os.path.exists(name) else None)
    if path is None:
        if IN_CI:
            pytest.fail("%s is not installed; CI installs it" % name)
        pytest.skip("%s is not installed" % name)
    return path


# ---------------------------------------------------------------- exit codes (the docstring's)

OK = 0             # success: verified and written, or up to date
INTERNAL = 1       # a bug in certgrab outside any one source
USAGE = 2          # usage error
FETCH = 3          # cannot fetch
VERIFY = 4         # verification failed
WRITE = 5          # cannot write
REFUSED = 6        # refused by a safety check
HOOK_PENDING = 7   # files installed, deploy hook pending
# With --check, --same or --expect-file: a monitoring plugin's codes (OK as above)
WARNING = 1
CRITICAL = 2
UNKNOWN = 3        # also a usage error under --check


# ---------------------------------------------------------------- running certgrab

Result = collections.namedtuple("Result", "rc out err elapsed")   # of the run fixture


def grab_args(server, chain_dir, *extra):
    """The argv SERVER -n NAME --cafile CHAIN_DIR/root.pem EXTRA...: one run against a
    loopback server (anything with .address) serving a chain made by make_certs.py (or
    ca_servers.py, profiles.py), trusting that chain's root."""
    return [server.address, "-n", NAME, "--cafile", os.path.join(str(chain_dir), "root.pem")] \
        + list(extra)


def grab(run, server, chain_dir, *extra):
    """grab_args(server, chain_dir, *extra) run in-process by the run fixture: its Result."""
    return run(*grab_args(server, chain_dir, *extra))


def run_subprocess(argv, timeout=30, python=sys.executable, **popen_kw):
    """certgrab.py ARGV as a child process of python; CompletedProcess with text output."""
    return subprocess.run([python, CERTGRAB] + [str(a) for a in argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, universal_newlines=True, timeout=timeout,
                          **popen_kw)


def popen(argv, **kw):
    """certgrab.py ARGV started as a child process (for kills and races); text output."""
    return subprocess.Popen([sys.executable, CERTGRAB] + [str(a) for a in argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, universal_newlines=True, **kw)


def completed(proc):
    """A finished child's CompletedProcess (text) as a Result, for the assertions below."""
    return Result(proc.returncode, proc.stdout, proc.stderr, None)


# ---------------------------------------------------------------- what certgrab said

def error_lines(err):
    """The stderr lines that are not hints or warnings: the errors (or a report's lines)."""
    return [line for line in err.splitlines() if line.strip()
            and not line.startswith(("certgrab: hint:", "certgrab: warning:"))]


def warnings(err):
    """The `certgrab: warning:` lines of stderr, as one text."""
    return "\n".join(line for line in err.splitlines() if line.startswith("certgrab: warning:"))


def assert_one_error(result, allow_usage=False):
    """stderr holds exactly one `certgrab: ...` error line, plus optional `certgrab: hint:`
    and `certgrab: warning:` lines (and, with allow_usage, argparse's `usage:` lines);
    no traceback. Returns that line."""
    assert "Traceback" not in result.err, result.err
    lines = error_lines(result.err)
    if allow_usage:
        lines = [line for line in lines if line.startswith("certgrab")]
    assert len(lines) == 1, "want one error line, got:\n" + result.err
    assert lines[0].startswith("certgrab: "), result.err
    return lines[0]


def assert_only_certgrabs_perfdata(out, sources):
    """--check's first line has one "|", and after it only certgrab's perfdata for sources;
    no other line has any. Returns the first line."""
    first, *rest = out.splitlines()
    assert first.count("|") == 1, first
    perfdata = first.split(" | ")[1]
    own = r"'expires_in %s'=-?\d+s;\d+:;\d+: 'age %s'=\d+s"
    assert re.fullmatch(" ".join(own % (re.escape(s), re.escape(s)) for s in sources),
                        perfdata), perfdata
    assert not any("|" in line for line in rest), rest
    return first


def assert_refused(result, code, allow_usage=False):
    """The run failed as a user is told it failed: exit code, nothing on stdout, one
    `certgrab: ...` line saying why (plus hints and warnings), no traceback. Returns the line.
    For a child process, pass completed(proc)."""
    assert result.rc == code, "exit %r, want %r; stderr:\n%s" % (result.rc, code, result.err)
    assert result.out == "", "stdout should be empty: %r" % result.out
    return assert_one_error(result, allow_usage=allow_usage)


# ---------------------------------------------------------------- files

OUT_FILES = ["cert.pem", "chain.pem", "fullchain.pem"]   # what --out-dir holds
TEMP_MARK = ".certgrab-tmp-"
LOCK = ".certgrab.lock"  # certgrab's lock file in each directory it writes (mode 0600, stays)
PENDING_MTIME = 1  # certgrab dates files whose hook has not yet run 1970-01-01T00:00:01Z


def snapshot(directory):
    """{name: (bytes, inode, mtime_ns, mode, uid, gid)} of every entry in directory."""
    state = {}
    for name in sorted(os.listdir(str(directory))):
        path = os.path.join(str(directory), name)
        st = os.lstat(path)
        with open(path, "rb") as f:
            data = f.read()
        state[name] = (data, st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                       st.st_uid, st.st_gid)
    return state


def expected(certs, chain):
    """{file name: [DER, ...]} of what --out-dir must hold for chain."""
    full = read_ders(certs / chain / "fullchain.pem")
    return {"cert.pem": full[:1], "chain.pem": full[1:], "fullchain.pem": full}


def files_ders(directory, names=OUT_FILES):
    """{file name: [DER, ...]} of what --out-dir holds now."""
    return dict((name, read_ders(os.path.join(str(directory), name))) for name in names)


def entries(directory):
    """The names in directory, sorted, without certgrab's lock file; that one, if there,
    must be a regular file of mode 0600 owned by the user running the tests (root)."""
    names = sorted(os.listdir(str(directory)))
    if LOCK in names:
        st = os.lstat(os.path.join(str(directory), LOCK))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 \
            and st.st_uid == os.geteuid(), "the lock file is this user's, 0600: %r" % (st,)
        names.remove(LOCK)
    return names


def temp_files(directory):
    """certgrab's temporary files left in directory (there should be none)."""
    return [n for n in os.listdir(str(directory)) if TEMP_MARK in n]


def hook_command(log):
    """A deploy hook appending "$RENEWED_LINEAGE" to log (outside the output directory)."""
    return 'echo "$RENEWED_LINEAGE" >> %s' % log


def hook_runs(log):
    """The lines the hook of hook_command(log) appended: one per run."""
    try:
        with open(str(log)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def openssl_verify(root, cert, chain):
    """`openssl verify -CAfile ROOT -untrusted CHAIN CERT` (CompletedProcess): the leaf in
    cert verifies with the intermediates in chain and no others. A chain file without
    certificates (a leaf right under the root) is left out: -untrusted refuses it."""
    untrusted = ["-untrusted", str(chain)] if read_ders(chain) else []
    return subprocess.run(["openssl", "verify", "-CAfile", str(root)] + untrusted + [str(cert)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, universal_newlines=True, timeout=30)


def assert_verifies(root, out_dir, cert="cert.pem", chain="chain.pem"):
    """What was written in out_dir verifies with openssl: the leaf in cert, with only
    the intermediates in chain, up to root."""
    proc = openssl_verify(root, os.path.join(str(out_dir), cert),
                          os.path.join(str(out_dir), chain))
    assert proc.returncode == 0, "openssl verify failed on what was written:\n" + proc.stdout


def assert_fullchain_verifies(root, path):
    """A written fullchain (or combined) file verifies with openssl: its first certificate
    with only the certificates after it, up to root."""
    ders = read_ders(path)
    assert ders, "no certificate in %s" % path
    scratch = tempfile.mkdtemp(prefix="verify-")
    try:
        for name, part in (("cert.pem", ders[:1]), ("chain.pem", ders[1:])):
            with open(os.path.join(scratch, name), "w") as f:
                f.write(ders_to_pem(part))
        assert_verifies(root, scratch)
    finally:
        shutil.rmtree(scratch)


# ---------------------------------------------------------------- certificate facts (pyca)

def load_cert(path, index=0):
    """The index-th certificate of a PEM file, read by pyca/cryptography."""
    return x509.load_der_x509_certificate(read_ders(path)[index])


def iso(when):
    """A datetime as certgrab writes dates: 2025-01-31T12:00:00Z (four-digit years too)."""
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (when.year, when.month, when.day, when.hour,
                                               when.minute, when.second)


def serial_hex(serial):
    """A serial number (an int) as certgrab writes it: hex, in whole bytes."""
    text = "%x" % serial
    return "0" * (len(text) % 2) + text


def sha256(cert):
    """The SHA-256 of a certificate's DER, in hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def describe(cert):
    """certgrab's words for a leaf: serial, notBefore, notAfter."""
    return "serial %s issued %s, expires %s" % (serial_hex(cert.serial_number),
                                               iso(cert.not_valid_before_utc),
                                               iso(cert.not_valid_after_utc))


# ---------------------------------------------------------------- certgrab's docstring

def docstring_exit_codes(certgrab):
    """{code: the words before its first colon}, from the module docstring's Exit codes."""
    block = certgrab.__doc__.split("\nExit codes\n", 1)[1]
    return dict(re.findall(r"^    (\d)  ([^:]+):", block, re.M))


# ---------------------------------------------------------------- other Pythons

MINORS = range(6, 14)   # python3.6 ... python3.13, which certgrab supports
INTERPRETER_RUN = 60  # seconds for one certgrab run under another Python; a hang fails


def _version_of(path):
    try:
        probe = "import sys, ssl; print('%d.%d' % sys.version_info[:2])"
        proc = subprocess.run([path, "-c", probe], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def find_interpreter(minor):
    """The path of a working python3.<minor> with ssl (on PATH, under ~/.pyenv/versions,
    or this one), or None."""
    name = "python3.%d" % minor
    candidates = [shutil.which(name)]
    pattern = os.path.expanduser("~/.pyenv/versions/3.%d*/bin/%s" % (minor, name))
    candidates += sorted(glob.glob(pattern), reverse=True)
    if sys.version_info[:2] == (3, minor):
        candidates.append(sys.executable)
    for path in candidates:
        if path and _version_of(path) == "3.%d" % minor:
            return path
    return None


def interpreter(minor):
    """find_interpreter(minor), or the test is skipped (and fails under CI)."""
    path = find_interpreter(minor)
    if path is None:
        pytest.skip("python3.%d not found on PATH or under ~/.pyenv/versions" % minor)
    return path


def certgrab_run(python, *args):
    """certgrab.py ARGS as a program under python: (returncode, stdout, stderr), text."""
    proc = run_subprocess(args, timeout=INTERPRETER_RUN, python=python)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------- Debian python3-minimal roots

ROOTS = os.path.realpath(os.environ.get("CERTGRAB_ROOTS", "/var/cache/certgrab-roots"))
CHROOT = which("chroot") or "chroot"
CHROOT_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}  # nothing from the host's Python
CHROOT_TIMEOUT = 60  # seconds per command in a root; a fetch on loopback takes well under one
# (debootstrap suite, what a user calls it, Python version, OpenSSL version prefix)
SYSTEMS = [
    ("bookworm", "debian12", "3.11", "OpenSSL 3.0"),
    ("bullseye", "debian11", "3.9", "OpenSSL 1.1.1"),
]


def minimal_root(suite):
    """The path of the python3-minimal root of suite (`make roots`); the test is skipped
    without it, or when not root (chroot needs root)."""
    root = os.path.join(ROOTS, suite)
    if not os.path.isfile(os.path.join(root, ".certgrab-complete")):
        pytest.skip("no %s root in %s: run `make roots` (needs root and debootstrap)"
                    % (suite, ROOTS))
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    return root


class MinimalHost(object):
    """A python3-minimal root holding a scratch directory (a Path outside the root) with
    certgrab.py and the files a test gave it."""

    def __init__(self, root, scratch):
        self.root = Path(root)
        self.scratch = Path(scratch)

    def inside(self, path):
        """The path a process in the chroot sees for an outside path under the root."""
        return "/" + str(Path(path).relative_to(self.root))

    def python(self, *args, timeout=CHROOT_TIMEOUT, **popen_kw):
        """python3 ARGS in the root: CompletedProcess, text."""
        return subprocess.run([CHROOT, str(self.root), "python3"] + [str(a) for a in args],
                              env=CHROOT_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                              **popen_kw)

    def certgrab(self, *args, **popen_kw):
        """certgrab.py ARGS in the root: CompletedProcess, text."""
        return self.python(self.inside(self.scratch / "certgrab.py"), *args, **popen_kw)


@contextlib.contextmanager
def minimal_host(suite, files=(), prefix="certgrab-test-"):
    """A MinimalHost in suite's root (skipped without it) whose scratch directory holds
    certgrab.py and files ((source path, name) pairs); removed afterwards."""
    root = minimal_root(suite)
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=os.path.join(root, "tmp")))
    try:
        os.chmod(str(scratch), 0o755)
        shutil.copy(CERTGRAB, str(scratch / "certgrab.py"))
        for source, name in files:
            shutil.copy(str(source), str(scratch / name))
        yield MinimalHost(root, scratch)
    finally:
        shutil.rmtree(str(scratch))


# ---------------------------------------------------------------- a mount namespace of a test's own

UNSHARE = which("unshare")


def run_with_mounts(mounts, argv, timeout=60, **popen_kw):
    """certgrab.py ARGV in a mount namespace of its own (unshare -m, as root) where each
    (source, target) of mounts is bind-mounted first, in order: CompletedProcess, text.
    Skipped locally where the machine has no mount namespaces."""
    binds = ['mount --bind "$%d" "$%d"' % (2 * i + 1, 2 * i + 2) for i in range(len(mounts))]
    script = " && ".join(binds + ['shift %d && exec "$@"' % (2 * len(mounts))])
    paths = [str(path) for pair in mounts for path in pair]
    done = subprocess.run(
        [UNSHARE, "-m", "sh", "-c", script, "sh"] + paths + [sys.executable, CERTGRAB] +
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, universal_newlines=True, timeout=timeout, **popen_kw)
    if "mount" in done.stderr and done.returncode == 32 and not IN_CI:
        pytest.skip("no mount namespace here: %s" % done.stderr.strip())
    return done


def run_with_dev_log(directory, *argv):
    """certgrab.py ARGV where DIR is /dev: its log is the test's socket, the syslog_socket
    fixture's."""
    return run_with_mounts([("/dev/null", os.path.join(directory, "null")), (directory, "/dev")],
                           argv, timeout=30)


def received(sock):
    """The datagrams (syslog lines) sock received, until it is quiet for half a second."""
    lines = []
    sock.settimeout(0.5)
    while True:
        try:
            lines.append(sock.recv(4096).decode("utf-8"))
        except socket.timeout:
            return lines


# ---------------------------------------------------------------- --prometheus files

SERIES = re.compile(r'^([a-z_]+)\{((?:[a-z_0-9]+="(?:[^"\\]|\\.)*",?)*)\} (\S+)$')
LABEL = re.compile(r'([a-z_0-9]+)="((?:[^"\\]|\\.)*)"')


def _unescape(value):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_metrics(text):
    """{(name, ((label, value), ...)): float} of exposition text; every line must parse."""
    series = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SERIES.match(line)
        assert match, "not a series line: %r" % line
        labels = tuple((k, _unescape(v)) for k, v in LABEL.findall(match.group(2)))
        series[(match.group(1), labels)] = float(match.group(3))
    return series


def metric_values(series, metric, **labels):
    """The values of metric's series (of parse_metrics) whose labels include labels."""
    return [value for (name, pairs), value in series.items() if name == metric
            and set(labels.items()) <= set(pairs)]


def source_metric(text, name, source):
    """The value of metric name for source in exposition text (one series), or None."""
    found = metric_values(parse_metrics(text), name, source=source)
    assert len(found) <= 1, found
    return found[0] if found else None


def install_outcome(text):
    """The one certgrab_install_outcome whose series is 1 in exposition text."""
    chosen = [dict(labels)["outcome"] for (name, labels), value in parse_metrics(text).items()
              if name == "certgrab_install_outcome" and value == 1]
    assert len(chosen) == 1, text
    return chosen[0]


def assert_promtool_accepts(text):
    """`promtool check metrics` passes on exposition text."""
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text.encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode()


# ---------------------------------------------------------------- a bug, injected

def inject_bug(monkeypatch, certgrab, name, victim):
    """Replace certgrab.NAME with a version that raises RuntimeError for the source
    victim (its first argument is that source's FetchResult, or its DER and Source): the
    only mock of the suite, since a real bug cannot be ordered."""
    real = getattr(certgrab, name)

    def buggy(*args, **kwargs):
        source = args[0].source if hasattr(args[0], "source") else args[1]
        if str(source) == victim:
            raise RuntimeError("injected bug in %s" % name)
        return real(*args, **kwargs)

    monkeypatch.setattr(certgrab, name, buggy)


def certgrab_version():
    """certgrab.py's __version__, read from the file (the tests run it as a script too)."""
    with open(CERTGRAB) as handle:
        return re.search(r'^__version__ = "([^"]+)"$', handle.read(), re.M).group(1)


def bug_line(source, name):
    """What certgrab says of the bug inject_bug put into name, for source."""
    return "%s: internal error in certgrab %s (RuntimeError: injected bug in %s); " \
        "please report it" % (source, certgrab_version(), name)


def call_main(certgrab, capsys, *argv):
    """certgrab.main in-process: (exit code, stdout, stderr), without the run fixture's
    checks (a traceback may be there, e.g. with -v after a bug)."""
    capsys.readouterr()
    code = certgrab.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- real daemons (daemons.py)

def grab_daemon(run, daemon, port, *extra, name=NAME):
    """certgrab 127.0.0.1:<daemon's port named port> -n NAME --cafile <its root> EXTRA..."""
    return run("%s:%d" % (HOST, daemon.ports[port]), "-n", name,
               "--cafile", os.path.join(daemon.chain, "root.pem"), *extra)


def served_chain(daemon):
    """The chain the daemon was given, as DER: what certgrab must print."""
    return read_ders(os.path.join(daemon.chain, "fullchain.pem"))


def explain(daemon, result):
    """certgrab's stderr and the end of the daemon's logs, for assertion messages."""
    log = daemon.log_text().splitlines()[-40:]
    return "certgrab rc=%s stderr:\n%s\n%s log:\n%s" % (result.rc, result.err, daemon.name,
                                                        "\n".join(log))


def assert_prints_served_chain(daemon, result):
    """certgrab succeeded, printed exactly the chain the daemon serves, and no error."""
    assert result.rc == OK, explain(daemon, result)
    assert pem_ders(result.out) == served_chain(daemon)
    assert error_lines(result.err) == [], result.err


def failed_fetch_line(daemon, result, within):
    """The error line of a fetch that failed as it should: exit 3, one error line, nothing on
    stdout, and less than `within` seconds."""
    assert result.rc == FETCH, explain(daemon, result)
    line = assert_refused(result, FETCH)
    assert result.elapsed < within
    return line
