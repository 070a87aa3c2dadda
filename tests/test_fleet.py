"""Issue 11: the fleet as it really runs, message by message (exact texts users see).

    1. complete chains: a leaf-only server, with and without its intermediates known here
    2. --check: WARNING for an incomplete or disordered served chain (--no-chain-warning)
    3. --same and --expect-file over whole chains (a service that kept old intermediates)
    4. several --key-path and --privkey: the matching key in the same set as the certificates
    5. messages: key mismatch, stale source, unknown root, wrong name, pending hook, -v
    6. --tls-min and --tls-max

The certificate facts in the expected texts (serials, dates, fingerprints, subjects) are read
with pyca/cryptography, independently of certgrab's own DER reader. The chains that share a
leaf but differ in their intermediate are made here with cryptography too (make_certs.py
keeps no intermediate keys).
"""

import datetime
import hashlib
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import make_certs
import servers
from helpers import (CRITICAL, FETCH, OK, OUT_FILES, REFUSED, USAGE, VERIFY, WARNING,
                     assert_fullchain_verifies, assert_refused, assert_verifies, describe, entries,
                     error_lines, files_ders, grab, grab_args, hook_command, hook_runs, iso,
                     load_cert, serial_hex, sha256, snapshot)
from make_certs import NAME

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


# Facts, read with cryptography ---------------------------------------------------------------

def subject(name):
    """A name as certgrab prints it: attributes in encoded order (plain values here)."""
    return ", ".join("%s=%s" % (a.rfc4514_attribute_name, a.value) for a in name)


