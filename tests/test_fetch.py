"""Fetching chains from real loopback TLS servers, in-process through certgrab.main.

Each test states what a user sees: the chain on stdout byte for byte, the files written and
their modes, the exit code and the line on stderr when something is wrong.
"""

import os
import re
import stat

import pytest

import make_certs
import servers
from helpers import (LOCK, assert_fullchain_verifies, assert_one_error, assert_verifies, entries,
                     grab, warnings)
from make_certs import NAME, PEM_BLOCK, ders_to_pem, pem_ders, read_ders
from servers import closed_port

CHAINS = ["ec1", "ec2", "rsa1", "rsa2"]


def assert_only_pem(text):
    """stdout holds certificates and nothing else (no banners, no blank junk)."""
    assert PEM_BLOCK.search(text), "no certificate on stdout: %r" % text
    assert PEM_BLOCK.sub("", text).strip() == "", "extra text on stdout: %r" % text


def assert_nothing_written(result, out_dir):
    assert result.out == "", "stdout should be empty on failure: %r" % result.out
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], list(out_dir.iterdir())


# The served chain on stdout ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["stdlib", "openssl"])
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("chain", CHAINS)
def test_stdout_is_exactly_the_served_chain(run, served, certs, chain, tls, kind):
    server = served(chain, tls=tls, kind=kind)
    result = grab(run, server, certs / chain)
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / chain / "fullchain.pem")
    assert_only_pem(result.out)
    assert result.err == "", "a clean fetch should be silent on stderr"


def test_servername_is_sent_as_sni(run, served, certs):
    server = served("ec1")
    assert grab(run, server, certs / "ec1").rc == 0
    assert server.server_names == [NAME]


def test_port_option_applies_to_a_source_without_port(run, served, certs):
    server = served("ec1", tls="1.2")
    result = run("127.0.0.1", "-p", server.port, "-n", NAME, "--cafile",
                 certs / "ec1" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ec1" / "fullchain.pem")


def test_host_name_source_with_servername(run, served, certs):
    server = served("rsa1")
    result = run("localhost:%d" % server.port, "-4", "-n", NAME, "--cafile",
                 certs / "rsa1" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "rsa1" / "fullchain.pem")
    assert server.server_names == [NAME]


@pytest.mark.parametrize("family, rc", [("--ipv4", 0), ("-4", 0), ("--ipv6", 3), ("-6", 3)])
def test_long_family_options_are_the_short_ones(run, served, certs, family, rc):
    """--ipv4 and --ipv6 (as in curl) are -4 and -6: an IPv4 SOURCE only works with IPv4."""
    server = served("ec1")
    result = run("127.0.0.1:%d" % server.port, family, "-n", NAME, "--cafile",
                 certs / "ec1" / "root.pem")
    assert result.rc == rc, result.err
    if rc:
        assert_one_error(result)
        assert "cannot use address 127.0.0.1" in result.err


def test_host_name_source_is_the_default_servername(run, served, certs):
    """No -n: the name verified is the SOURCE host; `localhost` is not in the certificate."""
    server = served("ec1")
    result = run("localhost:%d" % server.port, "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == 4, result.err
    assert server.server_names == ["localhost"]
    assert_one_error(result)


def test_verbose_names_the_tls_version(run, served, certs):
    server = served("ec1", tls="1.2")
    result = grab(run, server, certs / "ec1", "-v")
    assert result.rc == 0, result.err
    assert re.search(r"TLS ?v?1\.2", result.err), result.err


def test_quiet_success_prints_nothing_on_stderr(run, served, certs, tmp_path):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "-q", "--out-dir", tmp_path / "out")
    assert result.rc == 0, result.err
    assert result.out == "" and result.err == ""
    assert_verifies(certs / "ec1" / "root.pem", tmp_path / "out")


# Output files ---------------------------------------------------------------------------

@pytest.mark.parametrize("chain,tls", [("ec2", "1.3"), ("rsa1", "1.2")])
def test_out_dir_writes_cert_chain_fullchain(run, served, certs, tmp_path, chain, tls):
    server = served(chain, tls=tls)
    out = tmp_path / "not" / "yet" / "there"
    result = grab(run, server, certs / chain, "--out-dir", out)
    assert result.rc == 0, result.err
    assert result.out == "", "with --out-dir nothing goes to stdout"
    want = read_ders(certs / chain / "fullchain.pem")
    assert entries(out) == ["cert.pem", "chain.pem", "fullchain.pem"]
    assert read_ders(out / "cert.pem") == want[:1]
    assert read_ders(out / "chain.pem") == want[1:]
    assert read_ders(out / "fullchain.pem") == want
    assert_verifies(certs / chain / "root.pem", out)
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        text = (out / name).read_text()
        assert_only_pem(text)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_new_files_are_0644_even_under_a_strict_umask(run, served, certs, tmp_path):
    server = served("ec1")
    old = os.umask(0o077)
    try:
        result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "out")
    finally:
        os.umask(old)
    assert result.rc == 0, result.err
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    assert_verifies(certs / "ec1" / "root.pem", tmp_path / "out")


