"""Issue 13: certificate fields read as pyca/cryptography reads them, one case at a time.

The certificates are made here with cryptography (a few then patched byte for byte, where
no honest tool writes the case: a negative serial, 30 February, second 60) and given to
certgrab as local files. tests/test_differential.py compares every field over whole corpora.

    case                                             tests
    ", CN=" inside a value is RFC 4514-escaped       test_comma_cn_inside_a_value_is_escaped
    a BIT STRING attribute prints as #hex            test_bit_string_attribute_prints_as_hex
    a negative serial keeps its sign                 test_negative_serial_keeps_its_sign
    30 February, second 60: refused, not shifted     test_impossible_times_are_refused
    a year below 1000 has four digits                test_year_below_1000_has_four_digits
    X509 / TRUSTED CERTIFICATE labels, DER files     test_pem_labels_openssl_reads, test_der_file
    ~140-certificate bundle read whole; beyond       test_ca_bundle_is_read_whole,
    MAX_LOCAL_CERTS a warning says so                test_bundle_beyond_its_bound_says_so
    other SAN types shown, not dropped               test_every_san_type_is_shown
"""

import datetime
import ipaddress
import json
import subprocess

import pytest

from helpers import assert_one_error

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

KEY = ec.generate_private_key(ec.SECP256R1())
START = datetime.datetime(2030, 2, 28, 12, 0, 0)   # UTCTime 300228120000Z
BUNDLE = 140                                         # certificates: a system CA bundle


def make_cert(subject=None, serial=0x0101, start=START, end=None, sans=None):
    """DER of a self-signed EC certificate."""
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name) \
        .public_key(KEY.public_key()).serial_number(serial) \
        .not_valid_before(start).not_valid_after(end or start + datetime.timedelta(days=90))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def pem(der, label="CERTIFICATE"):
    import base64
    body = base64.encodebytes(der).decode()
    return "-----BEGIN %s-----\n%s-----END %s-----\n" % (label, body, label)


def patched(der, old, new):
    assert der.count(old) == 1 and len(old) == len(new)
    return der.replace(old, new)


def report(run, tmp_path, text, name="cert.pem", mode="--json", rc=0):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = run(mode, path)
    assert result.rc == rc, result.err
    return json.loads(result.out)[0] if mode == "--json" else result


