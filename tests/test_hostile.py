"""Hostile servers and bad input: a clear one-line error, fast, and nothing written.

Every case asserts: the documented non-zero exit code, exactly one `certgrab: ...` error line
on stderr (hint lines allowed), no traceback, done within --timeout plus one second, nothing on
stdout and nothing in the output directory.

    case                                  exit code
    server accepts and never answers      3  (the --timeout deadline)
    server sends garbage / an SSH banner  3
    server speaks plain HTTP              3
    server closes at once (FIN or RST)    3
    server sends a fatal TLS alert        3
    drip proxy, one byte every 0.3 s      3  (only an overall deadline ends it)
    connection refused, unresolvable name 3
    unparseable SOURCE, bad port          2
    missing --cafile                      2
    output path is a file / under a file  5
"""

import pytest

from helpers import assert_one_error, assert_refused, grab
from make_certs import NAME
from servers import (AlertServer, CloseServer, DripProxy, GarbageServer, HTTPServer,
                     SilentServer, closed_port)

TIMEOUT = 2  # seconds, the --timeout given to every network case
SLACK = 1.0  # seconds; the issue allows --timeout plus one second


def check_failure(result, rc, out_dir, allow_usage=False, limit=TIMEOUT + SLACK):
    """assert_refused, within limit seconds, and nothing in out_dir."""
    assert_refused(result, rc, allow_usage=allow_usage)
    assert result.elapsed < limit, "took %.2f s" % result.elapsed
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