def test_existing_file_keeps_its_mode(run, served, certs, tmp_path):
    """A renewal (same key, later notBefore) replaces the file's contents, not its mode."""
    server = served("ec1new")
    target = tmp_path / "fullchain.pem"
    target.write_text((certs / "ec1" / "fullchain.pem").read_text())
    target.chmod(0o640)
    result = grab(run, server, certs / "ec1", "--fullchain-path", target)
    assert result.rc == 0, result.err
    assert read_ders(target) == read_ders(certs / "ec1new" / "fullchain.pem")
    assert_fullchain_verifies(certs / "ec1" / "root.pem", target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_unchanged_files_are_not_rewritten(run, served, certs, tmp_path):
    server = served("ec2")
    out = tmp_path / "out"
    assert grab(run, server, certs / "ec2", "--out-dir", out).rc == 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    result = grab(run, server, certs / "ec2", "--out-dir", out)
    assert result.rc == 0, result.err
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before
    assert_verifies(certs / "ec2" / "root.pem", out)


def test_single_file_paths(run, served, certs, tmp_path):
    server = served("rsa2", tls="1.2")
    cert, chain, full = tmp_path / "a" / "c.pem", tmp_path / "b" / "ch.pem", tmp_path / "f.pem"
    result = grab(run, server, certs / "rsa2", "--cert-path", cert, "--chain-path", chain,
                  "--fullchain-path", full)
    assert result.rc == 0, result.err
    want = read_ders(certs / "rsa2" / "fullchain.pem")
    assert read_ders(cert) == want[:1]
    assert read_ders(chain) == want[1:]
    assert read_ders(full) == want
    assert_verifies(certs / "rsa2" / "root.pem", tmp_path, cert="a/c.pem", chain="b/ch.pem")
    assert_fullchain_verifies(certs / "rsa2" / "root.pem", full)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK) == \
        ["c.pem", "ch.pem", "f.pem"]


def test_only_the_asked_file_is_written(run, served, certs, tmp_path):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--fullchain-path", tmp_path / "full.pem")
    assert result.rc == 0, result.err
    assert entries(tmp_path) == ["full.pem"]
    assert result.out == ""
    assert_fullchain_verifies(certs / "ec1" / "root.pem", tmp_path / "full.pem")


# IPv6 and IP addresses --------------------------------------------------------------------