def spki_sha256_of_key(path):
    with open(str(path), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    return hashlib.sha256(key.public_key().public_bytes(DER, SPKI)).hexdigest()


def spki_sha256(cert):
    return hashlib.sha256(cert.public_key().public_bytes(DER, SPKI)).hexdigest()


def summary(cert):
    """certgrab's "sha256 <16 hex>... issued <notBefore>"."""
    return "sha256 %s... issued %s" % (sha256(cert)[:16], iso(cert.not_valid_before_utc))


def bundle(tmp_path, *paths):
    """One --cafile from several PEM files."""
    target = tmp_path / "bundle.pem"
    target.write_text("".join(open(str(p)).read() for p in paths))
    return target


def pem_file(tmp_path, name, *parts):
    """A PEM file of certificates: each part a (path, index) or a path (all of it)."""
    ders = []
    for part in parts:
        path, index = part if isinstance(part, tuple) else (part, None)
        found = make_certs.read_ders(path)
        ders += found if index is None else [found[index]]
    target = tmp_path / name
    target.write_text(make_certs.ders_to_pem(ders))
    return target


# 1. Complete chains --------------------------------------------------------------------------

def test_a_leaf_only_server_whose_intermediate_is_nowhere_installs_nothing(run, served, certs,
                                                                           tmp_path):
    server = served("ec1", file=certs / "ec1" / "cert.pem")
    out = tmp_path / "out"
    result = grab(run, server, certs / "ec1", "--out-dir", out)
    line = assert_refused(result, VERIFY)
    issuer = subject(load_cert(certs / "ec1" / "cert.pem").issuer)
    assert line == ('certgrab: %s: certificate verification failed: unable to get local issuer '
                    'certificate: the server sent only its leaf (issued by "%s"); point it at '
                    'fullchain.pem' % (server.address, issuer))
    assert result.err.splitlines()[1] == (
        "certgrab: hint: certbot's fullchain.pem holds the leaf and its intermediates, "
        "cert.pem only the leaf")
    assert not out.exists() or os.listdir(str(out)) == []


@pytest.mark.parametrize("chain", ["ec1", "ec2"])
def test_intermediates_known_here_complete_the_files_and_a_warning_names_the_server(
        run, served, certs, tmp_path, chain):
    server = served(chain, file=certs / chain / "cert.pem")
    cafile = bundle(tmp_path, certs / chain / "root.pem", certs / chain / "chain.pem")
    out = tmp_path / "out"
    result = run(server.address, "-n", NAME, "--cafile", cafile, "--out-dir", out)
    assert result.rc == 0, result.err
    intermediates = len(make_certs.read_ders(certs / chain / "chain.pem"))
    assert "certgrab: warning: %s: the server sent only its leaf, without the %d intermediate " \
        "certificate(s) that verification found in --cafile %s: the server is misconfigured " \
        "(point it at fullchain.pem); clients that lack them fail (files get the path " \
        "OpenSSL verified: leaf, intermediates, no root)" % (server.address, intermediates,
                                                         cafile) in result.err.splitlines()
    want = make_certs.read_ders(certs / chain / "fullchain.pem")
    assert files_ders(out) == {"cert.pem": want[:1], "chain.pem": want[1:],
                               "fullchain.pem": want}, "the complete path, no root"
    assert_verifies(certs / chain / "root.pem", out)


def test_a_server_sending_part_of_its_intermediates_is_counted(run, served, certs, tmp_path):
    part = pem_file(tmp_path, "part.pem", certs / "ec2" / "cert.pem",
                    (certs / "ec2" / "chain.pem", 0))
    server = served("ec2", file=part)
    cafile = bundle(tmp_path, certs / "ec2" / "root.pem", certs / "ec2" / "chain.pem")
    result = run(server.address, "-n", NAME, "--cafile", cafile)
    assert result.rc == 0, result.err
    assert result.err == (
        "certgrab: warning: %s: the server sent only 2 of the 3 certificates of its chain, "
        "without the 1 intermediate certificate(s) that verification found in --cafile %s: the "
        "server is misconfigured (point it at fullchain.pem); clients that lack them fail\n"
        % (server.address, cafile))
    assert make_certs.pem_ders(result.out) == make_certs.read_ders(part), "stdout: as served"


# 2. --check and the served chain -------------------------------------------------------------

def check_lines(out):
    return out.splitlines()[1:]


def test_check_warns_about_a_leaf_only_server(run, served, certs, tmp_path):
    server = served("ec1", file=certs / "ec1" / "cert.pem")
    cafile = bundle(tmp_path, certs / "ec1" / "root.pem", certs / "ec1" / "chain.pem")
    result = run("--check", server.address, "-n", NAME, "--cafile", cafile)
    assert result.rc == WARNING, result.out
    assert check_lines(result.out) == [
        "WARNING - %s: the server sent only its leaf, without the 1 intermediate certificate(s) "
        "that verification found in --cafile %s: the server is misconfigured (point it at "
        "fullchain.pem); clients that lack them fail" % (server.address, cafile)]
    quiet = run("--check", "--no-chain-warning", server.address, "-n", NAME, "--cafile", cafile)
    assert quiet.rc == OK, quiet.out
    assert "chain of 2 verified, the leaf issued " in check_lines(quiet.out)[0], quiet.out


def test_check_warns_about_a_chain_out_of_order(run, served, certs, tmp_path):
    ders = make_certs.read_ders(certs / "ec2" / "fullchain.pem")
    shuffled = tmp_path / "shuffled.pem"
    shuffled.write_text(make_certs.ders_to_pem([ders[0], ders[2], ders[1]]))
    server = served("ec2", file=shuffled)
    result = run("--check", server.address, "-n", NAME, "--cafile", certs / "ec2" / "root.pem")
    assert result.rc == WARNING, result.out
    assert check_lines(result.out) == [
        "WARNING - %s: the chain was served out of order" % server.address]
    assert run("--check", "--no-chain-warning", server.address, "-n", NAME, "--cafile",
               certs / "ec2" / "root.pem").rc == OK


# 3. Whole chains: --same and --expect-file ---------------------------------------------------

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certgrab tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(subject_name, issuer_name, public_key, signing_key, serial, not_before, ca):
    builder = x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name) \
        .public_key(public_key).serial_number(serial) \
        .not_valid_before(not_before).not_valid_after(datetime.datetime(2049, 1, 1)) \
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(NAME), x509.IPAddress(__import__("ipaddress").ip_address(
                "127.0.0.1"))]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture
