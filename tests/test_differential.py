"""Issue 13: every field certgrab reports agrees with pyca/cryptography on the same certificate.

Every X.509 certificate file of cryptography-vectors (PEM, and DER files read directly, since
certgrab reads a local DER certificate) and every PEM file of the system CA directory goes
through certgrab's --json as a local SOURCE, and each reported field is compared with what
pyca/cryptography parses from the same file. A file cryptography refuses (to load, or in a
field certgrab reports) must be certgrab's one-line error too, never a traceback; the few
files where certgrab deliberately differs are listed in DIFFERENT with the reason.

Normalisations (certgrab's documented formats, docs/monitoring.md "--json"):
    subject, issuer  RFC 4514 in the order encoded, RDNs joined by ", " (cryptography's
                     rfc4514_string() reverses the order and joins by ","); certgrab also
                     says serialNumber and emailAddress; a value without a string form
                     is "#" + hex of its whole DER (cryptography: of its content only)
    serial           hex of the signed integer ("-04316693ed"); even number of digits
    not_before/after YYYY-MM-DDTHH:MM:SSZ, four-digit year
    sans             encoded order; DNS and IP bare, the other types as OpenSSL writes
                     them: email:, URI:, DirName:<name as above>, RID:<oid>,
                     othername:<oid>:#<hex of the value's DER>
    key, key_bits    RSA, RSA-PSS, DSA, "EC <curve>" (P-256, P-384, P-521, P-224, P-192,
                     else cryptography's curve name), Ed25519 256, Ed448 456 (cryptography
                     gives Edwards keys no size); a key cryptography cannot load: its OID, 0
    signature_algorithm  OpenSSL's long name of the OID, or the dotted OID

The oldest and newest Pythons of the matrix (3.6, 3.13) run certgrab.py as a subprocess
over the same files and must give the same JSON.
"""

import base64
import glob
import hashlib
import ipaddress
import json
import os
import subprocess
import warnings

import pytest

from helpers import CERTGRAB, call_main, interpreter, iso

cryptography = pytest.importorskip("cryptography")
cryptography_vectors = pytest.importorskip("cryptography_vectors")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa  # noqa: E402

VECTORS = os.path.dirname(cryptography_vectors.__file__)
SYSTEM_CAS = "/etc/ssl/certs"
PEM_CERT_LABELS = (b"-----BEGIN CERTIFICATE-----", b"-----BEGIN X509 CERTIFICATE-----",
                   b"-----BEGIN TRUSTED CERTIFICATE-----")
NOT_CERTIFICATES = ("/requests/", "/ocsp/", "/crls/", "/crl_", "/asymmetric/", "/pkcs7/",
                    "/pkcs12/")   # DER files that are CSRs, OCSP messages, CRLs, keys
BATCH = 200                       # files per certgrab run for the good files
OLD_AND_NEW = (6, 13)   # python3.6 and python3.13
SHORT_NAME_OVERRIDES = {x509.NameOID.SERIAL_NUMBER: "serialNumber",
                        x509.NameOID.EMAIL_ADDRESS: "emailAddress"}
STRING_TAGS = {0x0C, 0x12, 0x13, 0x14, 0x16, 0x1A, 0x1E, 0x1C}   # read as text by certgrab
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521",
          "secp224r1": "P-224", "secp192r1": "P-192"}