@pytest.mark.parametrize("kind,tls", [("stdlib", "1.3"), ("openssl", "1.2")])
def test_ipv6_bracketed_source(run, served, certs, ipv6, kind, tls):
    server = served("ec2", tls=tls, kind=kind, host="::1")
    result = run("[::1]:%d" % server.port, "-n", NAME, "--cafile", certs / "ec2" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ec2" / "fullchain.pem")


def test_bare_ipv6_source_with_port_option(run, served, certs, ipv6):
    server = served("rsa1", host="::1")
    result = run("::1", "-p", server.port, "-n", NAME, "--cafile", certs / "rsa1" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "rsa1" / "fullchain.pem")


def test_international_servername_is_sent_and_verified_in_its_ascii_form(run, started, certs,
                                                                       tmp_path):
    """-n bücher.example.test: the SNI and the name checked are xn--bcher-kva.example.test."""
    chain = make_certs.make_dated_chain(tmp_path, certs / "root-ec", "idn", 30,
                                        san="DNS:xn--bcher-kva.example.test")
    server = started(servers.TLSServer(os.path.join(chain, "fullchain.pem"),
                                       os.path.join(chain, "key.pem")))
    result = run(server.address, "-n", "b\u00fccher.example.test", "--cafile",
                 certs / "root-ec" / "cert.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(os.path.join(chain, "fullchain.pem"))
    assert server.server_names == ["xn--bcher-kva.example.test"]


def test_ip_source_without_name_sends_no_sni_and_verifies_ip_san(run, served, certs):
    server = served("ipsan")
    result = run(server.address, "--cafile", certs / "ipsan" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ipsan" / "fullchain.pem")
    assert server.server_names == [None]


def test_ipv6_source_without_name_verifies_ipv6_san(run, served, certs, ipv6):
    server = served("ipsan", host="::1", tls="1.2")
    result = run(server.address, "--cafile", certs / "ipsan" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ipsan" / "fullchain.pem")


def test_ip_source_without_name_refuses_a_cert_without_that_ip(run, served, certs, tmp_path):
    server = served("wrongname")
    result = run(server.address, "--cafile", certs / "wrongname" / "root.pem",
                 "--out-dir", tmp_path / "out")
    assert result.rc == 4, result.err
    assert "127.0.0.1" in result.err
    assert_one_error(result)
    assert_nothing_written(result, tmp_path / "out")


# Verification failures and --insecure ----------------------------------------------------

BAD = [
    # chain, the root the client trusts, pattern the reason must match
    ("unknown", "root-ec", r"issuer|unknown|untrusted|self.signed"),
    ("wrongname", "root-ec", r"match|name"),
    ("expired", "root-ec", r"expired"),
]


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("chain,root,reason", BAD)
def test_verification_failure_is_refused(run, served, certs, tmp_path, chain, root, reason,
                                         tls):
    server = served(chain, tls=tls)
    out = tmp_path / "out"
    result = run(server.address, "-n", NAME, "--cafile", certs / root / "cert.pem",
                 "--out-dir", out)
    assert result.rc == 4, result.err
    assert re.search(reason, result.err.splitlines()[0], re.I), result.err
    assert_one_error(result)
    assert_nothing_written(result, out)


@pytest.mark.parametrize("chain,root,reason", BAD)
def test_verification_failure_prints_nothing_on_stdout(run, served, certs, chain, root, reason):
    server = served(chain)
    result = run(server.address, "-n", NAME, "--cafile", certs / root / "cert.pem")
    assert result.rc == 4, result.err
    assert result.out == ""


def test_system_store_does_not_trust_a_private_root(run, served, certs):
    """Verification is on by default, against the system store."""
    server = served("ec1")
    result = run(server.address, "-n", NAME)
    assert result.rc == 4, result.err
    assert result.out == ""
    assert_one_error(result)


@pytest.mark.parametrize("chain", ["unknown", "wrongname", "expired"])
def test_insecure_fetches_anyway_and_says_so(run, served, certs, chain):
    server = served(chain)
    result = run(server.address, "-n", NAME, "--insecure")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / chain / "fullchain.pem")
    assert re.search(r"insecure|not verified", warnings(result.err), re.I), result.err


def test_insecure_writes_files_from_an_unknown_root(run, served, certs, tmp_path):
    """(Only the unknown root: the install gate of the next issue still refuses a wrong name
    or an expired leaf under --insecure.)"""
    server = served("unknown")
    out = tmp_path / "out"
    result = run(server.address, "-n", NAME, "--insecure", "--out-dir", out)
    assert result.rc == 0, result.err
    assert read_ders(out / "fullchain.pem") == read_ders(certs / "unknown" / "fullchain.pem")
    assert_verifies(certs / "unknown" / "root.pem", out)
    assert re.search(r"insecure|not verified", warnings(result.err), re.I), result.err


# Anomalous served chains -------------------------------------------------------------------

def _anomalies(certs):
    leaf, i2, i1 = read_ders(certs / "ec2" / "fullchain.pem")
    root = read_ders(certs / "ec2" / "root.pem")[0]
    unrelated = read_ders(certs / "unknown" / "chain.pem")[0]
    return {
        "out-of-order": ([leaf, i1, i2], r"order"),
        "root-appended": ([leaf, i2, i1, root], r"root"),
        "extra-unrelated": ([leaf, i2, unrelated, i1], r"not on the path OpenSSL verified"),
        "extra-at-end": ([leaf, i2, i1, unrelated], r"not on the path OpenSSL verified"),
        "sent-twice": ([leaf, i2, i2, i1], r"1 certificate\(s\) were sent more than once"),
    }


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("case", ["out-of-order", "root-appended", "extra-unrelated",
                                  "extra-at-end", "sent-twice"])
def test_anomalous_chain_stdout_as_served_files_cleaned(run, served, certs, tmp_path, case,
                                                        tls):
    ders, warning = _anomalies(certs)[case]
    served_file = tmp_path / "served.pem"
    served_file.write_text(ders_to_pem(ders))
    server = served("ec2", tls=tls, file=served_file)

    result = grab(run, server, certs / "ec2")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == ders, "stdout must keep exactly what was served"
    assert re.search(warning, warnings(result.err), re.I), result.err

    out = tmp_path / "out"
    result = grab(run, server, certs / "ec2", "--out-dir", out)
    assert result.rc == 0, result.err
    clean = read_ders(certs / "ec2" / "fullchain.pem")
    assert read_ders(out / "cert.pem") == clean[:1]
    assert read_ders(out / "chain.pem") == clean[1:]
    assert read_ders(out / "fullchain.pem") == clean
    assert_verifies(certs / "ec2" / "root.pem", out)
    assert re.search(warning, warnings(result.err), re.I), result.err


def test_well_formed_chain_gives_no_warning(run, served, certs, tmp_path):
    server = served("ec2")
    result = grab(run, server, certs / "ec2")
    assert result.rc == 0 and result.err == "", result.err
    result = grab(run, server, certs / "ec2", "--out-dir", tmp_path / "out")
    assert result.rc == 0, result.err
    assert not re.search(r"order|root|unrelated|extra", warnings(result.err), re.I), result.err
    assert_verifies(certs / "ec2" / "root.pem", tmp_path / "out")


# --verified-chain ----------------------------------------------------------------------------

@pytest.mark.parametrize("chain,tls", [("ec2", "1.3"), ("rsa1", "1.2"), ("rsa2", "1.3")])
def test_verified_chain_ends_with_the_root(run, served, certs, chain, tls):
    server = served(chain, tls=tls)
    result = grab(run, server, certs / chain, "--verified-chain")
    assert result.rc == 0, result.err
    want = read_ders(certs / chain / "fullchain.pem") + read_ders(certs / chain / "root.pem")
    assert pem_ders(result.out) == want


def test_verified_chain_puts_an_out_of_order_chain_right(run, served, certs, tmp_path):
    leaf, i2, i1 = read_ders(certs / "ec2" / "fullchain.pem")
    root = read_ders(certs / "ec2" / "root.pem")[0]
    served_file = tmp_path / "served.pem"
    served_file.write_text(ders_to_pem([leaf, root, i1, i2]))
    server = served("ec2", file=served_file)
    result = grab(run, server, certs / "ec2", "--verified-chain")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == [leaf, i2, i1, root]


# Several sources ---------------------------------------------------------------------------

def test_one_source_down_still_succeeds(run, served, certs):
    server = served("ec1")
    with closed_port() as dead:
        down = "127.0.0.1:%d" % dead
        result = run(down, server.address, "-n", NAME, "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ec1" / "fullchain.pem")
    assert down in result.err, "the failed source should be reported: " + result.err


def test_all_sources_down_fails_with_3(run, certs):
    with closed_port() as a, closed_port() as b:
        result = run("127.0.0.1:%d" % a, "127.0.0.1:%d" % b, "-n", NAME,
                     "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == 3, result.err
    assert result.out == ""
    assert str(a) in result.err and str(b) in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("newest_first", [False, True])
def test_newest_leaf_wins(run, served, certs, newest_first):
    old = served("ec1", tls="1.2")
    new = served("ec1new", kind="openssl")
    sources = [new.address, old.address] if newest_first else [old.address, new.address]
    result = run(*(sources + ["-n", NAME, "--cafile", certs / "ec1" / "root.pem"]))
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ec1new" / "fullchain.pem")
    assert new.address in result.err, "the winning source should be named: " + result.err


def test_source_failing_verification_loses_to_a_valid_one(run, served, certs):
    good = served("ec1")
    bad = served("unknown")
    result = run(bad.address, good.address, "-n", NAME, "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / "ec1" / "fullchain.pem")
    assert bad.address in result.err


def test_all_sources_failing_verification_fails_with_4(run, served, certs, tmp_path):
    a, b = served("unknown"), served("expired")
    out = tmp_path / "out"
    result = run(a.address, b.address, "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                 "--out-dir", out)
    assert result.rc == 4, result.err
    assert_nothing_written(result, out)


def test_quiet_still_prints_the_error(run, served, certs):
    server = served("expired")
    result = grab(run, server, certs / "expired", "-q")
    assert result.rc == 4
    assert_one_error(result)