def reissued(tmp_path):
    """One leaf served with its intermediate (old.pem) or with that intermediate re-issued a
    year later, same name and key (new.pem): {"root", "key", "old", "new", "old_inter",
    "new_inter"} paths and certificates."""
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root_name, inter_name = _name("fleet test root"), _name("fleet test intermediate")
    root = _sign(root_name, root_name, root_key.public_key(), root_key, 1,
                 datetime.datetime(2020, 1, 1), True)
    old = _sign(inter_name, root_name, inter_key.public_key(), root_key, 2,
                datetime.datetime(2024, 1, 1), True)
    new = _sign(inter_name, root_name, inter_key.public_key(), root_key, 3,
                datetime.datetime(2025, 1, 1), True)
    leaf = _sign(_name("fleet test leaf"), inter_name, leaf_key.public_key(), inter_key, 4,
                 datetime.datetime(2024, 6, 1), False)
    files = {}
    for name, certs in (("root", [root]), ("old", [leaf, old]), ("new", [leaf, new])):
        files[name] = tmp_path / (name + ".pem")
        files[name].write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                         for c in certs))
    files["key"] = tmp_path / "key.pem"
    files["key"].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    files.update(old_inter=old, new_inter=new)
    return files


def inter_summary(cert):
    return 'intermediate 1 "O=certgrab tests, CN=fleet test intermediate" (%s)' % summary(cert)


def test_same_flags_a_source_that_kept_old_intermediates(run, started, reissued):
    old = started(servers.TLSServer(reissued["old"], reissued["key"]))
    new = started(servers.TLSServer(reissued["new"], reissued["key"]))
    result = run("--check", "--same", old.address, new.address, "-n", NAME,
                 "--cafile", reissued["root"])
    assert result.rc == CRITICAL, result.out
    assert check_lines(result.out)[0] == (
        "CRITICAL - %s: not the newest chain: serves %s; the newest (%s) serves %s" % (
            old.address, inter_summary(reissued["old_inter"]), new.address,
            inter_summary(reissued["new_inter"])))
    assert check_lines(result.out)[1].startswith("OK - %s: the leaf expires" % new.address)


def test_same_names_a_source_lacking_an_intermediate(run, served, certs, tmp_path):
    leaf_only = served("ec1", file=certs / "ec1" / "cert.pem")
    full = served("ec1")
    cafile = bundle(tmp_path, certs / "ec1" / "root.pem", certs / "ec1" / "chain.pem")
    result = run("--check", "--same", "--no-chain-warning", full.address, leaf_only.address,
                 "-n", NAME, "--cafile", cafile)
    assert result.rc == CRITICAL, result.out
    inter = load_cert(certs / "ec1" / "chain.pem")
    assert check_lines(result.out)[1] == (
        'CRITICAL - %s: not the newest chain: serves no intermediate 1; the newest (%s) serves '
        'intermediate 1 "%s" (%s)' % (leaf_only.address, full.address, subject(inter.subject),
                                      summary(inter)))


def test_expect_file_catches_a_service_that_kept_old_intermediates(run, started, reissued):
    server = started(servers.TLSServer(reissued["old"], reissued["key"]))
    result = run("--expect-file", reissued["new"], server.address, "-n", NAME,
                 "--cafile", reissued["root"])
    assert result.rc == CRITICAL, result.out
    assert check_lines(result.out) == [
        "CRITICAL - %s: serves %s; %s has %s (a service not reloaded?)" % (
            server.address, inter_summary(reissued["old_inter"]), reissued["new"],
            inter_summary(reissued["new_inter"]))]
    same = run("--expect-file", reissued["old"], server.address, "-n", NAME,
               "--cafile", reissued["root"])
    assert same.rc == OK, same.out