EDWARDS = {ed25519.Ed25519PublicKey: ("Ed25519", 256), ed448.Ed448PublicKey: ("Ed448", 456)}
OID_SAN = x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME
OID_BASIC_CONSTRAINTS = x509.oid.ExtensionOID.BASIC_CONSTRAINTS
# Files where certgrab deliberately differs from cryptography: path under the vectors -> why.
# "report": cryptography refuses the file, certgrab reports it (fields still compared where
# cryptography can give them); SANs and CA are then not compared when cryptography cannot
# read the extensions at all.
DIFFERENT = {
    "x509/san_x400address.der": "report: x400Address SANs shown as X400Name:#hex, "
                                "cryptography does not support the type",
    "x509/san_edipartyname.der": "report: ediPartyName shown as EdiPartyName:#hex, likewise",
    "x509/wosign-bc-invalid.pem": "report: basicConstraints cA FALSE with a path length; "
                                  "certgrab reads it as not a CA, cryptography refuses",
    "x509/badssl-sct-none-hash.der": "report: a bad SCT extension, which certgrab never reads",
    "x509/badssl-sct-anonymous-sig.der": "report: likewise",
    "x509/custom/invalid-sct-length.der": "report: likewise",
    "x509/custom/invalid-sct-version.der": "report: likewise",
    "x509/custom/cp_invalid.pem": "report: a bad certificatePolicies, never read",
    "x509/custom/cp_invalid2.der": "report: likewise",
    "x509/custom/nc_invalid_ip_netmask.pem": "report: a bad nameConstraints, never read",
    "x509/custom/nc_invalid_ip4_netmask.der": "report: likewise",
    "x509/custom/nc_ip_invalid_length.pem": "report: likewise",
    "x509/custom/inhibit_any_policy_negative.pem": "report: a bad inhibitAnyPolicy, never read",
    "x509/custom/empty-eku.pem": "report: an empty extendedKeyUsage, never read",
    "x509/custom/malformed-ian.pem": "report: a bad issuerAltName, never read",
}


def der_hex(tag, content):
    """'#' and the hex of one DER element: RFC 4514's form of a value with no string form."""
    length = len(content)
    head = bytes([length]) if length < 0x80 else bytes(
        [0x80 | (length.bit_length() + 7) // 8]) + length.to_bytes((length.bit_length() + 7) // 8,
                                                                  "big")
    return "#" + (bytes([tag]) + head + content).hex()


def attribute_text(attribute):
    """certgrab's form of one attribute: cryptography's, with certgrab's two extra short
    names, and the whole DER in hex for a value without a string form."""
    text = attribute.rfc4514_string(SHORT_NAME_OVERRIDES)
    tag = attribute._type.value
    if tag in STRING_TAGS:
        return text
    raw = attribute.value if isinstance(attribute.value, bytes) else attribute.value.encode()
    return "%s=%s" % (text.split("=", 1)[0], der_hex(tag, raw))


def name_text(name):
    """certgrab's form of a Name: cryptography's RFC 4514 attributes, in encoded order."""
    return ", ".join("+".join(attribute_text(a) for a in rdn) for rdn in name.rdns)


def general_name_text(name):
    if isinstance(name, x509.DNSName):
        return name.value
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, x509.RFC822Name):
        return "email:" + name.value
    if isinstance(name, x509.UniformResourceIdentifier):
        return "URI:" + name.value
    if isinstance(name, x509.DirectoryName):
        return "DirName:" + name_text(name.value)
    if isinstance(name, x509.RegisteredID):
        return "RID:" + name.value.dotted_string
    if isinstance(name, x509.OtherName):
        return "othername:%s:#%s" % (name.type_id.dotted_string, name.value.hex())
    raise AssertionError("a GeneralName type this test does not know: %r" % name)


def key_fields(cert):
    """(key, key_bits) as certgrab reports them."""
    try:
        key = cert.public_key()
    except Exception:   # cryptography cannot load it (GOST, ...): certgrab names the OID
        return cert.public_key_algorithm_oid.dotted_string, 0
    if isinstance(key, rsa.RSAPublicKey):
        pss = cert.public_key_algorithm_oid == x509.oid.PublicKeyAlgorithmOID.RSASSA_PSS
        return "RSA-PSS" if pss else "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC " + CURVES.get(key.curve.name, key.curve.name), key.curve.key_size
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    for kind, fields in EDWARDS.items():
        if isinstance(key, kind):
            return fields
    raise AssertionError("a key type this test does not know: %r" % key)


def spki_der(cert):
    """The SubjectPublicKeyInfo as encoded in the certificate (cryptography's public_bytes
    re-encodes, e.g. explicit curve parameters as a named curve)."""
    tbs = cert.tbs_certificate_bytes
    items, pos = [], header_length(tbs, 0)
    while pos < len(tbs):
        end = pos + header_length(tbs, pos) + content_length(tbs, pos)
        items.append(tbs[pos:end])
        pos = end
    return items[6 if tbs[header_length(tbs, 0)] == 0xA0 else 5]


