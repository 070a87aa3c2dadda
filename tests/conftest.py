"""Shared fixtures for the certgrab tests.

    certs        session: pathlib.Path of the generated chains (see make_certs.py)
    run          run(*argv) -> Result(rc, out, err, elapsed): certgrab.main in-process
    certgrab     the certgrab module, imported from the repository root
    served       served(name, tls="1.3", kind="stdlib", host=..., file=None): a running server
                 for chain `name` (kind "stdlib" = TLSServer, "openssl" = OpenSSLServer)
    fuzz_cases   how many cases each fuzz test runs

CI policy: with CI=true in the environment a skipped test fails the run, and the summary names
every skipped test. Locally a skip is only reported (e.g. an interpreter that is not installed).
"""

import collections
import os
import sys
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CERTGRAB = os.path.join(ROOT, "certgrab.py")
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import make_certs  # noqa: E402  (needs the path above)
import servers  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
FUZZ_CASES_LOCAL = 300  # per fuzz test; a few seconds in all
FUZZ_CASES_CI = 5000  # per fuzz test in CI: thousands, as the issue asks

Result = collections.namedtuple("Result", "rc out err elapsed")


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
def served(certs, request):
    """served(name, tls="1.3", kind="stdlib", host="127.0.0.1", file=None) starts a server
    for chain `name` and returns it (stopped at teardown). `file` replaces the served
    fullchain.pem (stdlib kind only), e.g. to serve a chain out of order."""
    stack = []

    def start(name, tls="1.3", kind="stdlib", host="127.0.0.1", file=None):
        d = certs / name
        if kind == "stdlib":
            server = servers.TLSServer(file or d / "fullchain.pem", d / "key.pem", host=host,
                                       tls=tls)
        else:
            assert file is None, "OpenSSLServer serves cert.pem + chain.pem"
            server = servers.OpenSSLServer(d / "cert.pem", d / "key.pem", d / "chain.pem",
                                           host=host, tls=tls)
        server.start()
        stack.append(server)
        return server

    yield start
    for server in reversed(stack):
        server.stop()


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


# Helpers for assertions, imported by the test modules ---------------------------------------

def error_lines(err):
    """The stderr lines that are neither hints nor warnings."""
    return [line for line in err.splitlines()
            if not line.startswith(("certgrab: hint:", "certgrab: warning:"))]


def assert_one_error(result, allow_usage=False):
    """stderr holds exactly one `certgrab: ...` error line, plus optional `certgrab: hint:`
    and `certgrab: warning:` lines (and, for usage errors from argparse, its `usage:` lines);
    no traceback."""
    assert "Traceback" not in result.err, result.err
    lines = [l for l in error_lines(result.err) if l.strip()]
    if allow_usage:
        lines = [l for l in lines if l.startswith("certgrab")]
    assert len(lines) == 1, "want one error line, got:\n" + result.err
    assert lines[0].startswith("certgrab: "), result.err

