"""Files hold exactly the path OpenSSL verified (issue 19, part 2).

A source that holds the leaf's key (but no CA's) serves, right after the leaf, a look-alike
of the intermediate: its subject and subject key identifier, another key, issued by a fake
root with the real root's subject and key identifier (make_certs.make_lookalike). OpenSSL
skips it (an RSA key cannot have made the leaf's ECDSA signature; an expired issuer loses to
one within its dates) and verifies through the real intermediate. A path built from names
alone takes the look-alike, and every client of such a chain.pem fails.

Each case runs against a real loopback TLS server: in-process (this interpreter, 3.10+:
get_verified_chain), as a subprocess under every Python from 3.6 to 3.13 that is installed
(3.6-3.9 find the path by replaying candidates to OpenSSL in memory), and (in
test_minimal_hosts.py) in Debian 11's python3-minimal with OpenSSL 1.1.1. What was written
must pass `openssl verify -CAfile ROOT -untrusted chain.pem cert.pem`.
"""

import hashlib
import json

import pytest

import make_certs
from helpers import (assert_fullchain_verifies, assert_verifies, certgrab_run, files_ders, grab,
                     openssl_verify, warnings)
from make_certs import NAME, read_ders
from servers import TLSServer
MAX_REPLAYS = 16  # certgrab.MAX_REPLAYS: a server sending this many look-alikes first
#                   cannot have its path found on Python 3.6-3.9

# name: (what it imitates, look-alike kind, how many): see make_certs.make_lookalike
LOOKALIKES = {
    "rsa": ("ec1", "rsa", 1),                 # RSA key under an EC leaf, valid dates
    "expired": ("ec2", "expired", 1),         # EC key, expired; two real intermediates
    "cross-rsa": ("cross", "rsa", 1),         # before a cross-signed intermediate
    "many": ("ec1", "rsa", MAX_REPLAYS),      # more look-alikes than 3.6-3.9 replay
}


@pytest.fixture(scope="module")
def lookalikes(certs, tmp_path_factory):
    """Directory of each LOOKALIKES entry, plus "cross" (the cross-signed chain alone) and
    "direct" (a leaf the root issued itself)."""
    outdir = tmp_path_factory.mktemp("lookalikes")
    made = {"cross": make_certs.make_cross_signed(outdir, certs / "root-ec", "cross"),
            "direct": make_certs.make_direct_leaf(outdir, certs / "root-ec", "direct")}
    for name, (base, kind, count) in sorted(LOOKALIKES.items()):
        source = made["cross"] if base == "cross" else certs / base
        made[name] = make_certs.make_lookalike(outdir, source, name, kind, count)
    return dict((name, outdir / name) for name in made)


@pytest.fixture(scope="module")
def lookalike_servers(lookalikes):
    """A running server per look-alike chain, TLS 1.2 and 1.3: {(name, tls): server}."""
    running = {}
    try:
        for name in LOOKALIKES:
            for tls in ("1.2", "1.3"):
                d = lookalikes[name]
                running[(name, tls)] = TLSServer(d / "served.pem", d / "key.pem", tls=tls)
                running[(name, tls)].start()
        yield running
    finally:
        for server in running.values():
            server.stop()


def lookalike_hashes(chain_dir):
    """The sha256 prefixes certgrab names the look-alikes by."""
    return [hashlib.sha256(der).hexdigest()[:16] for der in read_ders(chain_dir / "lookalike.pem")]


def off_path(chain_dir):
    """How many served certificates are not on the path OpenSSL builds: the look-alikes,
    and with a cross-signed intermediate the direct one too."""
    on_path = read_ders(chain_dir / "fullchain.pem")
    return sum(der not in on_path for der in read_ders(chain_dir / "served.pem"))


def assert_written_is_the_verified_path(out, chain_dir):
    """cert.pem the leaf, chain.pem the path OpenSSL builds, fullchain.pem both, no
    look-alike anywhere, and openssl verifies it."""
    written = files_ders(out)
    want = read_ders(chain_dir / "chain.pem")
    assert written["chain.pem"] == want, "chain.pem is not the path OpenSSL verified"
    assert written["cert.pem"] == read_ders(chain_dir / "cert.pem")
    assert written["fullchain.pem"] == written["cert.pem"] + want
    fakes = read_ders(chain_dir / "lookalike.pem")
    assert not any(der in fakes for der in written["fullchain.pem"])
    assert_verifies(chain_dir / "root.pem", out)
    assert_fullchain_verifies(chain_dir / "root.pem", out / "fullchain.pem")