def test_expect_file_names_the_leaf_that_differs(run, served, certs):
    server = served("ec1")
    expect = certs / "ec1new" / "fullchain.pem"
    result = run("--expect-file", expect, server.address, "-n", NAME,
                 "--cafile", certs / "ec1" / "root.pem")
    assert check_lines(result.out) == [
        "CRITICAL - %s: serves the leaf (%s); %s has the leaf (%s) (a service not reloaded?)"
        % (server.address, summary(load_cert(certs / "ec1" / "cert.pem")), expect,
           summary(load_cert(certs / "ec1new" / "cert.pem")))]


def test_expect_file_without_certificates_is_unknown(run, served, certs, tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing\n")
    result = run("--expect-file", empty, served("ec1").address, "-n", NAME)
    assert result.rc == 3
    assert result.out == "CERTGRAB UNKNOWN - --expect-file %s: no PEM certificate in it\n" % empty


# 4. Several --key-path, --privkey -------------------------------------------------------------

def test_the_key_the_leaf_matches_is_installed_as_privkey(run, served, certs, tmp_path):
    out = tmp_path / "out"
    result = grab(run, served("ec1"), certs / "ec1", "--out-dir", out, "--privkey",
                  "--key-path", certs / "ec2" / "key.pem",
                  "--key-path", certs / "ec1" / "key.pem")
    assert result.rc == 0, result.err
    assert entries(out) == sorted(OUT_FILES + ["privkey.pem"])
    assert (out / "privkey.pem").read_bytes() == (certs / "ec1" / "key.pem").read_bytes()
    assert stat.S_IMODE(os.stat(str(out / "privkey.pem")).st_mode) == 0o600
    assert_verifies(certs / "ec1" / "root.pem", out)


def test_combined_path_gets_the_matching_key(run, served, certs, tmp_path):
    combined = tmp_path / "haproxy.pem"
    result = grab(run, served("ec1"), certs / "ec1", "--combined-path", combined,
                  "--key-path", certs / "ec2" / "key.pem",
                  "--key-path", certs / "ec1" / "key.pem")
    assert result.rc == 0, result.err
    assert combined.read_bytes().endswith((certs / "ec1" / "key.pem").read_bytes())
    assert_fullchain_verifies(certs / "ec1" / "root.pem", combined)


def test_privkey_may_be_the_current_key_path_and_follows_the_certificate(run, started, certs,
                                                                        served, tmp_path):
    """certbot's layout: the service reads privkey.pem, which is also the current key; the
    next key is listed too. The renewal for the next key moves both in one set."""
    out = tmp_path / "out"
    first = grab(run, served("ec1"), certs / "ec1", "--out-dir", out, "--privkey",
                 "--key-path", certs / "ec1" / "key.pem")
    assert first.rc == 0, first.err
    fresh = make_certs.make_dated_chain(tmp_path, certs / "root-ec", "fresh", 30)
    server = started(servers.TLSServer(os.path.join(fresh, "fullchain.pem"),
                                       os.path.join(fresh, "key.pem")))
    argv = grab_args(server, certs / "ec1", "--out-dir", out, "--privkey",
                     "--key-path", out / "privkey.pem",
                     "--key-path", os.path.join(fresh, "key.pem"))
    result = run(*argv)
    assert result.rc == 0, result.err
    assert (out / "privkey.pem").read_bytes() == open(os.path.join(fresh, "key.pem"), "rb").read()
    assert files_ders(out)["cert.pem"] == make_certs.read_ders(os.path.join(fresh, "cert.pem"))
    assert_verifies(certs / "root-ec" / "cert.pem", out)
    before = snapshot(out)
    assert run(*argv).rc == 0 and snapshot(out) == before, "a rerun changes nothing"


@pytest.mark.parametrize("extra, message", [
    (["--out-dir", "{out}", "--key-path", "{k1}", "--key-path", "{k2}"],
     "certgrab: several --key-path need --privkey (or --combined-path) to install"),
    (["--fullchain-path", "{out}/f.pem", "--privkey", "--key-path", "{k1}"],
     "certgrab: --privkey writes privkey.pem in --out-dir; give --out-dir"),
    (["--out-dir", "{out}", "--privkey"], "certgrab: --privkey needs --key-path"),
])
def test_privkey_usage_errors(run, served, certs, tmp_path, extra, message):
    server = served("ec1")
    values = dict(out=tmp_path / "out", k1=certs / "ec1" / "key.pem",
                  k2=certs / "ec2" / "key.pem")
    result = grab(run, server, certs / "ec1", *[a.format(**values) for a in extra])
    assert result.rc == USAGE
    assert result.err.splitlines()[0] == message
    assert server.connections == 0


# 5. Messages ----------------------------------------------------------------------------------

def test_a_key_mismatch_names_the_leaf_the_cause_and_the_fix(run, served, certs, tmp_path):
    server = served("ec1")
    keys = [certs / "ec2" / "key.pem", certs / "rsa1" / "key.pem"]
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "out", "--privkey",
                  "--key-path", keys[0], "--key-path", keys[1])
    assert_refused(result, REFUSED)
    leaf = load_cert(certs / "ec1" / "cert.pem")
    assert result.err.splitlines() == [
        "certgrab: %s: refused the leaf serial %s issued %s: its key (SPKI sha256 %s) is not "
        "--key-path %s (SPKI sha256 %s) nor --key-path %s (SPKI sha256 %s)" % (
            server.address, serial_hex(leaf.serial_number), iso(leaf.not_valid_before_utc),
            spki_sha256(leaf), keys[0], spki_sha256_of_key(keys[0]), keys[1],
            spki_sha256_of_key(keys[1])),
        "certgrab: hint: the renewing machine likely made a new key: renew there with "
        "--reuse-key (certbot, lego), or copy its new key here and add it as another "
        "--key-path (README: key rollover)"]