HOSTILE = {
    "silent": lambda: SilentServer(),
    "garbage": lambda: GarbageServer(),
    "ssh-banner": lambda: GarbageServer(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"),
    "http": lambda: HTTPServer(),
    "close": lambda: CloseServer(),
    "reset": lambda: CloseServer(reset=True),
    "alert": lambda: AlertServer(),
    "alert-protocol-version": lambda: AlertServer(description=70),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_server(run, certs, tmp_path, case):
    out = tmp_path / "out"
    with HOSTILE[case]() as server:
        result = grab(run, server, certs / "ec1", "--timeout", TIMEOUT, "--out-dir", out)
    check_failure(result, 3, out)


def test_silent_server_reports_a_timeout(run, certs, tmp_path):
    with SilentServer() as server:
        result = grab(run, server, certs / "ec1", "--timeout", 1)
    assert result.rc == 3
    assert "timed out" in result.err or "timeout" in result.err, result.err
    assert 0.9 < result.elapsed < 2.0, "should wait for the deadline, not longer"


def test_http_server_hint_says_not_tls(run, certs):
    with HTTPServer() as server:
        result = grab(run, server, certs / "ec1", "--timeout", TIMEOUT)
    assert result.rc == 3
    assert "certgrab: hint:" in result.err and "TLS" in result.err, result.err


@pytest.mark.slow
def test_drip_feed_ends_at_the_overall_deadline(run, certs, served, tmp_path):
    upstream = served("rsa2")
    out = tmp_path / "out"
    with DripProxy(upstream.port, interval=0.3) as proxy:
        result = grab(run, proxy, certs / "rsa2", "--timeout", TIMEOUT, "--out-dir", out)
        dripped = proxy.dripped
    check_failure(result, 3, out)
    assert dripped >= 3, "the proxy should have made progress (%d bytes)" % dripped


@pytest.mark.slow
def test_drip_proxy_itself_works(run, certs, served):
    """Control for the test above: with a short interval the same proxy delivers the chain,
    so the failure there comes from the deadline, not from a broken proxy."""
    upstream = served("ec1")
    with DripProxy(upstream.port, interval=0.0) as proxy:
        result = grab(run, proxy, certs / "ec1", "--timeout", 10)
    assert result.rc == 0, result.err


def test_connection_refused(run, certs, tmp_path):
    with closed_port() as port:
        result = run("127.0.0.1:%d" % port, "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                     "--timeout", TIMEOUT, "--out-dir", tmp_path / "out")
    check_failure(result, 3, tmp_path / "out")
    assert str(port) in result.err


def test_unresolvable_name(run, certs, tmp_path):
    result = run("no-such-host.invalid:443", "--cafile", certs / "ec1" / "root.pem",
                 "--timeout", TIMEOUT, "--out-dir", tmp_path / "out")
    check_failure(result, 3, tmp_path / "out")
    assert "no-such-host.invalid" in result.err


# Bad input: refused before any network traffic ---------------------------------------------

BAD_SOURCES = [
    "[::1",                  # unclosed bracket
    "[::1]x",                # junk after the bracket
    "[::1]:",                # empty port
    "[example.test]:443",    # brackets around a name
    "example.test:",         # empty port
    "example.test:https",    # port not a number
    "1.2.3.4:44:3",          # two colons, not IPv6
    "",                      # empty
    "exa mple.test",         # space in a host name
    "-",                     # not a host
    "example..test",         # empty label
]


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_unparseable_source(run, certs, tmp_path, source):
    out = tmp_path / "out"
    result = run("--cafile", certs / "ec1" / "root.pem", "--out-dir", out, "--", source)
    check_failure(result, 2, out, allow_usage=True, limit=SLACK)


@pytest.mark.parametrize("argv", [
    ["127.0.0.1:0"], ["127.0.0.1:70000"], ["[::1]:65536"], ["127.0.0.1:-1"],
    ["127.0.0.1", "-p", "0"], ["127.0.0.1", "-p", "70000"], ["127.0.0.1", "-p", "x"],
], ids=lambda argv: " ".join(argv))
def test_port_out_of_range(run, certs, tmp_path, argv):
    out = tmp_path / "out"
    result = run(*(argv + ["--cafile", certs / "ec1" / "root.pem", "--out-dir", out]))
    check_failure(result, 2, out, allow_usage=True, limit=SLACK)


def test_missing_cafile(run, served, tmp_path):
    server = served("ec1")
    out = tmp_path / "out"
    result = run(server.address, "-n", NAME, "--cafile", tmp_path / "no-such-root.pem",
                 "--out-dir", out)
    check_failure(result, 2, out, limit=SLACK)
    assert "no-such-root.pem" in result.err


def test_cafile_that_holds_no_certificate(run, served, tmp_path):
    server = served("ec1")
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    out = tmp_path / "out"
    result = run(server.address, "-n", NAME, "--cafile", junk, "--out-dir", out)
    check_failure(result, 2, out, limit=SLACK)


def test_missing_capath(run, served, tmp_path):
    server = served("ec1")
    result = run(server.address, "-n", NAME, "--capath", tmp_path / "nowhere")
    check_failure(result, 2, tmp_path / "out", limit=SLACK)


# Output paths that cannot be written ---------------------------------------------------------

BLOCKED_PATHS = [  # (option, its path below the existing file "afile")
    ("--out-dir", ()),  # the output directory is the file itself
    ("--fullchain-path", ("sub", "fullchain.pem")),  # a path through the file
]


@pytest.mark.parametrize("option,below", BLOCKED_PATHS,
                         ids=["out-dir-is-an-existing-file", "path-under-a-file"])
def test_output_path_blocked_by_a_file(run, served, certs, tmp_path, option, below):
    server = served("ec1")
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    result = grab(run, server, certs / "ec1", option, blocker.joinpath(*below))
    check_failure(result, 5, tmp_path / "out", limit=SLACK)
    assert blocker.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_cert_path_is_a_directory(run, served, certs, tmp_path):
    server = served("ec1")
    target = tmp_path / "adir"
    target.mkdir()
    result = grab(run, server, certs / "ec1", "--cert-path", target)
    check_failure(result, 5, target, limit=SLACK)


def test_one_bad_output_path_writes_nothing_at_all(run, served, certs, tmp_path):
    """With a good --out-dir and an impossible --chain-path, not even the good files appear."""
    server = served("ec1")
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    out = tmp_path / "out"
    result = grab(run, server, certs / "ec1", "--out-dir", out,
                  "--chain-path", blocker / "chain.pem")
    check_failure(result, 5, out, limit=SLACK)


def test_unwritable_directory(run, served, certs):
    """/proc refuses new files even to root, so this works whoever runs the tests."""
    server = served("ec1")
    out = "/proc/self/certgrab-out"
    result = grab(run, server, certs / "ec1", "--out-dir", out)
    assert result.rc == 5, result.err
    assert_one_error(result)
    assert result.out == ""


# Several sources: deadlines run side by side -------------------------------------------------

def test_silent_sources_share_one_deadline(run, certs, tmp_path):
    """Sources are fetched concurrently: two silent servers cost one --timeout, not two."""
    with SilentServer() as a, SilentServer() as b, SilentServer() as c:
        result = run(a.address, b.address, c.address, "-n", NAME,
                     "--cafile", certs / "ec1" / "root.pem", "--timeout", 1,
                     "--out-dir", tmp_path / "out")
    assert result.rc == 3, result.err
    assert result.elapsed < 1.9, "took %.2f s" % result.elapsed
    assert "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_silent_source_does_not_spoil_a_good_one(run, certs, served):
    good = served("ec1")
    with SilentServer() as silent:
        result = run(silent.address, good.address, "-n", NAME,
                     "--cafile", certs / "ec1" / "root.pem", "--timeout", 1)
    assert result.rc == 0, result.err
    assert result.out.count("BEGIN CERTIFICATE") == 2
    assert silent.address in result.err
    assert result.elapsed < 2.0