# The premise ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rsa", "expired", "cross-rsa"])
def test_premise_openssl_skips_the_lookalike_that_names_cannot_tell(certgrab, lookalikes,
                                                                    name):
    """Same subject and key identifier as the certificate it imitates, another key; OpenSSL
    verifies the served chain through the real one, and fails with the look-alike alone."""
    d = lookalikes[name]
    served = read_ders(d / "served.pem")
    fake, real = certgrab.parse_certificate(served[1]), certgrab.parse_certificate(served[2])
    assert (fake.subject_der, fake.ski) == (real.subject_der, real.ski)
    assert fake.spki != real.spki
    assert fake.issued(certgrab.parse_certificate(served[0]))
    untrusted = d / "untrusted.pem"
    untrusted.write_text(make_certs.ders_to_pem(served[1:]))
    assert openssl_verify(d / "root.pem", d / "cert.pem", untrusted).returncode == 0
    untrusted.write_text(make_certs.ders_to_pem(served[1:2]))
    assert openssl_verify(d / "root.pem", d / "cert.pem", untrusted).returncode != 0


# In this interpreter -------------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("name", ["rsa", "expired", "cross-rsa"])
def test_files_get_the_verified_path_and_a_warning_names_the_lookalike(
        run, lookalikes, lookalike_servers, tmp_path, name, tls):
    d, server = lookalikes[name], lookalike_servers[(name, tls)]
    out = tmp_path / "out"
    result = grab(run, server, d, "--out-dir", out)
    assert result.rc == 0, result.err
    assert_written_is_the_verified_path(out, d)
    text = warnings(result.err)
    assert "%d served certificate(s) not on the path OpenSSL verified, never written: [1] " \
           "O=certgrab tests, CN=certgrab test" % off_path(d) in text, result.err
    assert all(digest in text for digest in lookalike_hashes(d)), result.err
    assert "(files get the path OpenSSL verified: leaf, intermediates, no root)" in text


@pytest.mark.parametrize("name", ["rsa", "expired", "cross-rsa"])
def test_check_warns_and_names_the_lookalike(run, lookalikes, lookalike_servers, name):
    d, server = lookalikes[name], lookalike_servers[(name, "1.3")]
    result = run("--check", server.address, "-n", NAME, "--cafile", d / "root.pem")
    assert result.rc == 1, result.out
    status, line = result.out.splitlines()
    assert status.startswith("CERTGRAB WARNING - 1 source(s): 1 WARNING; first: %s: %d served "
                             "certificate(s) not on the path OpenSSL verified"
                             % (server.address, off_path(d)))
    assert line.startswith("WARNING - %s: %d served certificate(s) not on the path OpenSSL "
                           "verified, never written: [1] " % (server.address, off_path(d))), \
        result.out
    assert lookalike_hashes(d)[0] in line
    result = run("--check", "--no-chain-warning", server.address, "-n", NAME,
                 "--cafile", d / "root.pem")
    assert result.rc == 0, result.out
    assert "chain of %d verified" % len(read_ders(d / "fullchain.pem")) in result.out


def test_text_and_json_name_the_lookalike(run, lookalikes, lookalike_servers):
    d, server = lookalikes["rsa"], lookalike_servers[("rsa", "1.2")]
    digest = lookalike_hashes(d)[0]
    result = run("--json", server.address, "-n", NAME, "--cafile", d / "root.pem")
    assert result.rc == 0, result.err
    problems = json.loads(result.out)[0]["problems"]
    assert len(problems) == 1 and problems[0].startswith(
        "1 served certificate(s) not on the path OpenSSL verified, never written: [1] ")
    assert digest in problems[0]
    result = run("--text", server.address, "-n", NAME, "--cafile", d / "root.pem")
    assert "  warning:      1 served certificate(s) not on the path OpenSSL verified" in \
        result.out and digest in result.out


def test_a_served_root_is_not_off_the_path(run, certs, started, tmp_path):
    """The trust anchor itself, sent along, is said to be included, not off the path;
    --check stays OK."""
    d = certs / "ec1"
    served = tmp_path / "served.pem"
    served.write_text((d / "fullchain.pem").read_text() + (d / "root.pem").read_text())
    server = started(TLSServer(served, d / "key.pem"))
    result = run("--check", server.address, "-n", NAME, "--cafile", d / "root.pem")
    assert result.rc == 0, result.out
    out = tmp_path / "out"
    result = grab(run, server, d, "--out-dir", out)
    assert result.rc == 0, result.err
    assert "the root certificate (O=certgrab tests, CN=certgrab test root-ec) was included" \
        in result.err
    assert "not on the path" not in result.err
    assert_verifies(d / "root.pem", out)


def test_insecure_says_files_get_an_unverified_path_built_from_names(
        run, lookalikes, lookalike_servers, tmp_path):
    server = lookalike_servers[("rsa", "1.3")]
    result = run(server.address, "-n", NAME, "--insecure", "--out-dir", tmp_path / "out")
    assert result.rc == 0, result.err
    assert "certgrab: warning: --insecure: the chain is NOT verified; anyone on the path " \
           "could have sent it; files get the path built from the served certificates' " \
           "names alone, no signature checked: clients may fail to verify it" in result.err
    assert "(files get the path built from names, NOT verified: leaf, intermediates, " \
           "no root)" in result.err