def test_verbose_says_what_was_refused(run, served, certs):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "-v", "--key-path", certs / "ec2" / "key.pem")
    assert result.rc == REFUSED
    leaf, inter = load_cert(certs / "ec1" / "cert.pem"), load_cert(certs / "ec1" / "chain.pem")
    lines = [line for line in result.err.splitlines() if ": refused: " in line]
    assert len(lines) == 3, result.err
    assert lines[0].startswith("certgrab: %s: refused: TLSv1.3 TLS_" % server.address)
    assert lines[1:] == [
        "certgrab: %s: refused: leaf serial %s, issued %s, expires %s" % (
            server.address, serial_hex(leaf.serial_number), iso(leaf.not_valid_before_utc),
            iso(leaf.not_valid_after_utc)),
        'certgrab: %s: refused: chain, leaf first: "%s"; "%s"' % (
            server.address, subject(leaf.subject), subject(inter.subject))]
    assert ": refused: " not in grab(run, server, certs / "ec1", "--key-path",
                                     certs / "ec2" / "key.pem").err


def test_a_stale_source_is_behind_and_gets_no_force_hint(run, served, certs, tmp_path):
    out = tmp_path / "out"
    assert grab(run, served("ec1new"), certs / "ec1", "--out-dir", out).rc == 0
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", out)
    assert_refused(result, REFUSED)
    assert result.err.splitlines() == [
        "certgrab: %s offers a leaf (%s) that is not newer than the installed one (%s)" % (
            server.address, describe(load_cert(certs / "ec1" / "cert.pem")),
            describe(load_cert(certs / "ec1new" / "cert.pem"))),
        "certgrab: hint: the source is behind this machine: it has not yet installed the "
        "newest certificate; fix the source, not this machine"]