def test_comma_cn_inside_a_value_is_escaped(run, tmp_path):
    """An O of "Org, CN=evil" must not read as a second CN."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org, CN=evil"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    source = report(run, tmp_path, pem(make_cert(name)))
    assert source["chain"][0]["subject"] == "O=Org\\, CN=evil, CN=leaf"
    text = report(run, tmp_path, pem(make_cert(name)), mode="--text").out
    assert "subject  O=Org\\x5c, CN=evil, CN=leaf" in text   # the backslash, terminal-safe


def test_rfc4514_specials_and_multi_valued_rdn(run, tmp_path):
    name = x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ' #a+b;c<d>e"f\\g '),
        x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])])
    subject = report(run, tmp_path, pem(make_cert(name)))["chain"][0]["subject"]
    assert subject == 'CN=leaf+O=\\ #a\\+b\\;c\\<d\\>e\\"f\\\\g\\ '   # DER sorts a SET


def test_bit_string_attribute_prints_as_hex(run, tmp_path):
    """x500UniqueIdentifier is a BIT STRING: RFC 4514 2.4 gives "#" and its DER in hex."""
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "leaf"),
        x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x00\xff\x80\x01",
                           _type=x509.name._ASN1Type.BitString)])
    subject = report(run, tmp_path, pem(make_cert(name)))["chain"][0]["subject"]
    assert subject == "CN=leaf, 2.5.4.45=#030400ff8001"     # no byte replaced or lost


def test_negative_serial_keeps_its_sign(run, tmp_path):
    der = patched(make_cert(serial=0x0101), b"\x02\x02\x01\x01", b"\x02\x02\xff\x01")
    assert report(run, tmp_path, pem(der))["chain"][0]["serial"] == "-ff"   # -255


@pytest.mark.parametrize("old, new, shown", [
    (b"300228120000Z", b"300230120000Z", "300230120000Z"),    # 30 February 2030
    (b"300228120000Z", b"300228235960Z", "300228235960Z"),    # second 60
    (b"300228120000Z", b"300229120000Z", "300229120000Z"),    # 2030 is not a leap year
])
def test_impossible_times_are_refused(run, certgrab, tmp_path, old, new, shown):
    der = patched(make_cert(), old, new)
    (tmp_path / "cert.pem").write_text(pem(der))
    result = run("--json", tmp_path / "cert.pem")
    assert result.rc == 3
    assert_one_error(result)
    assert "impossible validity time %s" % shown in result.err
    with pytest.raises(certgrab.ParseError):
        certgrab.parse_certificate(der)


def test_leap_day_is_a_real_day(run, tmp_path):
    der = patched(make_cert(), b"300228120000Z", b"320229120000Z")   # 2032 is a leap year
    assert report(run, tmp_path, pem(der))["chain"][0]["not_before"] == "2032-02-29T12:00:00Z"


def test_year_below_1000_has_four_digits(run, tmp_path):
    """GeneralizedTime can say year 999 (no builder writes it: patched from 2999)."""
    der = patched(make_cert(end=datetime.datetime(2999, 1, 1, 0, 0, 1)),
                  b"29990101000001Z", b"09990101000001Z")
    assert report(run, tmp_path, pem(der))["chain"][0]["not_after"] == "0999-01-01T00:00:01Z"
    text = report(run, tmp_path, pem(der), mode="--text").out
    assert "until    0999-01-01T00:00:01Z (EXPIRED" in text


@pytest.mark.parametrize("label", ["CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"])
def test_pem_labels_openssl_reads(run, tmp_path, label):
    der = make_cert()
    if label == "TRUSTED CERTIFICATE":    # OpenSSL's: trust settings after the certificate
        (tmp_path / "plain.pem").write_text(pem(der))
        text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "plain.pem"),
                               "-trustout", "-addtrust", "serverAuth"], check=True,
                              stdout=subprocess.PIPE).stdout.decode()
        assert "BEGIN TRUSTED CERTIFICATE" in text
    else:
        text = pem(der, label)
    source = report(run, tmp_path, text)
    assert [c["subject"] for c in source["chain"]] == ["CN=leaf"]
    assert source["chain"][0]["sha256"] == __import__("hashlib").sha256(der).hexdigest()


def test_der_file_is_read_as_one_certificate(run, tmp_path):
    source = report(run, tmp_path, make_cert(), name="cert.der")
    assert [c["subject"] for c in source["chain"]] == ["CN=leaf"]


def test_other_pem_blocks_alone_are_no_certificate(run, tmp_path):
    (tmp_path / "key.pem").write_bytes(KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    result = run("--json", tmp_path / "key.pem")
    assert result.rc == 3 and "no PEM certificate in it" in result.out + result.err


def bundle(count):
    """count distinct self-signed certificates, as one PEM text."""
    return "".join(pem(make_cert(serial=index + 1)) for index in range(count))


def test_ca_bundle_is_read_whole(run, tmp_path):
    source = report(run, tmp_path, bundle(BUNDLE))
    assert len(source["chain"]) == BUNDLE
    assert not any("only the first" in p for p in source["problems"])


def test_bundle_beyond_its_bound_says_so(run, certgrab, tmp_path, monkeypatch):
    """The bound is MAX_LOCAL_CERTS (1000); a smaller one here keeps the test quick."""
    assert certgrab.MAX_LOCAL_CERTS >= 1000 > certgrab.MAX_CHAIN
    monkeypatch.setattr(certgrab, "MAX_LOCAL_CERTS", BUNDLE - 1)
    source = report(run, tmp_path, bundle(BUNDLE))
    assert len(source["chain"]) == BUNDLE - 1
    assert "only the first %d of the %d certificates in %s were read" % (
        BUNDLE - 1, BUNDLE, tmp_path / "cert.pem") in source["problems"]


def test_every_san_type_is_shown(run, tmp_path):
    sans = [x509.DNSName("www.example.test"), x509.IPAddress(ipaddress.ip_address("::1")),
            x509.RFC822Name("a@example.test"), x509.UniformResourceIdentifier("https://x.test/"),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d, e")])),
            x509.OtherName(x509.ObjectIdentifier("1.2.3.5"), b"\x0c\x02hi")]
    cert = report(run, tmp_path, pem(make_cert(sans=sans)))["chain"][0]
    assert cert["sans"] == ["www.example.test", "::1", "email:a@example.test",
                            "URI:https://x.test/", "RID:1.2.3.4", "DirName:CN=d\\, e",
                            "othername:1.2.3.5:#0c026869"]


@pytest.mark.parametrize("raw, shown", [
    ("os\u00edts".encode(), "biztos\u00edts.hu"),     # UTF-8, read as such (as cryptography)
    (b"os\xffita", "biztos\\xffita.hu"),            # not UTF-8: the byte escaped, not replaced
])
def test_non_ascii_dns_san_is_never_replaced(run, tmp_path, raw, shown):
    der = patched(make_cert(sans=[x509.DNSName("biztositas.hu")]), b"ositas", raw)
    assert report(run, tmp_path, pem(der))["chain"][0]["sans"] == [shown]


# One malformed certificate is that source's error: the report goes on -------------------

BAD_NOT_AFTER = (b"300529120000Z", b"300529240000Z")   # notAfter at hour 24


def bad_and_good_files(tmp_path):
    """good.pem, bad.pem (notAfter hour 24) and good2.pem, in that order."""
    paths = [tmp_path / "good.pem", tmp_path / "bad.pem", tmp_path / "good2.pem"]
    paths[0].write_text(pem(make_cert(serial=1)))
    paths[1].write_text(pem(patched(make_cert(serial=2), *BAD_NOT_AFTER)))
    paths[2].write_text(pem(make_cert(serial=3)))
    return paths


def test_json_reports_every_source_and_the_bad_one_as_its_error(run, tmp_path):
    paths = bad_and_good_files(tmp_path)
    result = run("--json", *paths)
    assert result.rc == 3                       # a source could not be read
    sources = json.loads(result.out)
    assert [s["source"] for s in sources] == [str(p) for p in paths]
    assert [len(s["chain"]) for s in sources] == [1, 0, 1]
    assert sources[0]["error"] is None and sources[2]["error"] is None
    assert sources[1]["error"].startswith("%s: certificate 1 of 1: malformed certificate: "
                                          "impossible validity time 300529240000Z" % paths[1])
    assert_one_error(result)
    assert str(paths[1]) in result.err


def test_text_reports_every_source_and_the_bad_one_as_its_error(run, tmp_path):
    paths = bad_and_good_files(tmp_path)
    result = run("--text", *paths)
    assert result.rc == 3
    blocks = result.out.strip().split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [str(p) for p in paths]
    assert "  error:        %s: certificate 1 of 1: malformed" % paths[1] in blocks[1]
    assert "[0] subject  CN=leaf" in blocks[0] and "[0] subject  CN=leaf" in blocks[2]


def test_check_flags_the_bad_source_critical_and_reports_the_others(run, tmp_path):
    paths = bad_and_good_files(tmp_path)
    result = run("--check", *paths)
    assert result.rc == 2, result.out
    lines = result.out.splitlines()
    assert lines[0].startswith("CERTGRAB CRITICAL - 3 source(s): 2 OK, 1 CRITICAL; first: ")
    assert lines[1].startswith("OK - %s: the leaf expires in" % paths[0])
    assert lines[2].startswith("CRITICAL - %s: certificate 1 of 1: malformed certificate: "
                               "impossible validity time" % paths[1])
    assert lines[3].startswith("OK - %s: the leaf expires in" % paths[2])


def test_a_server_serving_a_malformed_certificate_is_its_own_error(run, tmp_path, started):
    """OpenSSL serves a leaf whose notAfter has hour 24; certgrab reports that server as
    CRITICAL and still checks the good file beside it."""
    import servers
    bad, key = tmp_path / "bad-leaf.pem", tmp_path / "key.pem"
    bad.write_text(pem(patched(make_cert(serial=5), *BAD_NOT_AFTER)))
    key.write_bytes(KEY.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    server = started(servers.TLSServer(bad, key))
    good = tmp_path / "good.pem"
    good.write_text(pem(make_cert(serial=6)))
    result = run("--check", "--insecure", "-n", "leaf", server.address, good)
    assert result.rc == 2, result.out + result.err
    lines = result.out.splitlines()
    assert lines[1].startswith("CRITICAL - %s: certificate 1 of 1: malformed certificate: "
                               "impossible validity time 300529240000Z" % server.address)
    assert lines[2].startswith("OK - %s: the leaf expires in" % good)
    result = run("--json", "--insecure", "-n", "leaf", server.address, good)
    assert result.rc == 3
    assert [s["error"] is None for s in json.loads(result.out)] == [False, True]


def test_text_wraps_long_names_and_san_lists_within_80_columns(run, tmp_path):
    """A 45,000-character name (twice in a self-signed certificate: 90 KB, under the
    DER reader's 100 KiB per certificate) is wrapped, never cut."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 45000),
                      x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    sans = [x509.DNSName("host-%03d.example.test" % n) for n in range(40)]
    result = report(run, tmp_path, pem(make_cert(name, sans=sans)), mode="--text")
    lines = result.out.splitlines()
    assert max(len(line) for line in lines) <= 80
    body = "".join(line.strip() for line in lines if line.strip().startswith("o"))
    assert body.count("o") >= 45000                 # wrapped, not cut
    assert sum("host-" in line for line in lines) >= 5
    assert "host-039.example.test" in result.out