def header_length(data, pos):
    return 2 + (data[pos + 1] & 0x7F if data[pos + 1] & 0x80 else 0)


def content_length(data, pos):
    if not data[pos + 1] & 0x80:
        return data[pos + 1]
    return int.from_bytes(data[pos + 2:pos + header_length(data, pos)], "big")


def expected_fields(cert, with_extensions=True):
    """The fields certgrab's --json must give for one certificate (a dict)."""
    digest = hashlib.sha256(spki_der(cert)).digest()
    key, bits = key_fields(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # negative serial numbers
        serial = cert.serial_number
    fields = {
        "subject": name_text(cert.subject), "issuer": name_text(cert.issuer),
        "serial": serial, "key": key, "key_bits": bits,
        "signature_algorithm": cert.signature_algorithm_oid.dotted_string,
        "not_before": iso(cert.not_valid_before_utc), "not_after": iso(cert.not_valid_after_utc),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(), "spki_sha256": digest.hex(),
        "spki_pin": base64.b64encode(digest).decode(),
    }
    if with_extensions:
        try:
            sans = cert.extensions.get_extension_for_oid(OID_SAN).value
            fields["sans"] = [general_name_text(n) for n in sans]
        except x509.ExtensionNotFound:
            fields["sans"] = []
        try:
            fields["is_ca"] = cert.extensions.get_extension_for_oid(OID_BASIC_CONSTRAINTS).value.ca
        except x509.ExtensionNotFound:
            fields["is_ca"] = False
    return fields


def normalised(reported, signature_names):
    """certgrab's JSON for one certificate, in the terms expected_fields uses."""
    fields = dict(reported)
    fields["serial"] = int(fields["serial"], 16)
    names = {name: oid for oid, name in signature_names.items()}
    fields["signature_algorithm"] = names.get(fields["signature_algorithm"],
                                              fields["signature_algorithm"])
    fields["sans"] = [str(ipaddress.ip_address(n)) if is_ip(n) else n for n in fields["sans"]]
    return fields


def is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def load_with_cryptography(path, data):
    """(certificates, None), or (None, why) when cryptography refuses the file or a field."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # negative serial numbers
        try:
            certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data \
                else [x509.load_der_x509_certificate(data)]
            for cert in certs:
                expected_fields(cert, with_extensions=False)
                if not DIFFERENT.get(path, "").startswith("report"):
                    expected_fields(cert)
        except Exception as exc:
            return None, "%s: %s" % (type(exc).__name__, exc)
    return certs, None


def certificate_files():
    """(label, path) of every certificate file of the corpus."""
    files = []
    for directory, _, names in os.walk(VECTORS):
        for name in sorted(names):
            path = os.path.join(directory, name)
            label = os.path.relpath(path, VECTORS)
            with open(path, "rb") as handle:
                data = handle.read()
            if any(mark in data for mark in PEM_CERT_LABELS) or (
                    name.endswith((".der", ".crt", ".cer")) and data[:1] == b"\x30"
                    and not any(part in "/" + label for part in NOT_CERTIFICATES)):
                files.append((label, path))
    for path in sorted(glob.glob(os.path.join(SYSTEM_CAS, "*.pem"))):
        files.append((path, os.path.realpath(path)))
    return files


@pytest.fixture(scope="module")
def corpus():
    """[(label, path, certificates or None, why refused)], the same for every run."""
    entries = []
    for label, path in certificate_files():
        with open(path, "rb") as handle:
            data = handle.read()
        if b"-----BEGIN" in data and not any(mark in data for mark in PEM_CERT_LABELS[:2]):
            continue     # only TRUSTED CERTIFICATE blocks: cryptography does not read them
        certs, why = load_with_cryptography(label, data)
        entries.append((label, path, certs, why))
    assert len(entries) > 600, "the corpus shrank: %d files" % len(entries)
    stale = set(DIFFERENT) - {label for label, _, _, _ in entries}
    assert not stale, "DIFFERENT names files that are gone: %s" % sorted(stale)
    return entries


def compare_source(label, source, certs, signature_names):
    """Disagreements between one source of certgrab's JSON and cryptography."""
    problems = []
    if source["error"] is not None:
        return ["%s: certgrab refused what cryptography reads: %s" % (label, source["error"])]
    if len(source["chain"]) != len(certs):
        return ["%s: %d certificates, cryptography %d" % (label, len(source["chain"]),
                                                          len(certs))]
    report_only = DIFFERENT.get(label, "").startswith("report")
    for index, (reported, cert) in enumerate(zip(source["chain"], certs)):
        try:
            expected = expected_fields(cert)
        except Exception:
            expected = expected_fields(cert, with_extensions=False) if report_only else None
        got = normalised(reported, signature_names)
        for field, value in sorted(expected.items()):
            if got.get(field) != value:
                problems.append("%s [%d] %s: certgrab %r, cryptography %r" % (
                    label, index, field, got.get(field), value))
    return problems


def check_refusals(run, corpus):
    """Files cryptography refuses must be certgrab's error, one file at a time: the
    source's error in the JSON, or (for now: a field that fails to decode empties the
    whole report) a one-line message on stderr. Never a traceback."""
    problems, refused = [], 0
    for label, path, certs, why in corpus:
        if certs is None and not DIFFERENT.get(label, "").startswith("report"):
            refused += 1
            error = json_sources(run, [path])
            if isinstance(error, list):
                error = error[0]["error"]
            if error is None:
                problems.append("%s: cryptography refuses (%s); certgrab reports it" % (
                    label, why))
    return problems, refused


def check_agreement(run, corpus, signature_names):
    """Files cryptography reads: every field the same, in batches of files."""
    problems, compared = [], 0
    good = [entry for entry in corpus if entry[2] is not None]
    for start in range(0, len(good), BATCH):
        batch = good[start:start + BATCH]
        sources = json_sources(run, [path for _, path, _, _ in batch])
        if sources is None:     # one refused file empties the whole report: one at a time
            sources = [json_sources(run, [path]) for _, path, _, _ in batch]
            problems += ["%s: certgrab refused what cryptography reads: %s" % (entry[0], error)
                         for entry, error in zip(batch, sources) if isinstance(error, str)]
            batch = [entry for entry, one in zip(batch, sources) if isinstance(one, list)]
            sources = [one[0] for one in sources if isinstance(one, list)]
        for (label, _, certs, _), source in zip(batch, sources):
            problems += compare_source(label, source, certs, signature_names)
            compared += len(certs)
    return problems, compared


def json_sources(run, paths):
    """The sources of certgrab's --json over paths; its stderr if it gave no JSON."""
    rc, out, err = run(paths)
    assert "Traceback" not in err, err
    assert rc in (0, 3), (paths, rc, err)
    if not out:
        assert rc != 0 and err.startswith("certgrab: "), (rc, err)
        return None if len(paths) > 1 else err.strip()
    sources = json.loads(out)
    assert [s["source"] for s in sources] == list(paths)
    return sources


@pytest.fixture(scope="module")
def signature_names(certgrab):
    return certgrab.OID_SIGNATURES


def test_every_field_agrees_with_cryptography(certgrab, capsys, corpus, signature_names):
    def run(paths):
        return call_main(certgrab, capsys, "--json", *paths)
    problems, compared = check_agreement(run, corpus, signature_names)
    refusals, refused = check_refusals(run, corpus)
    print("%d certificates compared, %d files refused by both" % (compared, refused))
    assert compared > 600
    assert not problems + refusals, "\n".join(problems + refusals)


@pytest.mark.slow
@pytest.mark.parametrize("minor", OLD_AND_NEW, ids=lambda minor: "py3.%d" % minor)
def test_oldest_and_newest_python_agree_too(minor, corpus, signature_names):
    python = interpreter(minor)

    def run(paths):
        done = subprocess.run([python, CERTGRAB, "--json"] + list(paths),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        return done.returncode, done.stdout.decode("ascii"), done.stderr.decode()
    problems, compared = check_agreement(run, corpus, signature_names)
    refusals, _ = check_refusals(run, corpus)
    assert compared > 600
    assert not problems + refusals, "\n".join(problems + refusals)