@pytest.mark.parametrize("installing", [True, False], ids=["install", "stdout"])
def test_an_unknown_root_is_named_and_insecure_is_offered_only_without_files(
        run, served, certs, tmp_path, installing):
    server = served("unknown")
    cafile = certs / "ec1" / "root.pem"
    extra = ["--out-dir", tmp_path / "out"] if installing else []
    result = grab(run, server, certs / "ec1", *extra)
    line = assert_refused(result, VERIFY)
    assert line == "certgrab: %s: certificate verification failed: unable to get local issuer " \
        "certificate" % server.address
    root = subject(load_cert(certs / "unknown" / "root.pem").subject)
    hint = 'certgrab: hint: the chain leads to the root "%s", which --cafile %s does not ' \
        'hold: if your CA changed its root, add the new one' % (root, cafile)
    assert result.err.splitlines()[1] == hint + ("" if installing else
                                                 "; --insecure skips verification")


def test_a_wrong_name_lists_the_names_the_leaf_covers(run, served, certs):
    server = served("wrongname")
    result = grab(run, server, certs / "ec1")
    assert_refused(result, VERIFY)
    assert result.err.splitlines()[1] == (
        "certgrab: hint: the leaf covers other.example.test; pass -n/--servername with one of "
        "those names")
    insecure = run(server.address, "-n", NAME, "--insecure", "--out-dir", "/nonexistent/x")
    assert insecure.rc == REFUSED
    assert error_lines(insecure.err) == [
        "certgrab: %s: the leaf does not cover %s; it covers: other.example.test" % (
            server.address, NAME)]


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_a_retried_hook_says_why(run, served, certs, tmp_path, quiet):
    out, log = tmp_path / "out", tmp_path / "hook.log"
    server = served("ec1")
    failed = grab(run, server, certs / "ec1", "--out-dir", out, "--deploy-hook", "exit 1")
    assert failed.rc == 7, failed.err
    flags = ["-q"] if quiet else []
    result = grab(run, server, certs / "ec1", "--out-dir", out, "--deploy-hook",
                  hook_command(log), *flags)
    assert result.rc == 0, result.err
    real = os.path.realpath(str(out))
    assert result.err.splitlines() == [
        "certgrab: retrying the deploy hook, which did not complete after an earlier run "
        "installed %s" % " ".join(os.path.join(real, name) for name in OUT_FILES)]
    assert len(hook_runs(log)) == 1
    again = grab(run, server, certs / "ec1", "--out-dir", out, "--deploy-hook",
                 hook_command(log), *flags)
    assert "retrying" not in again.err and len(hook_runs(log)) == 1
    assert_verifies(certs / "ec1" / "root.pem", out)


# 6. --tls-min, --tls-max ----------------------------------------------------------------------

def test_tls_max_asks_for_an_older_protocol(run, served, certs):
    server = served("ec1", tls="any")
    result = grab(run, server, certs / "ec1", "--tls-max", "1.2", "--json")
    assert result.rc == 0, result.err
    assert '"tls_version": "TLSv1.2"' in result.out
    assert '"tls_version": "TLSv1.3"' in grab(run, server, certs / "ec1", "--json").out


def test_tls_min_refuses_an_older_server(run, served, certs):
    result = grab(run, served("ec1", tls="1.2"), certs / "ec1", "--tls-min", "1.3")
    assert result.rc == FETCH, result.err
    assert "TLS handshake failed" in result.err.splitlines()[0]


@pytest.mark.parametrize("extra, message", [
    (["--tls-max", "2"], "certgrab: --tls-max 2: not a TLS version; known: 1.0, 1.1, 1.2, 1.3"),
    (["--tls-min", "1.3", "--tls-max", "1.2"], "certgrab: --tls-min 1.3 is above --tls-max 1.2"),
])
def test_tls_version_usage_errors(run, served, certs, extra, message):
    result = grab(run, served("ec1"), certs / "ec1", *extra)
    assert result.rc == USAGE
    assert result.err.splitlines()[0] == message