def test_replay_reads_its_own_client_hello_within_bounds(certgrab, certs):
    """The ClientHello a replay answers is certgrab's own, but cut anywhere before the end of
    its cipher suites it gives a FetchError (one line), never an IndexError; cut later, the
    offer read is the same."""
    ctx = certgrab.ssl.SSLContext(certgrab.ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = certgrab.ssl.MemoryBIO(), certgrab.ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=NAME)
    with pytest.raises(certgrab.ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    session_id, suites = certgrab.client_hello_offer(hello, "test")
    assert len(session_id) == 32 and certgrab.REPLAY_SUITES["EC"] in suites
    # record header 5, handshake header 4, version 2, random 32, session id, cipher suites
    suites_end = 5 + 4 + 2 + 32 + 1 + len(session_id) + 2 + 2 * len(suites)
    for size in range(len(hello)):
        if size < suites_end:
            with pytest.raises(certgrab.FetchError) as caught:
                certgrab.client_hello_offer(hello[:size], "test")
            assert "cannot replay the chain to OpenSSL" in str(caught.value)
        else:
            assert certgrab.client_hello_offer(hello[:size], "test") == (session_id, suites)


# Every Python, as a program -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,tls", [("cross-rsa", "1.3"), ("expired", "1.2")])
def test_every_python_writes_the_verified_path(python, lookalikes, lookalike_servers, tmp_path,
                                               name, tls):
    """Install, --check and --verified-chain under each interpreter: the path OpenSSL
    verified (leaf, cross-signed intermediate, its CA: not the shorter direct path, which
    OpenSSL does not build), never the look-alike."""
    d, server = lookalikes[name], lookalike_servers[(name, tls)]
    args = [server.address, "-n", NAME, "--cafile", d / "root.pem"]
    out = tmp_path / "out"
    rc, stdout, err = certgrab_run(python, "--out-dir", out, *args)
    assert rc == 0, err
    assert_written_is_the_verified_path(out, d)
    assert all(digest in warnings(err) for digest in lookalike_hashes(d)), err
    rc, stdout, err = certgrab_run(python, "--check", *args)
    assert rc == 1, stdout + err
    assert stdout.splitlines()[1].startswith("WARNING - %s: %d served certificate(s) not on "
                                             "the path OpenSSL verified"
                                             % (server.address, off_path(d))), stdout
    rc, stdout, err = certgrab_run(python, "--verified-chain", *args)
    assert rc == 0, err
    assert make_certs.pem_ders(stdout) == read_ders(d / "fullchain.pem") + \
        read_ders(d / "root.pem")


@pytest.mark.slow
def test_more_lookalikes_than_replays_fail_before_3_10_and_never_write(
        certgrab, python_minor, python, lookalikes, lookalike_servers, tmp_path):
    """3.6-3.9 replay at most MAX_REPLAYS candidates: a server that sends that many
    look-alikes first is this source's failure (exit 4), with nothing written; 3.10+
    reads the path from OpenSSL and writes it."""
    assert certgrab.MAX_REPLAYS == MAX_REPLAYS
    d, server = lookalikes["many"], lookalike_servers[("many", "1.3")]
    out = tmp_path / "out"
    rc, stdout, err = certgrab_run(python, server.address, "-n", NAME, "--cafile",
                                   d / "root.pem", "--out-dir", out)
    if python_minor >= 10:
        assert rc == 0, err
        assert_written_is_the_verified_path(out, d)
        return
    assert rc == 4, err
    assert "Traceback" not in err and stdout == ""
    line, hint = err.splitlines()
    assert line.startswith("certgrab: %s: cannot tell which path OpenSSL verified: none of the "
                           "%d path(s) tried verified alone (the last: " % (server.address,
                                                                            MAX_REPLAYS)), err
    assert line.endswith("); nothing is written"), err
    assert hint.startswith("certgrab: hint: the server may send certificates that look like "
                           "its intermediates but are not"), err
    assert not out.exists()


@pytest.mark.slow
def test_every_python_writes_an_empty_chain_for_a_leaf_the_root_issued(python, lookalikes,
                                                                       started, tmp_path):
    """No intermediate: chain.pem is empty, fullchain.pem the leaf, and openssl verifies
    cert.pem against the root alone (3.6-3.9: a replay of the leaf alone)."""
    d = lookalikes["direct"]
    server = started(TLSServer(d / "fullchain.pem", d / "key.pem", tls="1.2"))
    out = tmp_path / "out"
    rc, stdout, err = certgrab_run(python, server.address, "-n", NAME, "--cafile",
                                   d / "root.pem", "--out-dir", out, "-q")
    assert rc == 0 and err == "", err
    assert files_ders(out) == {"cert.pem": read_ders(d / "cert.pem"), "chain.pem": [],
                               "fullchain.pem": read_ders(d / "cert.pem")}
    assert_verifies(d / "root.pem", out)
