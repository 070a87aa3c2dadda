"""Shared fixtures for the certgrab tests.

    certs        session: pathlib.Path of the generated chains (see make_certs.py)
    run          run(*argv) -> Result(rc, out, err, elapsed): certgrab.main in-process
    certgrab     the certgrab module, imported from the repository root
    started      started(server): server started, and stopped at teardown; returns it
    served       served(name, tls="1.3", kind="stdlib", host=..., file=None): a running server
                 for chain `name` (kind "stdlib" = TLSServer, "openssl" = OpenSSLServer)
    fuzz_cases   how many cases each fuzz test runs
    ipv6         skips a test where there is no IPv6 loopback
    python       the path of each python3.6 ... python3.13 in turn (python_minor: 6 ... 13);
                 a test is skipped where one is not installed
    syslog_socket  (directory, socket): a datagram socket that stands in for /dev/log in
                 helpers.run_with_dev_log
    daemon_root  session: the work directory of the real daemons (daemons.py); at the end of
                 the session, the files the daemon packages own under /etc are unchanged
                 (daemon_fixture(cls, chain) makes the fixture of one daemon; postfix is one)

The constants and plain helpers the test modules share (the exit codes, grab, assert_refused,
error_lines ...) are in helpers.py; this file only holds fixtures and pytest's hooks.

CI policy: with CI=true in the environment a skipped test fails the run, and the summary names
every skipped test. Locally a skip is only reported (e.g. an interpreter that is not installed).
"""

import os
import shutil
import socket
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):     # certgrab.py, and the modules of tests/
    if path not in sys.path:
        sys.path.insert(0, path)

import daemons  # noqa: E402  (needs the path above)
import daemons_mail  # noqa: E402
import make_certs  # noqa: E402
import servers  # noqa: E402
from helpers import CERTGRAB, IN_CI, MINORS, UNSHARE, Result, interpreter  # noqa: E402

FUZZ_CASES_LOCAL = 300  # per fuzz test; a few seconds in all
FUZZ_CASES_CI = 5000  # per fuzz test in CI: thousands, as the issue asks


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (timeouts, many interpreters)")
    config.addinivalue_line("markers", "fuzz: seeded random mutation tests")


_SKIPPED = []  # (nodeid, reason) of every skipped test in this session


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if IN_CI and _SKIPPED and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SKIPPED:
        return
    if IN_CI:
        terminalreporter.section("CI=true: skipped tests fail the run", red=True, bold=True)
    else:
        terminalreporter.section("skipped tests (these would fail with CI=true)")
    for nodeid, reason in _SKIPPED:
        terminalreporter.write_line("SKIPPED %s: %s" % (nodeid, reason))


# Fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """The generated chains: certs / "ec1" / "fullchain.pem" and so on."""
    if not servers.openssl_available():
        pytest.skip("the openssl command is needed to make test certificates")
    outdir = tmp_path_factory.mktemp("certs")
    make_certs.generate(str(outdir))
    return outdir


@pytest.fixture(scope="session")
def certgrab():
    if not os.path.exists(CERTGRAB):
        pytest.fail("certgrab.py not found at %s" % CERTGRAB)
    import certgrab as module
    return module


@pytest.fixture
def run(certgrab, capsys):
    """run(*argv) calls certgrab.main(list(argv)) and returns Result(rc, out, err, elapsed).

    A SystemExit escaping main is turned into its code here (test_cli checks that main
    returns instead); anything else escaping is a bug and fails the test with its traceback.
    """

    def call(*argv):
        argv = [str(a) for a in argv]
        capsys.readouterr()
        start = time.monotonic()
        try:
            rc = certgrab.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        elapsed = time.monotonic() - start
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        return Result(rc, captured.out, captured.err, elapsed)

    return call


@pytest.fixture
def started():
    """started(server) starts server and returns it; at teardown every server started this
    way is stopped, the last first."""
    stack = []

    def start(server):
        server.start()
        stack.append(server)
        return server

    yield start
    for server in reversed(stack):
        server.stop()


@pytest.fixture
def served(certs, started):
    """served(name, tls="1.3", kind="stdlib", host="127.0.0.1", file=None) starts a server
    for chain `name` and returns it (stopped at teardown). `file` replaces the served
    fullchain.pem (stdlib kind only), e.g. to serve a chain out of order."""

    def start(name, tls="1.3", kind="stdlib", host="127.0.0.1", file=None):
        d = certs / name
        if kind == "stdlib":
            return started(servers.TLSServer(file or d / "fullchain.pem", d / "key.pem",
                                             host=host, tls=tls))
        assert file is None, "OpenSSLServer serves cert.pem + chain.pem"
        return started(servers.OpenSSLServer(d / "cert.pem", d / "key.pem", d / "chain.pem",
                                             host=host, tls=tls))

    return start


@pytest.fixture(scope="session")
def fuzz_cases():
    override = os.environ.get("CERTGRAB_FUZZ_CASES")
    if override:
        return int(override)
    return FUZZ_CASES_CI if IN_CI else FUZZ_CASES_LOCAL


@pytest.fixture(scope="session")
def ipv6():
    if not servers.ipv6_available():
        pytest.skip("no IPv6 loopback (::1) on this machine")


@pytest.fixture(params=list(MINORS), ids=lambda minor: "py3.%d" % minor)
def python_minor(request):
    """Each Python 3 certgrab supports, by its minor version: 6 ... 13."""
    return request.param


@pytest.fixture
def python(python_minor):
    """The path of python3.<python_minor>; the test is skipped where it is not installed."""
    return interpreter(python_minor)


@pytest.fixture
def syslog_socket():
    """(directory, socket): a UNIX datagram socket at DIR/log, and DIR/null bound to
    /dev/null inside the namespace, so that DIR can stand in for /dev."""
    if os.geteuid() != 0 or UNSHARE is None:
        pytest.skip("needs root and unshare(1) for a mount namespace with its own /dev/log")
    directory = tempfile.mkdtemp(prefix="certgrab-syslog-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, "log"))
    os.chmod(os.path.join(directory, "log"), 0o666)
    open(os.path.join(directory, "null"), "w").close()
    sock.settimeout(5)
    yield directory, sock
    sock.close()
    shutil.rmtree(directory)


# Real daemons, for the STARTTLS test modules (see daemons.py) --------------------------------

@pytest.fixture(scope="session")
def daemon_root():
    """A work directory the daemons' unprivileged users can reach (pytest's tmp is 0700);
    at the end, /etc must be exactly as it was before any daemon started."""
    with daemons.work_root("certgrab-daemons-", daemons.ETC_PATHS, "the daemon tests") as root:
        yield root


def daemon_fixture(cls, chain):
    """The session fixture named cls.name: cls serving the make_certs.py chain `chain`,
    started under daemon_root when a test first asks for it (a test skips, with the reason,
    where it cannot run), stopped at the end of the session."""

    @pytest.fixture(scope="session", name=cls.name)
    def daemon(daemon_root, certs):
        running = daemons.start_or_skip(cls(daemon_root, certs / chain))
        yield running
        running.stop()

    return daemon


# The real postfix, shared by the modules that use it (test_starttls_mail, test_config): one
# session fixture, so that it starts once in daemon_root.
postfix = daemon_fixture(daemons_mail.Postfix, "rsa2")
