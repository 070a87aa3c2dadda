"""certgrab.py run as a program under every Python from 3.6 to 3.13 that is installed.

Interpreters are looked up as python3.X on PATH, then ~/.pyenv/versions/3.X*/bin/python3.X,
and each candidate must actually start and report version 3.X (pyenv shims on PATH exist for
versions that are not active and fail when run): helpers.find_interpreter, through conftest's
`python` fixture. An absent version is skipped locally; under CI=true conftest turns any skip
into a failed run.

Each interpreter fetches from four servers that together cover TLS 1.2 and TLS 1.3-only, EC
and RSA, one and two intermediates, the stdlib server and openssl s_server, and must print the
chain exactly as served; it also writes --out-dir once and reads an IPv6 source once.
"""


import pytest

from helpers import assert_verifies, certgrab_run
from make_certs import NAME, pem_ders, read_ders
from servers import OpenSSLServer, TLSServer, ipv6_available

pytestmark = pytest.mark.slow


# (chain, TLS version, server kind): every axis covered at least twice
CASES = [
    ("rsa2", "1.2", "stdlib"),
    ("ec1", "1.3", "openssl"),
    ("rsa1", "1.3", "stdlib"),
    ("ec2", "1.2", "openssl"),
]


@pytest.fixture(scope="module")
def matrix_servers(certs):
    """One running server per CASES entry, shared by every interpreter."""
    started = {}
    try:
        for chain, tls, kind in CASES:
            d = certs / chain
            if kind == "stdlib":
                server = TLSServer(d / "fullchain.pem", d / "key.pem", tls=tls)
            else:
                server = OpenSSLServer(d / "cert.pem", d / "key.pem", d / "chain.pem", tls=tls)
            server.start()
            started[(chain, tls, kind)] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-tls%s-%s" % c)
def test_prints_exactly_the_served_chain(python, matrix_servers, certs, case):
    chain = case[0]
    server = matrix_servers[case]
    rc, out, err = certgrab_run(python, "127.0.0.1:%d" % server.port, "-n", NAME,
                                "--cafile", certs / chain / "root.pem")
    assert rc == 0, err
    assert pem_ders(out) == read_ders(certs / chain / "fullchain.pem")
    assert err == ""


def test_out_dir(python, matrix_servers, certs, tmp_path):
    server = matrix_servers[("ec2", "1.2", "openssl")]
    out = tmp_path / "out"
    rc, stdout, err = certgrab_run(python, "127.0.0.1:%d" % server.port, "-n", NAME,
                                   "--cafile", certs / "ec2" / "root.pem", "--out-dir", out)
    assert rc == 0, err
    want = read_ders(certs / "ec2" / "fullchain.pem")
    assert read_ders(out / "cert.pem") == want[:1]
    assert read_ders(out / "chain.pem") == want[1:]
    assert read_ders(out / "fullchain.pem") == want
    assert_verifies(certs / "ec2" / "root.pem", out)
    assert oct((out / "cert.pem").stat().st_mode & 0o777) == oct(0o644)


def test_ipv6_and_verification_failure(python, certs):
    """[::1]:PORT works; a wrong root gives exit 4 and one line, no traceback."""
    host = "::1" if ipv6_available() else "127.0.0.1"
    d = certs / "ec2"
    with TLSServer(d / "fullchain.pem", d / "key.pem", host=host, tls="1.3") as server:
        rc, out, err = certgrab_run(python, server.address, "-n", NAME,
                                    "--cafile", d / "root.pem")
        assert rc == 0, err
        assert pem_ders(out) == read_ders(d / "fullchain.pem")
        rc, out, err = certgrab_run(python, server.address, "-n", NAME,
                                    "--cafile", certs / "root-rsa" / "cert.pem")
    assert rc == 4, err
    assert out == "" and "Traceback" not in err
    assert [l for l in err.splitlines() if not l.startswith("certgrab: hint:")][0].startswith(
        "certgrab: ")


def test_usage_error_and_version(python):
    rc, out, err = certgrab_run(python, "--version")
    assert rc == 0 and "certgrab" in (out + err)
    rc, out, err = certgrab_run(python, "127.0.0.1:99999")
    assert rc == 2, err
    assert "Traceback" not in err
