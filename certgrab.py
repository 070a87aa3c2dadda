#!/usr/bin/env python3
"""certgrab: fetch the TLS certificate chain a server presents, verify it, write it.

One machine of a fleet renews the certificate; every other machine runs certgrab
from cron, dials that machine (usually by IP address), performs a TLS handshake
with SNI set to the domain, verifies what it was given and writes the chain out.
No SSH, no shared storage: certificates are public, the key was copied once.

Synopsis
    certgrab.py 203.0.113.7 -n www.example.com > fullchain.pem
    certgrab.py [2001:db8::7]:8443 -n www.example.com --out-dir /etc/ssl/example
    certgrab.py 203.0.113.7 198.51.100.9 -n www.example.com --key-path /etc/ssl/ex.key \\
        --out-dir /etc/ssl/example --deploy-hook 'systemctl reload nginx' -q

Runs on CPython 3.6 to 3.13 with the standard library only, including Debian's
python3-minimal (no json, shutil, ctypes; no CA store: pass --cafile there).
Code that a plain fetch never runs (certificate fields beyond the names,
STARTTLS, keys, files, reports, several sources, failure hints, --help, the
readers of Python 3.6-3.9) sits in raw strings marked "Lazy", compiled on
first use: Python compiles a script anew on every run, and that is most of
what certgrab costs (load_section).

Pipeline
    SOURCE ... --parse--> host, port, name --TCP--> socket --TLS, SNI=name--> handshake
                                                                                 |
        one thread per source, one deadline (--timeout) per source               v
    served chain (DER, as sent) <------ read per Python version (chain_method) --+
        |
        +--> gate: verified, key matches --key-path, leaf covers the name, in date
        +--> newest passing leaf (notBefore) of all sources
        +--> stdout: the chain exactly as served (PEM, leaf first), or
        +--> files, under a lock on their directory: not older than installed,
             only what changed, temp file + fsync + rename --> --deploy-hook

Security model
    - Verification is on by default: the chain must lead to a trusted root (the
      system store, or --cafile/--capath) and the leaf must cover --servername
      (or the IP address dialled). --insecure turns this off and says so.
    - Before files are written the leaf must also match --key-path, cover the
      name (even with --insecure), be within its dates and not be older than the
      installed leaf (--force overrides only that last check).
    - Nothing is written unless every step before it succeeded; a file is either
      the old version or the new one, never half of each. New certificate files
      get mode 0644 (--mode), the combined file with the key 0600; an existing
      file keeps its mode and owner; nothing is ever group- or world-writable.
    - The private key is read only to compare its public half and is copied only
      into --combined-path. It is never printed.
    - The deploy hook gets its context in environment variables, never by
      formatting certificate text into a command line.
    - Everything read from the network is bounded in size and time, and parsed by
      the small DER reader below before it is trusted with anything: a plain
      fetch checks each certificate's structure and its names; every other run
      decodes every field of every certificate while fetching.

Exit codes
    0  success: chain verified and written, or files already up to date
    2  usage error: bad option, SOURCE, port, --cafile, --key-path
    3  cannot fetch: connection refused/timed out, not TLS, TLS failure
    4  verification failed: unknown issuer, expired, name mismatch
    5  cannot write an output file (the previous files are unchanged)
    6  refused by a safety check: key mismatch, name, dates, not newer
    7  the deploy hook failed or timed out (the next run retries it)
    With --check, --same or --expect-file, a monitoring plugin's codes instead:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (e.g. a usage error).
"""

__version__ = "0.1.0"

import binascii
import os
import socket
import ssl
import sys
import time


# ---------------------------------------------------------------------------
# Compatibility: every probe of the running Python lives here.
# ---------------------------------------------------------------------------

def chain_method():
    """Name the way this Python reveals the chain the server sent.

    3.13+      SSLSocket.get_unverified_chain()            (public API)
    3.10-3.12  SSLSocket._sslobj.get_unverified_chain()    (private, same code)
    3.8-3.9    SSLContext._msg_callback sees the Certificate handshake message
    3.6-3.7    ctypes: SSL_get_peer_cert_chain() on the SSL* inside _ssl
    """
    if hasattr(ssl.SSLSocket, "get_unverified_chain"):
        return "get_unverified_chain"
    if hasattr(ssl._ssl._SSLSocket, "get_unverified_chain"):
        return "_sslobj.get_unverified_chain"
    if hasattr(ssl.SSLContext, "_msg_callback"):
        return "msg_callback"
    return "ctypes"


def limit_to_tls12(ctx):
    if hasattr(ctx, "maximum_version"):                       # 3.7+
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.options |= getattr(ssl, "OP_NO_TLSv1_3", 0x20000000)


def load_section(section):
    """Compile one lazy section of this file into the module, once.

    "python3 certgrab.py" compiles the whole file on every run (no .pyc is kept
    for a script), at about 1.5 ms per 100 lines: more than the rest of a
    fetch's own work. Code that a plain fetch never needs therefore sits in raw
    strings marked "Lazy", compiled only when a run needs it. It is ordinary
    Python; tracebacks give this file's lines, and make lint compiles it.
    """
    line, name, source = section
    if name not in globals():
        exec(compile("\n" * (line - 1) + source, __file__, "exec"), globals())


HAS_VERIFIED_CHAIN = hasattr(ssl._ssl._SSLSocket, "get_verified_chain")  # 3.10+
# Python 3.6 reports every verification failure as a plain SSLError.
VERIFY_FAILED_REASON = "CERTIFICATE_VERIFY_FAILED"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_PORT = 443
DEFAULT_TIMEOUT = 10.0  # seconds; one deadline per source: DNS, connect and handshake
MAX_CHAIN = 20          # certificates; real chains have 2 to 5, more is hostile
MAX_PARALLEL = 32       # sources fetched at once by default (--parallel)
PROGRESS_FROM = 8       # sources; from this many on, a terminal sees progress
WARN_DAYS, CRIT_DAYS = 21, 7  # --check: days left before WARNING and CRITICAL
NEW_FILE_MODE = 0o644   # certificates are public; never group- or world-writable
DIR_MODE = 0o755        # for a missing output directory
TEMP_MARK = ".certgrab-tmp-"  # in the names of temporary files beside the outputs
HOOK_TIMEOUT = 300.0    # seconds a --deploy-hook may run before it is killed
HOOK_PENDING_MTIME = 1  # mtime (1970-01-01T00:00:01Z) of files whose hook has not yet run
LOCK_POLL = 0.05        # seconds between tries for a directory lock another run holds
LOCK_SLACK = 30.0       # seconds, beyond that run's own timeouts, before giving up on it
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")

OUT_DIR_FILES = ("cert.pem", "chain.pem", "fullchain.pem")  # certbot's names


# ---------------------------------------------------------------------------
# Errors: library code raises these; only main() turns them into exit codes.
# ---------------------------------------------------------------------------

class CertgrabError(Exception):
    """An expected failure: printed as one line, exits with exit_code."""
    exit_code = 1

    def __init__(self, message, hint=None):
        Exception.__init__(self, message)
        self.hint = hint


class UsageError(CertgrabError):
    exit_code = 2


class FetchError(CertgrabError):
    exit_code = 3


class ParseError(FetchError):
    """Malformed data, almost always from the network."""


class VerifyError(CertgrabError):
    exit_code = 4


class WriteError(CertgrabError):
    exit_code = 5


class RefusedError(CertgrabError):
    """A safety check refused the chain: wrong key, name, validity, or older."""
    exit_code = 6


class HookError(CertgrabError):
    exit_code = 7


# ---------------------------------------------------------------------------
# Certificates: a small DER reader for X.509, PEM in and out.
# ---------------------------------------------------------------------------

DER_INTEGER, DER_BIT_STRING, DER_OCTET_STRING, DER_OID = 0x02, 0x03, 0x04, 0x06
DER_SEQUENCE, DER_SET = 0x30, 0x31
DER_VERSION, DER_EXTENSIONS = 0xA0, 0xA3          # [0] and [3] in TBSCertificate
OID_SKI_DER, OID_AKI_DER = b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x23"  # 2.5.29.14, .35


class Certificate(object):
    """One X.509 certificate, as parse_certificate found it.

    Parsing checks the whole DER structure down to the extensions and reads
    what the chain order needs: both names as DER and the key identifiers.
    The other fields are decoded on first use, by the lazy Details section:
    subject and issuer (text like "C=US, O=Example, CN=R1"), serial,
    not_before and not_after (epoch seconds, UTC), dns_names, ip_addresses,
    key_type, key_bits, spki (DER), signature_algorithm and is_ca, and the
    helpers serial_hex, sans, sha256, spki_sha256, covers() and describe().
    A plain fetch to stdout never reads them; every other run decodes each
    certificate whole while fetching (decode_chain), so a malformed field is
    that source's error.
    """

    def __init__(self, der, outer, tbs):
        self.der, self.outer, self.tbs = der, outer, tbs   # DER, and its (tag, ...) items
        self.issuer_der, self.subject_der = _element(der, tbs[2]), _element(der, tbs[4])
        self.ski = self.aki = None             # key identifiers, bytes or None

    def __getattr__(self, name):
        """Only for attributes not found: the details, decoded once, here."""
        if name.startswith("_") or "subject" in self.__dict__:
            raise AttributeError(name)
        load_section(DETAILS_SECTION)
        decode_details(self)
        return getattr(self, name)

    @property
    def self_issued(self):
        return self.subject_der == self.issuer_der

    def issued(self, other):
        """True if this certificate's subject (and key id) names other's issuer."""
        if self.subject_der != other.issuer_der:
            return False
        return self.ski is None or other.aki is None or self.ski == other.aki


def _tlv(data, pos, end):
    """Read one DER element at pos: (tag, value_start, value_end, element_start)."""
    element_start = pos
    if end - pos < 2:
        raise ParseError("malformed certificate: truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if tag & 0x1F == 0x1F:
        raise ParseError("malformed certificate: multi-byte DER tag")
    length = first
    if first & 0x80:
        count = first & 0x7F
        if not 1 <= count <= 4 or end - pos < count:
            raise ParseError("malformed certificate: bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if length > end - pos:
        raise ParseError("malformed certificate: DER element overruns its container")
    return tag, pos, pos + length, element_start


def _children(data, item, tag, minimum=0):
    """The elements inside a constructed element, which must have this tag."""
    if item[0] != tag:
        raise ParseError("malformed certificate: DER tag 0x%02x where 0x%02x belongs"
                         % (item[0], tag))
    items, pos, end = [], item[1], item[2]
    while pos < end:
        element = _tlv(data, pos, end)
        items.append(element)
        pos = element[2]
    if len(items) < minimum:
        raise ParseError("malformed certificate: DER sequence too short")
    return items


def _wrapped(data, item, tag):
    """The single element held inside an OCTET STRING or BIT STRING."""
    start = item[1] + (1 if item[0] == DER_BIT_STRING else 0)
    if item[0] != tag or start > item[2]:
        raise ParseError("malformed certificate: unexpected DER tag 0x%02x" % item[0])
    inner = _tlv(data, start, item[2])
    if inner[2] != item[2]:
        raise ParseError("malformed certificate: trailing bytes in DER")
    return inner


def _element(data, item):
    """The whole encoding of an element, header included."""
    return data[item[3]:item[2]]


def extensions(cert):
    """(OID as DER, value element) for each extension, in order."""
    der = cert.der
    for item in cert.tbs[6:]:
        if item[0] == DER_EXTENSIONS:
            for extension in _children(der, _children(der, item, DER_EXTENSIONS, 1)[0],
                                       DER_SEQUENCE):
                fields = _children(der, extension, DER_SEQUENCE, 2)
                if fields[0][0] != DER_OID:
                    raise ParseError("malformed certificate: bad extension")
                yield _element(der, fields[0]), fields[-1]


def parse_certificate(der):
    """Check one DER certificate and read its names and key ids (the rest is
    decoded on first use: see Certificate); raise ParseError if malformed."""
    der = bytes(der)
    top = _tlv(der, 0, len(der))
    if top[2] != len(der):
        raise ParseError("malformed certificate: trailing bytes after the certificate")
    outer = _children(der, top, DER_SEQUENCE, 3)
    tbs = _children(der, outer[0], DER_SEQUENCE, 6)
    if tbs[0][0] == DER_VERSION:
        tbs = tbs[1:]
    if len(tbs) < 6 or tbs[0][0] != DER_INTEGER or any(t[0] != DER_SEQUENCE for t in tbs[1:6]):
        raise ParseError("malformed certificate: bad TBSCertificate")
    cert = Certificate(der, outer, tbs)
    for oid, value in extensions(cert):
        if oid == OID_SKI_DER:
            inner = _wrapped(der, value, DER_OCTET_STRING)
            cert.ski = der[inner[1]:inner[2]]
        elif oid == OID_AKI_DER:
            for field in _children(der, _wrapped(der, value, DER_OCTET_STRING), DER_SEQUENCE):
                if field[0] == 0x80:
                    cert.aki = der[field[1]:field[2]]
    return cert


def der_to_pem(der):
    return ssl.DER_cert_to_PEM_cert(der)


def format_time(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def printable(text):
    """Text from a certificate, safe for a terminal: control characters (and the
    backslash, so that an escape cannot be faked) written as escapes."""
    return "".join(c if c.isprintable() and c != "\\" else "\\x%02x" % ord(c) if ord(c) < 256
                   else "\\u%04x" % ord(c) for c in text)


def clean_path(certs):
    """The issuing path that starts at the leaf: (path, problems).

    The path runs leaf, then each certificate that issued the one before, and
    stops before a self-issued root (the trust store supplies the root). The
    problems say how the served list differed from that: order, root, extras.
    """
    path, rest, problems = [certs[0]], list(certs[1:]), []
    while not path[-1].self_issued:
        issuer = next((c for c in rest if c.issued(path[-1])), None)
        if issuer is None:
            break
        rest.remove(issuer)
        path.append(issuer)
    if [c.der for c in path] != [c.der for c in certs[:len(path)]]:
        problems.append("the chain was served out of order")
    if len(path) > 1 and path[-1].self_issued:
        problems.append("the root certificate (%s) was included" % printable(path[-1].subject))
        path.pop()
    if rest:
        problems.append("%d unrelated or duplicate certificate(s) were included: %s" % (
            len(rest), "; ".join(printable(c.subject) for c in rest)))
    return path, problems


# Lazy (see load_section): the fields of a certificate beyond its names (see
# Certificate), and PEM in. A plain fetch to stdout never reads them.
DETAILS_SECTION = sys._getframe().f_lineno, "decode_details", r'''
SAN_DNS, SAN_IP = 0x82, 0x87                      # GeneralName [2] and [7]

OID_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
    "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.5": "serialNumber",
    "1.2.840.113549.1.9.1": "emailAddress", "0.9.2342.19200300.100.1.25": "DC",
}
OID_RSA, OID_EC = "1.2.840.113549.1.1.1", "1.2.840.10045.2.1"
OID_CURVES = {"1.2.840.10045.3.1.7": ("P-256", 256), "1.3.132.0.34": ("P-384", 384),
              "1.3.132.0.35": ("P-521", 521)}
OID_EDWARDS = {"1.3.101.112": ("Ed25519", 256), "1.3.101.113": ("Ed448", 456)}
OID_SIGNATURES = {
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.2.840.113549.1.1.10": "RSASSA-PSS",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256", "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512", "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448",
}
OID_SAN_DER, OID_BASIC_CONSTRAINTS_DER = b"\x06\x03\x55\x1d\x11", b"\x06\x03\x55\x1d\x13"


def _oid(data, item):
    if item[0] != DER_OID or item[1] == item[2]:
        raise ParseError("malformed certificate: bad object identifier")
    arcs, value = [], 0
    for byte in data[item[1]:item[2]]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if data[item[2] - 1] & 0x80:
        raise ParseError("malformed certificate: truncated object identifier")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


def _string(data, item):
    raw = data[item[1]:item[2]]
    codec = {0x1E: "utf-16-be", 0x1C: "utf-32-be", 0x14: "latin-1"}.get(item[0], "utf-8")
    return raw.decode(codec, "replace")


def _name(data, item):
    """A Name as "C=US, O=Org, CN=name", in the order it is encoded."""
    parts = []
    for rdn in _children(data, item, DER_SEQUENCE):
        for attribute in _children(data, rdn, DER_SET, 1):
            oid, value = _children(data, attribute, DER_SEQUENCE, 2)[:2]
            oid = _oid(data, oid)
            parts.append("%s=%s" % (OID_NAMES.get(oid, oid), _string(data, value)))
    return ", ".join(parts)


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (no calendar import)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _time(data, item):
    """UTCTime or GeneralizedTime (as RFC 5280 requires them) to epoch seconds."""
    text = data[item[1]:item[2]]
    if item[0] == 0x17 and len(text) == 13:
        year, rest = int(text[:2]) if text[:2].isdigit() else -1, text[2:12]
        year += 2000 if 0 <= year < 50 else 1900
    elif item[0] == 0x18 and len(text) == 15:
        year, rest = int(text[:4]) if text[:4].isdigit() else -1, text[4:14]
    else:
        raise ParseError("malformed certificate: bad validity time")
    if year < 0 or not rest.isdigit() or text[-1:] != b"Z":
        raise ParseError("malformed certificate: bad validity time")
    month, day, hour, minute, second = (int(rest[i:i + 2]) for i in range(0, 10, 2))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ParseError("malformed certificate: bad validity time")
    return (_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)


def _public_key(cert, data, item):
    cert.spki = _element(data, item)
    algorithm, key = _children(data, item, DER_SEQUENCE, 2)[:2]
    algorithm = _children(data, algorithm, DER_SEQUENCE, 1)
    oid = _oid(data, algorithm[0])
    if oid == OID_RSA:
        modulus = _children(data, _wrapped(data, key, DER_BIT_STRING), DER_SEQUENCE, 2)[0]
        cert.key_type = "RSA"
        cert.key_bits = int.from_bytes(data[modulus[1]:modulus[2]], "big").bit_length()
    elif oid == OID_EC and len(algorithm) > 1 and algorithm[1][0] == DER_OID:
        curve = _oid(data, algorithm[1])
        name, cert.key_bits = OID_CURVES.get(curve, (curve, 0))
        cert.key_type = "EC " + name
    elif oid in OID_EDWARDS:
        cert.key_type, cert.key_bits = OID_EDWARDS[oid]
    else:
        cert.key_type = oid


def _extension(cert, data, oid, value):
    if oid == OID_SAN_DER:
        for name in _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE):
            raw = data[name[1]:name[2]]
            if name[0] == SAN_DNS:
                cert.dns_names.append(raw.decode("ascii", "replace"))
            elif name[0] == SAN_IP and len(raw) in (4, 16):
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                cert.ip_addresses.append(socket.inet_ntop(family, raw))
    elif oid == OID_BASIC_CONSTRAINTS_DER:
        fields = _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE)
        cert.is_ca = bool(fields) and fields[0][0] == 0x01 and data[fields[0][1]:fields[0][2]] != b"\0"


def pem_to_ders(text):
    """Every CERTIFICATE block of a PEM text, decoded; other blocks are ignored."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    ders, pos = [], 0
    while True:
        start = text.find(begin, pos)
        if start < 0:
            return ders
        stop = text.find(end, start)
        if stop < 0:
            raise ParseError("malformed PEM: BEGIN CERTIFICATE without END")
        try:
            ders.append(binascii.a2b_base64(text[start + len(begin):stop].strip()))
        except (binascii.Error, ValueError):
            raise ParseError("malformed PEM: bad base64 in a certificate")
        pos = stop + len(end)


class DecodedFields(object):
    """The fields of one certificate while they are decoded: all or none are kept."""


def decode_details(cert):
    """Decode the fields parse_certificate left for later (see Certificate);
    ParseError if one is malformed, and then the certificate keeps none."""
    if "subject" in vars(cert):
        return cert
    der, tbs, fields = cert.der, cert.tbs, DecodedFields()
    fields.dns_names, fields.ip_addresses = [], []
    fields.key_type, fields.key_bits, fields.is_ca = "unknown", 0, False
    fields.serial = int.from_bytes(der[tbs[0][1]:tbs[0][2]], "big")
    algorithm = _oid(der, _children(der, cert.outer[1], DER_SEQUENCE, 1)[0])
    fields.signature_algorithm = OID_SIGNATURES.get(algorithm, algorithm)
    fields.issuer, fields.subject = _name(der, tbs[2]), _name(der, tbs[4])
    times = _children(der, tbs[3], DER_SEQUENCE, 2)
    fields.not_before, fields.not_after = _time(der, times[0]), _time(der, times[1])
    _public_key(fields, der, tbs[5])
    for oid, value in extensions(cert):
        _extension(fields, der, oid, value)
    cert.__dict__.update(vars(fields))
    return cert


def decode_chain(result):
    """Runs other than a plain fetch read the fields: decode every certificate now,
    so that a malformed one is this source's error."""
    for cert in result.served + result.verified:
        decode_details(cert)


class CertificateHelpers(object):
    """Added to Certificate when this section loads."""

    @property
    def serial_hex(self):
        text = "%x" % self.serial
        return "0" * (len(text) % 2) + text

    @property
    def sans(self):
        return self.dns_names + self.ip_addresses

    @property
    def sha256(self):
        import hashlib
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self):
        import hashlib
        return hashlib.sha256(self.spki).hexdigest()

    def covers(self, name):
        """True if a subjectAltName matches name (a DNS name or an IP address)."""
        if is_ip(name):
            return any(same_ip(name, address) for address in self.ip_addresses)
        name = ascii_host(name).lower()
        for pattern in (p.lower().rstrip(".") for p in self.dns_names):
            if pattern == name or pattern.startswith("*.") and "." in name \
                    and name.split(".", 1)[1] == pattern[2:]:
                return True
        return False

    def describe(self):
        return "serial %s issued %s, expires %s" % (
            self.serial_hex, format_time(self.not_before), format_time(self.not_after))


for helper in ("serial_hex", "sans", "sha256", "spki_sha256", "covers", "describe"):
    setattr(Certificate, helper, vars(CertificateHelpers)[helper])
'''


# Lazy (see load_section): only runs with --key-path need this.
KEYS_SECTION = sys._getframe().f_lineno, "read_private_key", r'''
class PrivateKey(object):
    """--key-path: the PEM as read, and its public key where certgrab can derive it.

    Unencrypted RSA and EC keys (PKCS#1, SEC 1, PKCS#8) are read here, so a
    mismatch can name both fingerprints and the key type is known before any
    handshake. Encrypted and other keys are matched by OpenSSL instead.
    """

    def __init__(self, path, pem, password):
        self.path, self.pem, self.password = path, pem, password
        self.kind, self.spki = None, None          # "RSA" or "EC"; SPKI DER
        self.encrypted = False

    @property
    def spki_sha256(self):
        import hashlib
        return hashlib.sha256(self.spki).hexdigest() if self.spki else None


def read_private_key(path, password_path):
    """Read --key-path (and --key-password-file); never prompts for a password."""
    pem = read_small_file(path, "--key-path")
    password = None
    if password_path:
        password = read_small_file(password_path, "--key-password-file").splitlines()[:1]
        password = password[0] if password else b""
    key = PrivateKey(path, pem, password)
    lines = pem.decode("ascii", "replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("-----BEGIN ")
                  and line.endswith("PRIVATE KEY-----")), None)
    if start is None:
        raise UsageError("--key-path %s: no PEM private key in it" % path)
    label, body = lines[start][11:-5], []
    for line in lines[start + 1:]:
        if line.startswith("-----END"):
            break
        body.append(line)
    if "ENCRYPTED" in label or any(line.startswith("Proc-Type:") for line in body):
        if password is None:
            raise UsageError("--key-path %s is encrypted" % path,
                             hint="pass --key-password-file FILE (certgrab never prompts)")
        key.encrypted = True
        return key
    try:
        der = binascii.a2b_base64("".join(line for line in body if ":" not in line))
        key.kind, key.spki = _key_public_info(label, der)
    except (ParseError, binascii.Error, ValueError):
        raise UsageError("--key-path %s: malformed private key" % path)
    return key


def read_small_file(path, what, limit=1 << 20):
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UsageError("cannot read %s %s: %s" % (what, path, exc.strerror or exc))
    if len(data) > limit:
        raise UsageError("%s %s: larger than %d bytes" % (what, path, limit))
    return data


RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")   # rsaEncryption, NULL
EC_ALGORITHM_OID = bytes.fromhex("06072a8648ce3d0201")            # id-ecPublicKey


def _der(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _key_public_info(label, der):
    """(kind, SubjectPublicKeyInfo DER) of an unencrypted key; (None, None) if unknown."""
    top = _tlv(der, 0, len(der))
    if label == "RSA PRIVATE KEY":
        return "RSA", _rsa_spki(der, top)
    if label == "EC PRIVATE KEY":
        return "EC", _ec_spki(der, top, None)
    fields = _children(der, top, DER_SEQUENCE, 3)               # PKCS#8
    algorithm = _children(der, fields[1], DER_SEQUENCE, 1)
    inner = _wrapped(der, fields[2], DER_OCTET_STRING)
    oid = _oid(der, algorithm[0])
    if oid == OID_RSA:
        return "RSA", _rsa_spki(der, inner)
    if oid == OID_EC and len(algorithm) > 1:
        return "EC", _ec_spki(der, inner, _element(der, algorithm[1]))
    return None, None


def _rsa_spki(der, item):
    fields = _children(der, item, DER_SEQUENCE, 3)              # version, n, e, ...
    public = _der(DER_SEQUENCE, _element(der, fields[1]) + _element(der, fields[2]))
    return _der(DER_SEQUENCE, RSA_ALGORITHM + _der(DER_BIT_STRING, b"\0" + public))


def _ec_spki(der, item, curve):
    point = None
    for field in _children(der, item, DER_SEQUENCE, 2)[2:]:   # [0] curve, [1] public key
        inner = _tlv(der, field[1], field[2])
        if field[0] == 0xA0:
            curve = curve or _element(der, inner)
        elif field[0] == 0xA1 and inner[0] == DER_BIT_STRING:
            point = der[inner[1]:inner[2]]
    if curve is None or point is None:
        return None                                           # OpenSSL will decide
    algorithm = _der(DER_SEQUENCE, EC_ALGORITHM_OID + curve)
    return _der(DER_SEQUENCE, algorithm + _der(DER_BIT_STRING, point))


def key_matches(key, leaf):
    """True if the private key belongs to the leaf; OpenSSL decides when certgrab cannot."""
    if key.spki is not None:
        return key.spki == leaf.spki
    temp = write_temp_file(os.environ.get("TMPDIR") or "/tmp", "leaf.pem",
                           der_to_pem(leaf.der).encode("ascii"))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            temp, key.path, password=key.password or b"")
        return True
    except ssl.SSLError as exc:
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            return False
        raise UsageError("cannot use --key-path %s: %s" % (key.path, ssl_reason(exc)),
                         hint="is --key-password-file the key's password?")
    finally:
        remove_quietly(temp)


def refetch_for_key(result, reader, opts):
    """The server sent the certificate for the other key type than --key-path
    (a dual-certificate server): ask again, offering only that type's suites."""
    wanted = _wanted_key_kind(result, opts.key)
    if wanted and wanted in reader.by_key_kind:
        retry = _fetch_once(result.target, reader.by_key_kind[wanted], opts)
        if retry.error is None:
            retry.note = "asked again for the %s certificate, matching --key-path" % wanted
            return retry
    return result


def _wanted_key_kind(result, key):
    if key is None or result.error is not None:
        return None
    served = result.leaf.key_type.split()[0]
    if key.kind:
        return key.kind if served != key.kind else None
    if served in ("RSA", "EC") and not key_matches(key, result.leaf):
        return "EC" if served == "RSA" else "RSA"
    return None
'''


# ---------------------------------------------------------------------------
# Connecting: SOURCE to address, TCP within the deadline.
# ---------------------------------------------------------------------------

class Target(object):
    """One SOURCE: where to dial, and the name to send (SNI) and verify."""

    def __init__(self, source, host, port, servername, path=None):
        self.source, self.host, self.port = source, host, port
        self.servername = servername          # None: an IP with no -n: no SNI
        self.verify_name = servername or (host or "").split("%")[0]
        # ASCII bytes for getaddrinfo and the handshake: given a str, Python
        # imports the idna codec (with stringprep and unicodedata), 3 ms a run.
        self.host_bytes = ascii_host(host or "").encode("ascii")
        self.name_bytes = ascii_host(self.verify_name).encode("ascii")
        self.path = path                      # a local PEM file (--text, --json, --check)

    def __str__(self):
        return self.source


def is_ip(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%")[0])
            return True
        except (OSError, ValueError):
            pass
    return False


def parse_port(text, what):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError("%s: port must be a number from 1 to 65535, not %r" % (what, text))
    return int(text)


def parse_source(text, default_port):
    """host, host:port, IPv4, [IPv6], [IPv6]:port or a bare IPv6 literal."""
    host, port = text, None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or rest and not rest.startswith(":") or not is_ip(host):
            raise UsageError("bad SOURCE %r: expected [IPv6] or [IPv6]:PORT" % text)
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text and not is_ip(text):
        raise UsageError("bad SOURCE %r: an IPv6 address with a port goes in brackets, "
                         "as [2001:db8::1]:443" % text)
    host = host if is_ip(host) else host.rstrip(".")
    if not is_ip(host):
        check_dns_name(host, "bad SOURCE %r" % text)
    return host, (parse_port(port, "SOURCE %r" % text) if port is not None else default_port)


def same_ip(first, second):
    packed = []
    for text in (first.split("%")[0], second.split("%")[0]):
        try:
            packed.append(socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET,
                                           text))
        except (OSError, ValueError):
            return False
    return packed[0] == packed[1]


def ascii_host(name):
    """The ASCII form of a host name (IDNA for international names); "" if none."""
    for codec in ("ascii", "idna"):
        try:
            return name.encode(codec).decode("ascii")
        except UnicodeError:
            pass
    return ""


def check_dns_name(name, what):
    ascii_name = ascii_host(name)
    if not ascii_name or len(ascii_name) > 253 or not set(ascii_name) <= HOST_CHARS - {"*"} \
            or any(not label or len(label) > 63 or label[0] == "-" or label[-1] == "-"
                   for label in ascii_name.split(".")):
        raise UsageError("%s: not a host name or IP address" % what)


def parse_targets(opts):
    default_port = parse_port(opts.port, "-p/--port") if opts.port else \
        STARTTLS_PORTS[opts.starttls] if opts.starttls else DEFAULT_PORT
    servername = None
    if opts.servername is not None:
        servername = opts.servername.rstrip(".")
        if not is_ip(servername):
            check_dns_name(servername, "bad --servername %r" % opts.servername)
    targets = []
    for source in opts.sources:
        if is_local_file(source):
            if not opts.report:
                raise UsageError("SOURCE %s is a file: local files go with --text, --json or "
                                 "--check" % source)
            targets.append(Target(source, None, None, servername, path=source))
            continue
        if opts.report and ("/" in source or source.endswith((".pem", ".crt", ".cer"))):
            raise UsageError("SOURCE %s: no such file" % source)
        host, port = parse_source(source, default_port)
        name = servername or (None if is_ip(host) else host)
        targets.append(Target(source, host, port, name))
    return targets


def is_local_file(source):
    """A SOURCE naming a PEM file: it exists, and it has a / or a certificate suffix."""
    return ("/" in source or source.endswith((".pem", ".crt", ".cer"))) \
        and os.path.isfile(source)


def remaining(deadline, target, doing):
    """Seconds left before the deadline; a FetchError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out(target, doing)
    return left


def timed_out(target, doing):
    return FetchError("%s: timed out %s" % (target, doing),
                      hint="the server is slow or silent; raise --timeout if it is just slow")


def resolve(target, family, deadline):
    """Addresses for the target; DNS gets the deadline too (it ignores socket timeouts)."""
    if is_ip(target.host):
        return socket.getaddrinfo(target.host_bytes, target.port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)
    import threading
    answer = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(target.host_bytes, target.port, family,
                                             socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(remaining(deadline, target, "resolving %s" % target.host))
    if not answer:
        raise timed_out(target, "resolving %s" % target.host)
    if isinstance(answer[0], OSError):
        raise FetchError("%s: cannot resolve %s: %s" % (target, target.host, answer[0].args[-1]))
    return answer[0]


def open_connection(target, family, deadline):
    """A TCP socket connected to the first address that answers."""
    try:
        addresses = resolve(target, family, deadline)
    except socket.gaierror as exc:
        raise FetchError("%s: cannot use address %s: %s" % (target, target.host, exc.args[-1]))
    failure = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining(deadline, target, "connecting"))
            sock.connect(address)
            return sock
        except socket.timeout:
            sock.close()
            raise timed_out(target, "connecting to %s port %d" % (address[0], address[1]))
        except OSError as exc:
            sock.close()
            failure = exc
    raise FetchError("%s: cannot connect to port %d: %s" % (
        target, target.port, failure.strerror or failure))


# ---------------------------------------------------------------------------
# Connecting: STARTTLS, the plaintext dialogue before the handshake.
# ---------------------------------------------------------------------------

STARTTLS_PORTS = {
    "smtp": 25, "lmtp": 24, "pop3": 110, "imap": 143, "ftp": 21, "xmpp": 5222,
    "xmpp-server": 5269, "irc": 6667, "postgres": 5432, "postgres-direct": 5432,
    "mysql": 3306, "nntp": 119, "sieve": 4190, "ldap": 389,
}


# Lazy (see load_section): only runs with --starttls need this.
STARTTLS_SECTION = sys._getframe().f_lineno, "starttls_dialogue", r'''
MAX_LINE = 8192          # bytes; a reply line longer than this is hostile
MAX_PLAINTEXT = 65536    # bytes a server may send before TLS starts
MAX_REPLY_LINES = 200    # lines in one reply (capability lists are a few dozen)
MYSQL_CLIENT_SSL = 0x0800
MYSQL_CLIENT_FLAGS = 0x0800 | 0x0200 | 0x8000 | 0x0001   # SSL, PROTOCOL_41, SECURE, LONG_PW
POSTGRES_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
LDAP_STARTTLS = bytes.fromhex("301d02010177188016") + b"1.3.6.1.4.1.1466.20037"
XMPP_STREAM = ("<?xml version='1.0'?><stream:stream xmlns='jabber:%s' "
               "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>")


def check_starttls_options(opts):
    """--starttls and --ehlo."""
    if opts.starttls is not None and opts.starttls not in STARTTLS_PORTS:
        raise UsageError("--starttls %s: unknown protocol; known: %s"
                         % (opts.starttls, ", ".join(sorted(STARTTLS_PORTS))))
    if opts.ehlo is not None and not (opts.ehlo.startswith("[") and opts.ehlo.endswith("]")
                                      and is_ip(opts.ehlo[1:-1].replace("IPv6:", ""))):
        check_dns_name(opts.ehlo, "bad --ehlo %r" % opts.ehlo)
    if opts.starttls == "postgres-direct" and not opts.alpn:
        opts.alpn = ["postgresql"]


class Plaintext(object):
    """The plaintext part of a connection: every read bounded in size and time."""

    def __init__(self, sock, target, protocol, deadline):
        self.sock, self.target, self.protocol, self.deadline = sock, target, protocol, deadline
        self.buffer, self.received = b"", 0

    def fail(self, message, reply=None):
        if reply is not None:
            reply = reply if isinstance(reply, str) else " | ".join(reply)
            message += " (reply: %s)" % printable(reply[:300])
        return FetchError("%s: %s: %s" % (self.target, self.protocol, message))

    def refuse(self, reply):
        return self.fail("the server does not offer STARTTLS", reply)

    def refused(self, reply):
        return self.fail("the server refused to start TLS", reply)

    def send(self, data):
        try:
            self.sock.settimeout(remaining(self.deadline, self.target, "sending to the server"))
            self.sock.sendall(data)
        except socket.timeout:
            raise timed_out(self.target, "sending to the %s server" % self.protocol)
        except OSError as exc:
            raise self.fail("cannot send: %s" % (exc.strerror or exc))

    def _fill(self):
        try:
            self.sock.settimeout(remaining(self.deadline, self.target,
                                           "waiting for the %s server" % self.protocol))
            chunk = self.sock.recv(4096)
        except socket.timeout:
            raise timed_out(self.target, "waiting for the %s server" % self.protocol)
        except OSError as exc:
            raise self.fail("connection failed: %s" % (exc.strerror or exc))
        if not chunk:
            raise self.fail("the server closed the connection", self.buffer.decode("latin-1")
                            if self.buffer else None)
        self.received += len(chunk)
        if self.received > MAX_PLAINTEXT:
            raise self.fail("the server sent more than %d bytes before TLS" % MAX_PLAINTEXT)
        self.buffer += chunk

    def line(self):
        """One line, without its CR LF."""
        while b"\n" not in self.buffer[:MAX_LINE + 1]:
            if len(self.buffer) > MAX_LINE:
                raise self.fail("the server sent a line longer than %d bytes" % MAX_LINE)
            self._fill()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def exactly(self, count):
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def until(self, *markers):
        """Bytes up to the end of the first of markers to appear."""
        while True:
            found = [(self.buffer.find(m), m) for m in markers if m in self.buffer]
            if found:
                position, marker = min(found)
                end = position + len(marker)
                data, self.buffer = self.buffer[:end], self.buffer[end:]
                return data
            self._fill()

    def finish(self):
        """Nothing may stay buffered when TLS starts: that is a known injection attack."""
        extra = self.buffer
        if not extra:
            self.sock.settimeout(0)     # with a timeout, Python would wait for data first
            try:
                extra = self.sock.recv(1, socket.MSG_PEEK)
            except OSError:             # BlockingIOError: nothing pending, as it should be
                extra = b""
        if extra:
            raise self.fail("the server sent data after agreeing to start TLS; refusing "
                            "(plaintext injection)")


def as_text(data):
    """Binary bytes from a server, for a message (printable() escapes the rest)."""
    return data.decode("latin-1")


def coded_reply(talk, expected, what):
    """A reply of SMTP, LMTP or FTP: all its lines; the code must be one of expected."""
    lines = []
    while len(lines) < MAX_REPLY_LINES:
        lines.append(talk.line())
        last = lines[-1]
        if len(last) >= 3 and last[:3].isdigit() and last[3:4] in ("", " "):
            if int(last[:3]) not in expected:
                raise what(lines)
            return lines
    raise talk.fail("a reply of more than %d lines" % MAX_REPLY_LINES)


def dot_list(talk):
    """The lines of a POP3 or NNTP multi-line reply up to its "." line."""
    lines = []
    while len(lines) < MAX_REPLY_LINES:
        line = talk.line()
        if line == ".":
            return lines
        lines.append(line)
    raise talk.fail("a list of more than %d lines" % MAX_REPLY_LINES)


def ehlo_name(sock, opts):
    """--ehlo, this host's name when it is a dotted name, else our address literal."""
    if opts.ehlo:
        return opts.ehlo
    name = socket.gethostname()
    if "." in name and set(name) <= HOST_CHARS:
        return name
    address = sock.getsockname()[0]
    return "[IPv6:%s]" % address if ":" in address else "[%s]" % address


def _greeting_failed(talk):
    return lambda reply: talk.fail("unexpected greeting", reply)


def starttls_smtp(talk, opts, hello=b"EHLO"):
    coded_reply(talk, (220,), _greeting_failed(talk))
    talk.send(hello + b" " + ascii_host(ehlo_name(talk.sock, opts)).encode("ascii") + b"\r\n")
    lines = coded_reply(talk, (250,), lambda r: talk.fail("%s refused" % hello.decode(), r))
    if not any(line[4:].strip().upper() == "STARTTLS" for line in lines):
        raise talk.refuse(lines)
    talk.send(b"STARTTLS\r\n")
    coded_reply(talk, (220,), talk.refused)


def starttls_lmtp(talk, opts):
    starttls_smtp(talk, opts, hello=b"LHLO")


def starttls_ftp(talk, opts):
    while coded_reply(talk, (120, 220), _greeting_failed(talk))[-1][:3] == "120":
        pass                            # "ready in a minute" comes before the 220 (RFC 959)
    talk.send(b"AUTH TLS\r\n")
    coded_reply(talk, (234,), talk.refused)


def starttls_pop3(talk, opts):
    greeting = talk.line()
    if not greeting.startswith("+OK"):
        raise talk.fail("unexpected greeting", greeting)
    talk.send(b"CAPA\r\n")
    answer = talk.line()
    capabilities = dot_list(talk) if answer.startswith("+OK") else []
    if answer.startswith("+OK") and "STLS" not in [c.split()[0].upper() for c in capabilities
                                                   if c.split()]:
        raise talk.refuse([answer] + capabilities)
    talk.send(b"STLS\r\n")
    answer = talk.line()
    if not answer.startswith("+OK"):
        raise talk.refused(answer)


def _imap_command(talk, tag, command):
    talk.send(tag + b" " + command + b"\r\n")
    lines = []
    while len(lines) < MAX_REPLY_LINES:
        lines.append(talk.line())
        if lines[-1].startswith(tag.decode() + " "):
            return lines
    raise talk.fail("a reply of more than %d lines" % MAX_REPLY_LINES)


def starttls_imap(talk, opts):
    greeting = talk.line()
    if not greeting.upper().startswith("* OK"):
        raise talk.fail("unexpected greeting", greeting)
    lines = _imap_command(talk, b"c1", b"CAPABILITY")
    if "STARTTLS" not in " ".join(lines[:-1]).upper().split():
        raise talk.refuse(lines)
    lines = _imap_command(talk, b"c2", b"STARTTLS")
    if not lines[-1].upper().startswith("C2 OK"):
        raise talk.refused(lines)


def starttls_sieve(talk, opts):
    lines = []
    while not lines or not lines[-1].upper().startswith(("OK", "NO", "BYE")):
        if len(lines) >= MAX_REPLY_LINES:
            raise talk.fail("a greeting of more than %d lines" % MAX_REPLY_LINES)
        lines.append(talk.line())
    if not lines[-1].upper().startswith("OK") or '"STARTTLS"' not in [
            line.strip().upper() for line in lines]:
        raise talk.refuse(lines)
    talk.send(b"STARTTLS\r\n")
    answer = talk.line()
    if not answer.upper().startswith("OK"):
        raise talk.refused(answer)


def starttls_nntp(talk, opts):
    greeting = talk.line()
    if greeting[:3] not in ("200", "201"):
        raise talk.fail("unexpected greeting", greeting)
    talk.send(b"CAPABILITIES\r\n")
    answer = talk.line()
    capabilities = dot_list(talk) if answer[:3] == "101" else []
    if "STARTTLS" not in [c.strip().upper() for c in capabilities]:
        raise talk.refuse([answer] + capabilities)
    talk.send(b"STARTTLS\r\n")
    answer = talk.line()
    if answer[:3] != "382":
        raise talk.refused(answer)


def starttls_xmpp(talk, opts, kind="client"):
    domain = talk.target.verify_name
    talk.send((XMPP_STREAM % (kind, domain)).encode("utf-8"))
    features = talk.until(b"</stream:features>", b"<stream:features/>", b"</stream:error>",
                          b"</stream:stream>")
    if b"urn:ietf:params:xml:ns:xmpp-tls" not in features or b"<starttls" not in features:
        start = max(features.find(b"<stream:features"), features.find(b"<stream:error"), 0)
        raise talk.refuse(features[start:].decode("utf-8", "replace"))    # the useful part
    talk.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    answer = talk.until(b"<proceed", b"<failure", b"</stream:stream>")
    if not answer.endswith(b"<proceed"):
        raise talk.refused(answer.decode("utf-8", "replace"))
    talk.until(b">")


def starttls_xmpp_server(talk, opts):
    starttls_xmpp(talk, opts, kind="server")


def starttls_irc(talk, opts):
    talk.send(b"STARTTLS\r\n")
    for _ in range(MAX_REPLY_LINES):
        line = talk.line()
        words = line.split()[1:] if line.startswith(":") else line.split()
        command = words[0].upper() if words else ""
        if command == "670":
            return
        if command == "PING":
            talk.send(b"PONG " + " ".join(words[1:]).encode("utf-8") + b"\r\n")
        elif command == "691":
            raise talk.refused(line)
        elif command == "ERROR" or command.isdigit() and command.startswith(("4", "5")):
            raise talk.refuse(line)
    raise talk.fail("no answer to STARTTLS in %d lines" % MAX_REPLY_LINES)


def starttls_postgres(talk, opts):
    talk.send(POSTGRES_SSL_REQUEST)
    answer = talk.exactly(1)
    if answer == b"N":
        raise talk.refuse("N: TLS is off")
    if answer == b"E":                  # an ErrorResponse: a server too old for SSLRequest
        answer += talk.buffer[:200]
    if answer != b"S":
        raise talk.fail("not a PostgreSQL answer to SSLRequest", as_text(answer))


def starttls_mysql(talk, opts):
    header = talk.exactly(4)
    payload = talk.exactly(int.from_bytes(header[:3], "little"))
    if payload[:1] == b"\xff":        # error code, then "#" and a SQL state, or not
        message = payload[9:] if payload[3:4] == b"#" else payload[3:]
        raise talk.fail("the server refused the connection", message.decode("utf-8", "replace"))
    end = payload.find(b"\0", 1)
    if payload[:1] != b"\x0a" or end < 0 or len(payload) < end + 16:
        raise talk.fail("not a MySQL handshake", as_text(payload[:40]))
    capabilities = int.from_bytes(payload[end + 14:end + 16], "little")
    if not capabilities & MYSQL_CLIENT_SSL:
        raise talk.refuse("server %s without CLIENT_SSL" % payload[1:end].decode("latin-1"))
    request = MYSQL_CLIENT_FLAGS.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") \
        + b"\x21" + bytes(23)
    talk.send(len(request).to_bytes(3, "little") + bytes([(header[3] + 1) % 256]) + request)


def starttls_ldap(talk, opts):
    talk.send(LDAP_STARTTLS)
    head = talk.exactly(2)
    size = head[1]
    if size & 0x80:
        count = size & 0x7F
        if not 1 <= count <= 4:
            raise talk.fail("malformed LDAP response", as_text(head))
        extra = talk.exactly(count)
        head, size = head + extra, int.from_bytes(extra, "big")
    if size > MAX_PLAINTEXT:
        raise talk.fail("LDAP response too long")
    message = head + talk.exactly(size)
    try:
        fields = _children(message, _tlv(message, 0, len(message)), DER_SEQUENCE, 2)
        result = _children(message, fields[1], 0x78, 3)
        code = int.from_bytes(message[result[0][1]:result[0][2]], "big")
        text = message[result[2][1]:result[2][2]].decode("utf-8", "replace")
    except ParseError:
        raise talk.fail("malformed LDAP response", as_text(message[:60]))
    if code != 0:
        raise talk.refused("resultCode %d %s" % (code, text))


def starttls_postgres_direct(talk, opts):
    """PostgreSQL 17+ direct TLS: no dialogue, ALPN "postgresql" (see make_context)."""


def starttls_dialogue(sock, target, opts, deadline):
    """Talk the protocol up to the point where the TLS handshake starts."""
    talk = Plaintext(sock, target, opts.starttls, deadline)
    dialogue = globals()["starttls_" + opts.starttls.replace("-", "_")]
    dialogue(talk, opts)
    talk.finish()
'''


# ---------------------------------------------------------------------------
# TLS: trust store, handshake, and the chain the server sent.
# ---------------------------------------------------------------------------

def make_context(opts, key_kind=None):
    """A client context: verifying (the default) or --insecure.

    With key_kind ("RSA" or "EC") it offers only TLS 1.2 cipher suites signed
    by that key type: the way to ask a dual-certificate server for the other
    certificate, since Python cannot restrict TLS 1.3 signature algorithms.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if opts.alpn:
        ctx.set_alpn_protocols(opts.alpn)
    if key_kind:
        ctx.set_ciphers("aECDSA" if key_kind == "EC" else "aRSA")
        limit_to_tls12(ctx)
    if opts.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if opts.cafile or opts.capath:
        if opts.capath and not os.path.isdir(opts.capath):
            raise UsageError("--capath %s: not a directory" % opts.capath)
        try:
            ctx.load_verify_locations(cafile=opts.cafile, capath=opts.capath)
        except ssl.SSLError as exc:
            raise UsageError("cannot load --cafile %s: %s" % (opts.cafile, ssl_reason(exc)))
        except OSError as exc:
            raise UsageError("cannot load --cafile %s: %s" % (opts.cafile, exc.strerror or exc))
        return ctx
    load_system_store(ctx)
    return ctx


def load_system_store(ctx):
    """The system's CA store; the hashed directory first, as it loads lazily."""
    paths = ssl.get_default_verify_paths()
    env_file = os.environ.get(paths.openssl_cafile_env)
    searched = (env_file or paths.openssl_cafile,
                os.environ.get(paths.openssl_capath_env) or paths.openssl_capath)
    if paths.capath and is_hashed_dir(paths.capath):
        ctx.load_verify_locations(capath=paths.capath)
        if env_file and paths.cafile:
            ctx.load_verify_locations(cafile=paths.cafile)
    elif paths.cafile:
        ctx.load_verify_locations(cafile=paths.cafile)
    else:
        raise VerifyError(
            "no trusted CA certificates on this host (looked for %s and %s)" % searched,
            hint="pass --cafile ROOT.pem (the root that issued the chain), "
                 "or install ca-certificates")


def is_hashed_dir(path):
    """True if path holds OpenSSL's hash links (like 4a6481c9.0)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(len(n) == 10 and n[8] == "." and n[9].isdigit() for n in names)


def ssl_reason(exc):
    """An SSLError as text people read: no "[SSL: X]" tag, no _ssl.c line."""
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c:", 1)[0]


class ChainReader(object):
    """The context for every handshake of a run, and the way to read chains.
    Python 3.6 to 3.9 use ChainReaderBefore310 (lazy) instead."""

    def __init__(self, ctx, trust, by_key_kind=None):
        self.ctx, self.trust, self.method = ctx, trust, chain_method()
        self.starttls = None        # set by make_reader: the protocol, for hints
        self.by_key_kind = by_key_kind or {}    # key kind -> ChainReader asking for it

    def served(self, tls):
        """The certificates as the server sent them: list of DER."""
        if self.method == "get_unverified_chain":
            return tls.get_unverified_chain()
        chain = tls._sslobj.get_unverified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verified(self, tls):
        """The path OpenSSL built, as DER."""
        chain = tls._sslobj.get_verified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verify_message(self, tls):
        return None


# Lazy (see load_section): only Python 3.6 to 3.9 need this. They lack
# get_verified_chain; 3.8 and 3.9 read the chain from the Certificate message
# (msg_callback), 3.6 and 3.7 from OpenSSL's own structures (ctypes).
BEFORE_310_SECTION = sys._getframe().f_lineno, "rebuild_verified", r'''
TLS_HANDSHAKE = 22      # TLS content type of handshake records
TLS_CERTIFICATE = 11    # handshake message type of Certificate
TLS13_VERSION = 0x0304


class ChainReaderBefore310(ChainReader):
    """No get_verified_chain: the served chain from the Certificate message
    (3.8, 3.9) or from OpenSSL's own structures (3.6, 3.7)."""

    def __init__(self, ctx, trust, by_key_kind=None):
        ChainReader.__init__(self, ctx, trust, by_key_kind)
        self._messages, self._openssl = [], None
        if self.method == "msg_callback":
            ctx._msg_callback = self._record
        else:
            self._openssl = OpenSSLPeek(ctx)

    def _record(self, conn, direction, version, content_type, msg_type, data):
        if direction == "read" and content_type == TLS_HANDSHAKE and msg_type == TLS_CERTIFICATE:
            self._messages.append((conn, version, data))

    def served(self, tls):
        if self._openssl:
            return self._openssl.peer_chain(tls)
        for conn, version, data in self._messages:
            if conn is tls:
                return parse_certificate_message(data[4:], version == TLS13_VERSION)
        return []

    def verified(self, tls):
        return None             # rebuild_verified finds the path instead

    def verify_message(self, tls):
        return self._openssl.verify_message(tls) if self._openssl else None

    def store_certificates(self):
        return [parse_certificate(der) for der in self.ctx.get_ca_certs(binary_form=True)]


def rebuild_verified(path, reader):
    """Python < 3.10: the cleaned path, extended with issuers from the trust store."""
    chain, store = list(path), reader.store_certificates()
    while not chain[-1].self_issued and len(chain) <= MAX_CHAIN:
        issuer = next((c for c in store if c.issued(chain[-1])), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def parse_certificate_message(body, tls13):
    """The DER certificates of a TLS Certificate handshake message body.

    TLS 1.2: certificate_list<3>, each cert_data<3>.
    TLS 1.3: certificate_request_context<1>, certificate_list<3>, each
    cert_data<3> followed by extensions<2>.
    """
    body, pos, ders = bytes(body), 0, []
    if tls13:
        if not body:
            raise ParseError("malformed Certificate message: empty")
        pos = 1 + body[0]
    list_length, pos = _uint(body, pos, 3), pos + 3
    if pos + list_length != len(body):
        raise ParseError("malformed Certificate message: list length does not match")
    while pos < len(body):
        length, pos = _uint(body, pos, 3), pos + 3
        if length == 0 or pos + length > len(body):
            raise ParseError("malformed Certificate message: bad certificate length")
        ders.append(body[pos:pos + length])
        pos += length
        if tls13:
            pos += 2 + _uint(body, pos, 2)
        if pos > len(body) or len(ders) > MAX_CHAIN:
            raise ParseError("malformed Certificate message: overlong")
    return ders


def _uint(data, pos, size):
    if pos + size > len(data):
        raise ParseError("malformed Certificate message: truncated")
    return int.from_bytes(data[pos:pos + size], "big")


class OpenSSLPeek(object):
    """Python 3.6-3.7 only: reads the peer chain from the SSL* with ctypes.

    The SSL* sits right after PyObject_HEAD and the socket weakref in _ssl's
    PySSLSocket; it is used only if SSL_get_SSL_CTX() on it returns the SSL_CTX*
    inside our own context object, which rules out a wrong guess.
    """

    def __init__(self, ctx):
        try:
            import ctypes
        except ImportError:
            raise FetchError("Python %d.%d can only read the served chain through ctypes, "
                             "which this Python lacks" % sys.version_info[:2],
                             hint="run certgrab with Python 3.8 or newer")
        self.ctypes, self.ctx = ctypes, ctx
        lib = self.lib = ctypes.CDLL(ssl._ssl.__file__)
        pointer, der_out = ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))
        self.sk_num = getattr(lib, "OPENSSL_sk_num", None) or lib.sk_num
        self.sk_value = getattr(lib, "OPENSSL_sk_value", None) or lib.sk_value
        for function, result, arguments in (
                (lib.SSL_get_SSL_CTX, pointer, [pointer]),
                (lib.SSL_get_peer_cert_chain, pointer, [pointer]),
                (lib.SSL_get_verify_result, ctypes.c_long, [pointer]),
                (lib.X509_verify_cert_error_string, ctypes.c_char_p, [ctypes.c_long]),
                (lib.i2d_X509, ctypes.c_int, [pointer, der_out]),
                (self.sk_num, ctypes.c_int, [pointer]),
                (self.sk_value, pointer, [pointer, ctypes.c_int])):
            function.restype, function.argtypes = result, arguments

    def _ssl_pointer(self, tls):
        ctypes = self.ctypes
        sslobj = getattr(tls._sslobj, "_sslobj", tls._sslobj)   # 3.6 wraps it once more
        head, word = object.__basicsize__, ctypes.sizeof(ctypes.c_void_p)
        ssl_ptr = ctypes.c_void_p.from_address(id(sslobj) + head + word).value
        ctx_ptr = ctypes.c_void_p.from_address(id(self.ctx) + head).value
        if not ssl_ptr or not ctx_ptr or self.lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
            raise FetchError("cannot find OpenSSL's connection inside this Python's ssl module",
                             hint="run certgrab with Python 3.8 or newer")
        return ssl_ptr

    def peer_chain(self, tls):
        stack = self.lib.SSL_get_peer_cert_chain(self._ssl_pointer(tls))
        ders = []
        for index in range(min(self.sk_num(stack), MAX_CHAIN + 1) if stack else 0):
            x509 = self.sk_value(stack, index)
            size = self.lib.i2d_X509(x509, None)
            buffer = (self.ctypes.c_ubyte * max(size, 0))()
            cursor = self.ctypes.cast(buffer, self.ctypes.POINTER(self.ctypes.c_ubyte))
            if size <= 0 or self.lib.i2d_X509(x509, self.ctypes.byref(cursor)) != size:
                raise FetchError("OpenSSL could not encode a certificate of the chain")
            ders.append(bytes(buffer))
        return ders

    def verify_message(self, tls):
        code = self.lib.SSL_get_verify_result(self._ssl_pointer(tls))
        return self.lib.X509_verify_cert_error_string(code).decode("ascii", "replace")
'''


class FetchResult(object):
    """What one source gave: the chain, the verdict, or the error."""

    def __init__(self, target):
        self.target, self.error, self.address = target, None, None
        self.served, self.path, self.problems, self.verified = [], [], [], []
        self.tls_version = self.cipher = self.verify_error = self.note = None
        self.elapsed = 0.0

    @property
    def leaf(self):
        return self.path[0] if self.path else None


def fetch_chain(target, reader, opts):
    """Fetch one source; with --key-path, a dual-certificate server may be asked
    again for the certificate of the key's type (refetch_for_key)."""
    result = _fetch_once(target, reader, opts)
    return refetch_for_key(result, reader, opts) if opts.key else result


def _fetch_once(target, reader, opts):
    """Connect, handshake and read the chain; errors are kept in the result."""
    result, started = FetchResult(target), time.monotonic()
    try:
        if target.path:
            read_local_chain(result)
        else:
            _fetch_into(result, reader, opts, started + opts.timeout)
        if opts.details:
            decode_chain(result)
    except CertgrabError as exc:
        result.error = exc
    result.elapsed = time.monotonic() - started
    return result


def _fetch_into(result, reader, opts, deadline):
    target = result.target
    sock = open_connection(target, opts.family, deadline)
    result.address = sock.getpeername()[0]
    if opts.starttls:
        try:
            starttls_dialogue(sock, target, opts, deadline)
        except CertgrabError:
            sock.close()
            raise
    # Python 3.6 checks the name in Python code, which needs a str.
    name = target.name_bytes if sys.version_info >= (3, 7) else target.name_bytes.decode()
    tls = reader.ctx.wrap_socket(sock, server_hostname=name,
                                 do_handshake_on_connect=False)
    try:
        failure = _handshake(tls, reader, target, deadline)
        served = reader.served(tls)
        verified = reader.verified(tls) if failure is None and not opts.insecure else None
        cipher = tls.cipher() or (None, None)        # set even when verification failed
        result.tls_version, result.cipher = tls.version() or cipher[1], cipher[0]
    finally:
        tls.close()
    if not served:
        raise FetchError("%s: could not read the chain the server sent (method: %s)"
                         % (target, reader.method))
    if len(served) > MAX_CHAIN:
        raise FetchError("%s: the server sent more than %d certificates" % (target, MAX_CHAIN))
    result.served = [parse_certificate(der) for der in served]
    result.path, result.problems = clean_path(result.served)
    if failure is not None:
        result.verify_error = failure.reason
        raise failure
    if not opts.insecure:
        check_completeness(result, reader, verified, opts)


def check_completeness(result, reader, verified, opts):
    """Keep the verified path, and say when the server left intermediates out."""
    if verified is not None:
        result.verified = [parse_certificate(der) for der in verified]
    elif opts.verified_chain or len(result.path) == 1:
        result.verified = rebuild_verified(result.path, reader)
    missing = len(result.verified) - len(result.path) - 1
    if missing > 0:
        result.problems.append(
            "the server did not send %d intermediate certificate(s) that verification found "
            "in the trust store; clients that lack them will fail" % missing)


def _handshake(tls, reader, target, deadline):
    """Complete the handshake. A failed verification is returned, not raised,
    so that the chain can still be read from the connection."""
    try:
        tls.settimeout(remaining(deadline, target, "before the TLS handshake"))
        tls.do_handshake()
    except socket.timeout:
        raise timed_out(target, "during the TLS handshake")
    except (ssl.CertificateError, OSError) as exc:      # an SSLError is an OSError
        load_section(FAILURE_SECTION)
        return handshake_failure(exc, tls, reader, target)
    return None


# Lazy (see load_section): only a failed handshake needs this.
FAILURE_SECTION = sys._getframe().f_lineno, "handshake_failure", r'''
def handshake_failure(exc, tls, reader, target):
    """Why the handshake failed: a VerifyError returned, anything else raised."""
    if isinstance(exc, ssl.CertificateError):   # 3.7+: every verify failure; 3.6: name only
        return verify_failure(getattr(exc, "verify_message", None) or str(exc), target,
                              reader.trust)
    if isinstance(exc, ssl.SSLError):
        if exc.reason == VERIFY_FAILED_REASON:    # Python 3.6
            return verify_failure(reader.verify_message(tls) or ssl_reason(exc), target,
                                  reader.trust)
        reason = ssl_reason(exc)
    else:
        reason = exc.strerror or str(exc) or exc.__class__.__name__
    raise FetchError("%s: TLS handshake failed: %s" % (target, reason),
                     hint=tls_hint(reason, reader.starttls))


def verify_failure(message, target, trust):
    failure = VerifyError("%s: certificate verification failed: %s" % (target, message),
                          hint=verify_hint(message, target, trust))
    failure.reason = message
    return failure


def tls_hint(reason, starttls):
    reason = reason.lower()
    if starttls == "postgres-direct":
        return "PostgreSQL before 17 has no direct TLS: try --starttls postgres"
    if "wrong version" in reason or "record layer" in reason or "packet length" in reason \
            or "unknown protocol" in reason or "http request" in reason:
        return "the server did not answer with TLS: is this port plain text (HTTP, or a " \
               "protocol that needs STARTTLS)?"
    if "alert" in reason:
        return "the server refused the handshake; check -n/--servername (the name it serves)"
    if "eof" in reason:
        return "the server closed the connection during the handshake"
    return None


def verify_hint(message, target, trust):
    message = message.lower()
    if "expired" in message or "not yet valid" in message:
        return "check this machine's clock (date -u); if it is right, the server serves a " \
               "stale certificate. --insecure fetches it anyway"
    if "match" in message:
        return "the certificate does not cover %s: pass -n/--servername with a name it " \
               "covers" % target.verify_name
    if trust != "the system store":
        return "the chain does not lead to a root in %s: is it the right root? " \
               "--insecure skips verification" % trust
    return "the chain does not lead to a root this host trusts: pass --cafile ROOT.pem " \
           "(or install ca-certificates); --insecure skips verification"
'''


def fetch_all(targets, reader, opts):
    """Fetch every target, --parallel at a time; results in the order given."""
    if len(targets) == 1:
        return [fetch_chain(targets[0], reader, opts)]
    load_section(FLEET_SECTION)
    return fetch_parallel(targets, reader, opts)


# Lazy (see load_section): only runs with several sources need this.
FLEET_SECTION = sys._getframe().f_lineno, "fetch_parallel", r'''
def choose_newest(results, opts):
    """Several sources: the newest good chain; the other failures warned about."""
    good = [r for r in results if r.error is None]
    if not good:
        worst = max((r.error for r in results), key=lambda error: error.exit_code)
        for result in results:
            if result.error is not worst:
                report_error(result.error)
        raise worst
    for result in results:
        if result.error is not None:
            warn(opts, "%s (skipped)" % result.error)
    return max(good, key=lambda r: r.leaf.not_before)


def check_fleet_options(opts):
    """--parallel, for runs with several sources."""
    try:
        opts.parallel = int(MAX_PARALLEL if opts.parallel is None else opts.parallel)
    except ValueError:
        raise UsageError("--parallel takes a number")
    if not 1 <= opts.parallel <= 1024:
        raise UsageError("--parallel must be from 1 to 1024")


def fetch_parallel(targets, reader, opts):
    """One thread per source, at most --parallel at once; progress on a terminal."""
    import threading
    results, pending, lock = [None] * len(targets), list(range(len(targets))), threading.Lock()
    progress = len(targets) >= PROGRESS_FROM and not opts.quiet and sys.stderr.isatty()

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop(0)
            try:
                results[index] = fetch_chain(targets[index], reader, opts)
            except BaseException as exc:  # a bug: re-raised in the main thread below
                results[index] = exc
            if progress:
                with lock:
                    done = sum(result is not None for result in results)
                    sys.stderr.write("\rcertgrab: %d/%d sources done" % (done, len(targets))
                                     + ("\n" if done == len(targets) else ""))

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(opts.parallel, len(targets)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
'''


def choose_result(results, opts):
    """The newest good chain (latest leaf notBefore); the other failures warned about."""
    if len(results) == 1:
        if results[0].error is not None:
            raise results[0].error
        return results[0]
    return choose_newest(results, opts)


# ---------------------------------------------------------------------------
# Install: output files, written whole or not at all.
# ---------------------------------------------------------------------------

# Lazy (see load_section): only runs that write files or check a key need this.
INSTALL_SECTION = sys._getframe().f_lineno, "install_chain", r'''
def check_install_options(opts):
    """Options of runs that write files or check a key; the rest keep their defaults."""
    for attribute in ("deploy_hook", "owner", "group", "mode", "force", "dry_run"):
        if getattr(opts, attribute) and not opts.writes:
            raise UsageError("%s needs an output file (--out-dir or a --*-path)"
                             % option_flag(attribute))
    for attribute in ("combined_path", "key_password_file"):
        if getattr(opts, attribute) and not opts.key_path:
            raise UsageError("%s needs --key-path" % option_flag(attribute))
    try:
        opts.hook_timeout = float(HOOK_TIMEOUT if opts.hook_timeout is None else opts.hook_timeout)
        opts.mode = int(opts.mode, 8) if opts.mode is not None else None
    except ValueError:
        raise UsageError("--hook-timeout takes seconds and --mode an octal number like 0644")
    if not opts.hook_timeout > 0:
        raise UsageError("--hook-timeout must be above 0")
    if opts.mode is not None and opts.mode & ~0o644:
        raise UsageError("--mode allows at most 0644: certificate files are never "
                         "executable or writable by others")
    opts.uid = lookup_id(opts.owner, "pwd", "getpwnam", "pw_uid", "--owner")
    opts.gid = lookup_id(opts.group, "grp", "getgrnam", "gr_gid", "--group")
    if opts.key_path:
        load_section(KEYS_SECTION)
    opts.key = read_private_key(opts.key_path, opts.key_password_file) if opts.key_path \
        else None
    if opts.combined_path and opts.key.encrypted:
        warn(opts, "--combined-path gets the key encrypted, as it is in --key-path")


def lookup_id(name, module, function, field, flag):
    """A user or group name (or number) to its number; -1 when not given."""
    if name is None:
        return -1
    if name.isdigit():
        return int(name)
    try:
        return getattr(getattr(__import__(module), function)(name), field)
    except (KeyError, ImportError):
        raise UsageError("%s %s: no such %s on this host" % (flag, name, flag[2:]))


def check_gate(result, opts, now):
    """The install gate: the key, the name and the dates; raises RefusedError."""
    leaf, target, key = result.leaf, result.target, opts.key
    if key is not None and not key_matches(key, leaf):
        raise RefusedError("%s: the leaf's key (SPKI sha256 %s) does not match --key-path %s (%s)"
                           % (target, leaf.spki_sha256, key.path, "SPKI sha256 %s" %
                              key.spki_sha256 if key.spki else "encrypted or unusual key"))
    if not leaf.covers(target.verify_name):
        raise RefusedError("%s: the leaf does not cover %s; it covers: %s" % (
            target, target.verify_name,
            printable(", ".join(leaf.dns_names + leaf.ip_addresses)) or "no names"))
    if now < leaf.not_before:
        raise RefusedError("%s: the leaf is not valid before %s" % (
            target, format_time(leaf.not_before)), hint="check this machine's clock (date -u)")
    if now >= leaf.not_after:
        raise RefusedError("%s: the leaf expired at %s" % (target, format_time(leaf.not_after)),
                           hint="the server has not renewed, or this machine's clock is "
                                "wrong (date -u)")


def apply_gate(results, opts):
    now = time.time()
    for result in results:
        if result.error is None:
            try:
                check_gate(result, opts, now)
            except RefusedError as exc:
                result.error = exc


def plan_outputs(opts):
    """(path, kind) for every file asked for, checked before any network I/O."""
    plan = []
    if opts.out_dir:
        plan += [(os.path.join(opts.out_dir, name), name[:-4]) for name in OUT_DIR_FILES]
    for kind in ("cert", "chain", "fullchain", "combined"):
        path = getattr(opts, kind + "_path")
        if path:
            plan.append((path, kind))
    absolute = [os.path.realpath(path) for path, _ in plan]
    if len(set(absolute)) != len(absolute):
        raise UsageError("two outputs name the same file")
    if opts.key_path and os.path.realpath(opts.key_path) in absolute:
        raise UsageError("an output would overwrite the --key-path file %s" % opts.key_path)
    for path, _ in plan:
        check_target(path)
    return plan


def check_target(path):
    if os.path.isdir(path):
        raise WriteError("cannot write %s: it is a directory" % path)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WriteError("cannot write %s: %s is not a directory" % (path, parent))


def render_outputs(plan, chain, key):
    """(path, bytes, holds_key) for each planned file."""
    outputs = []
    for path, kind in plan:
        certs = {"cert": chain[:1], "chain": chain[1:]}.get(kind, chain)
        data = "".join(der_to_pem(cert.der) for cert in certs).encode("ascii")
        outputs.append((path, data + key.pem if kind == "combined" else data,
                        kind == "combined"))
    return outputs


def read_existing(path):
    try:
        with open(path, "rb") as existing:
            return existing.read(1 << 20)
    except OSError:
        return None


def installed_leaf(plan):
    """The leaf in the first existing cert, fullchain or combined file; None if none."""
    for path, kind in plan:
        data = read_existing(path) if kind != "chain" else None
        if data:
            try:
                ders = pem_to_ders(data.decode("ascii", "replace"))
                return parse_certificate(ders[0]) if ders else None
            except ParseError:
                return None
    return None


def check_not_older(best, installed, opts):
    """No downgrade: the offered leaf must be the installed one or issued later."""
    leaf = best.leaf
    if installed is None or installed.der == leaf.der or leaf.not_before > installed.not_before:
        return
    message = "%s offers a leaf (%s) that is not newer than the installed one (%s)" % (
        best.target, leaf.describe(), installed.describe())
    if not opts.force:
        raise RefusedError(message, hint="--force installs it anyway")
    warn(opts, message + "; installing it because of --force")


def lock_directories(directories, wait):
    """Exclusive flock on each output directory itself: no lock files left behind."""
    import fcntl
    fds, deadline = [], time.monotonic() + wait
    try:
        for directory in directories:
            make_directory(directory)
            fds.append(os.open(directory, os.O_RDONLY))
            while True:
                try:
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WriteError("another certgrab run holds %s for too long" % directory)
                    time.sleep(LOCK_POLL)
    except OSError as exc:
        unlock_directories(fds)
        raise WriteError("cannot lock %s: %s" % (directory, exc.strerror or exc))
    except WriteError:
        unlock_directories(fds)
        raise
    return fds


def make_directory(directory):
    try:
        os.makedirs(directory, DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise WriteError("cannot create directory %s: %s" % (directory, exc.strerror or exc))


def unlock_directories(fds):
    for fd in fds:
        os.close(fd)


def remove_stale_temps(plan):
    """Temporary files a killed run left beside the outputs (we hold the lock)."""
    for path, _ in plan:
        directory, prefix = os.path.dirname(os.path.abspath(path)), \
            "." + os.path.basename(path) + TEMP_MARK
        for name in os.listdir(directory):
            if name.startswith(prefix):
                remove_quietly(os.path.join(directory, name))


def install_files(outputs, opts, mark_pending):
    """Write each output that differs from the disk; return the paths written.

    Every new version is staged as a temporary file beside its target and
    fsynced before the first rename, so a failure leaves the old files alone.
    With a deploy hook the new files are dated HOOK_PENDING_MTIME until it ran.
    """
    changed = [output for output in outputs if read_existing(output[0]) != output[1]]
    staged, path = [], None
    try:
        for path, data, holds_key in changed:
            staged.append((stage_file(path, data, holds_key, opts, mark_pending), path))
        for temp, path in staged:
            os.replace(temp, path)
    except OSError as exc:
        for temp, _ in staged:
            remove_quietly(temp)
        raise WriteError("cannot write %s: %s" % (path, exc.strerror or exc),
                         hint="the previous files are unchanged")
    for directory in set(os.path.dirname(os.path.abspath(p)) for p, _, _ in changed):
        sync_directory(directory)
    return [path for path, _, _ in changed]


def stage_file(path, data, holds_key, opts, mark_pending):
    """A fsynced temporary copy of data beside path, with the mode and owner it needs."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    if old is not None:
        mode = old.st_mode & 0o7777
    else:
        mode = 0o600 if holds_key else NEW_FILE_MODE if opts.mode is None else opts.mode
    mode &= 0o640 if holds_key else ~0o022      # never writable by others; key never public
    owner = (old.st_uid, old.st_gid) if old else (opts.uid, opts.gid)
    temp = write_temp_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path),
                           data, mode, owner if os.geteuid() == 0 or not old else None)
    if mark_pending or old is not None and int(old.st_mtime) == HOOK_PENDING_MTIME:
        os.utime(temp, (HOOK_PENDING_MTIME, HOOK_PENDING_MTIME))
    return temp


def write_temp_file(directory, name, data, mode=0o600, owner=None):
    """A new file "." + name + TEMP_MARK + random in directory, written and fsynced."""
    temp = os.path.join(directory, "." + name + TEMP_MARK
                        + binascii.hexlify(os.urandom(6)).decode("ascii"))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None and owner != (-1, -1):
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        remove_quietly(temp)
        raise
    os.close(fd)
    return temp


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_directory(directory):
    """Make the renames durable; some filesystems refuse, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pending_files(plan):
    """Outputs whose deploy hook has not yet succeeded (see install_files)."""
    pending = []
    for path, _ in plan:
        try:
            if int(os.stat(path).st_mtime) == HOOK_PENDING_MTIME:
                pending.append(path)
        except OSError:
            pass
    return pending


def clear_pending(paths):
    """Date the files now: their hook ran."""
    for path in paths:
        try:
            os.utime(path, None)
        except OSError as exc:
            raise WriteError("cannot clear the hook-pending date of %s: %s" % (
                path, exc.strerror or exc), hint="the next run will run the hook again")


def run_deploy_hook(opts, plan, best):
    """--deploy-hook through /bin/sh, context only in the environment (certbot's names)."""
    import subprocess
    leaf = best.leaf
    lineage = opts.out_dir or os.path.dirname(os.path.abspath(plan[0][0]))
    env = dict(os.environ)
    env.update(RENEWED_LINEAGE=os.path.realpath(lineage), CERTGRAB_SOURCE=best.target.source,
               RENEWED_DOMAINS=" ".join(n for n in leaf.dns_names if set(n) <= HOST_CHARS),
               CERTGRAB_FILES=" ".join(os.path.abspath(path) for path, _ in plan),
               CERTGRAB_SHA256=leaf.sha256)
    try:
        hook = subprocess.Popen(["/bin/sh", "-c", opts.deploy_hook], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise HookError("cannot run --deploy-hook: %s" % (exc.strerror or exc))
    try:
        status = hook.wait(timeout=opts.hook_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(hook.pid, 9)
        hook.wait()
        raise HookError("--deploy-hook was killed after --hook-timeout %g s; the next run "
                        "retries it" % opts.hook_timeout)
    if status != 0:
        raise HookError("--deploy-hook failed (%s); the next run retries it" % (
            "exit status %d" % status if status > 0 else "signal %d" % -status))


def install_chain(plan, chain, best, opts):
    """Under the directory locks: no downgrade, write what changed, run the hook."""
    named, plan = plan, [(os.path.realpath(path), kind) for path, kind in plan]  # keep links
    outputs = render_outputs(plan, chain, opts.key)
    if opts.dry_run:
        return dry_run(plan, outputs, best, opts)
    directories = sorted(set(os.path.dirname(os.path.abspath(path)) for path, _ in plan))
    locks = lock_directories(directories, opts.hook_timeout + opts.timeout + LOCK_SLACK)
    try:
        remove_stale_temps(plan)
        check_not_older(best, installed_leaf(plan), opts)
        changed = install_files(outputs, opts, mark_pending=bool(opts.deploy_hook))
        if changed and not opts.key:
            warn(opts, "no --key-path: the leaf was not checked against the private key")
        if changed:
            say(opts, "installed the chain from %s (%s): %s" % (
                best.target, best.leaf.describe(), " ".join(changed)))
        pending = pending_files(plan)
        if pending and opts.deploy_hook:
            run_deploy_hook(opts, named, best)
            clear_pending(pending)
        elif pending:
            warn(opts, "a deploy hook is still pending for %s (dated %s); a run with "
                       "--deploy-hook retries it" % (" ".join(pending),
                                                     format_time(HOOK_PENDING_MTIME)))
        if not changed and not pending:
            info(opts, "files are up to date; nothing written, no hook run")
    finally:
        unlock_directories(locks)


def dry_run(plan, outputs, best, opts):
    check_not_older(best, installed_leaf(plan), opts)
    changed = [path for path, data, _ in outputs if read_existing(path) != data]
    for path in changed:
        directory = os.path.dirname(path)
        while not os.path.exists(directory):
            directory = os.path.dirname(directory)
        if not os.access(directory, os.W_OK):
            raise WriteError("dry run: cannot write %s: %s is not writable" % (path, directory))
    hook = opts.deploy_hook and (changed or pending_files(plan))
    say(opts, "dry run: %s%s" % ("would write " + " ".join(changed) if changed else
                                 "files are up to date", "; would run the deploy hook"
                                 if hook else ""))
'''


# ---------------------------------------------------------------------------
# Reports: stderr lines for people, stdout for the chain.
# ---------------------------------------------------------------------------

def report_error(exc):
    sys.stderr.write("certgrab: %s\n" % exc)
    if exc.hint:
        sys.stderr.write("certgrab: hint: %s\n" % exc.hint)


def warn(opts, message):
    if not opts.quiet:
        sys.stderr.write("certgrab: warning: %s\n" % message)


def say(opts, message):
    if not opts.quiet:
        sys.stderr.write("certgrab: %s\n" % message)


def info(opts, message):
    if opts.verbose:
        sys.stderr.write("certgrab: %s\n" % message)


def report_fetch(results, best, reader, opts, plan):
    """Chain problems of the winner; with -v, how each source went."""
    for problem in best.problems:
        warn(opts, "%s: %s%s" % (best.target, problem, " (files get the issuing path: leaf, "
                                 "intermediates, no root)" if plan else ""))
    for result in results if opts.verbose else ():
        if result.error is None:
            info(opts, "%s (%s): %s %s, %d certificate(s) read with %s, %s, %.0f ms" % (
                result.target, result.address, result.tls_version, result.cipher,
                len(result.served), reader.method,
                "NOT verified (--insecure)" if opts.insecure else "verified",
                result.elapsed * 1000))
            if result.note:
                info(opts, "  " + result.note)
            for index, cert in enumerate(result.served):
                info(opts, "  %d %s (issuer %s) %s to %s" % (
                    index, printable(cert.subject), printable(cert.issuer),
                    format_time(cert.not_before), format_time(cert.not_after)))
    if len(results) > 1:        # with files, the install message names the source
        (info if plan else say)(opts, "using the chain from %s (newest valid leaf, issued %s)"
                                % (best.target, format_time(best.leaf.not_before)))


def wrap_items(items, width):
    """Items joined by ", " in lines of at most width characters."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 2 + len(item) > width:
            lines[-1] += ","
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return lines


def write_stdout(text):
    """Write to stdout; characters its encoding lacks (cron's ASCII) become escapes."""
    try:
        if hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "ascii",
                                                "backslashreplace"))
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        raise WriteError("cannot write to standard output: %s" % (exc.strerror or exc))


# Lazy (see load_section): only --text, --json and --check need this.
REPORT_SECTION = sys._getframe().f_lineno, "report", r'''
def check_report_options(opts):
    """--text, --json, --check (with --same, --expect-file, --warn-days, --crit-days)."""
    opts.check = opts.check or opts.same or bool(opts.expect_file)
    modes = [flag for flag in ("text", "json", "check") if getattr(opts, flag)]
    if len(modes) > 1:
        raise UsageError("--%s and --%s exclude each other" % tuple(modes[:2]))
    opts.report = modes[0] if modes else None
    if opts.report and (opts.writes or opts.key_path or opts.verified_chain):
        raise UsageError("--%s only reports; it cannot go with output files, --key-path or "
                         "--verified-chain" % opts.report)
    try:
        opts.warn_days = float(WARN_DAYS if opts.warn_days is None else opts.warn_days)
        opts.crit_days = float(CRIT_DAYS if opts.crit_days is None else opts.crit_days)
    except ValueError:
        raise UsageError("--warn-days and --crit-days take numbers")


NAGIOS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def read_local_chain(result):
    """A local PEM file as a source: its certificates, in file order."""
    try:
        with open(result.target.path, "rb") as handle:
            text = handle.read(1 << 20).decode("ascii", "replace")
    except OSError as exc:
        raise FetchError("cannot read %s: %s" % (result.target.path, exc.strerror or exc))
    ders = pem_to_ders(text)
    if not ders:
        raise FetchError("%s: no PEM certificate in it" % result.target.path)
    result.served = [parse_certificate(der) for der in ders[:MAX_CHAIN]]
    result.path, result.problems = clean_path(result.served)


def report(results, opts):
    """--text, --json or --check over every result; returns the exit code."""
    now = time.time()
    if opts.report == "check":
        return check_report(results, opts, now)
    if opts.report == "json":
        write_stdout(json_text([source_json(r, opts) for r in results]) + "\n")
    else:
        write_stdout("\n".join(text_lines(r, opts, now) for r in results))
    failures = [r.error for r in results if r.error is not None]
    return max(error.exit_code for error in failures) if failures else 0


def verdict(result, opts):
    if result.target.path:
        return "not verified (a local file)"
    if opts.insecure:
        return "NOT verified (--insecure)"
    return "FAILED: " + result.verify_error if result.verify_error else "OK"


def days_left(cert, now):
    return (cert.not_after - now) / 86400.0


def text_lines(result, opts, now):
    """One source for people: 80 columns, certificate text escaped."""
    target = result.target
    lines = ["%s%s" % (target, " (%s)" % result.address if result.address else "")]
    if not target.path:
        lines.append("  servername:   %s" % (target.servername or "(none: IP address)"))
    if result.error is not None and not result.served:
        return "\n".join(lines + ["  error:        %s" % result.error]) + "\n"
    if result.tls_version:
        lines.append("  protocol:     %s %s%s" % (result.tls_version, result.cipher,
                                                 " after STARTTLS " + opts.starttls
                                                 if opts.starttls else ""))
    lines.append("  verification: %s" % verdict(result, opts))
    lines += ["  warning:      %s" % problem for problem in result.problems]
    for index, cert in enumerate(result.served):
        lines += certificate_lines(index, cert, now)
    return "\n".join(lines) + "\n"


def certificate_lines(index, cert, now):
    left = days_left(cert, now)
    when = "EXPIRED %d days ago" % -left if left < 0 else "expires in %d days" % left
    rows = [("subject", printable(cert.subject)), ("issuer", printable(cert.issuer)),
            ("serial", cert.serial_hex)]
    for number, line in enumerate(wrap_items([printable(n) for n in cert.sans] or ["(none)"],
                                             64)):
        rows.append(("SANs" if number == 0 else "", line))
    rows += [("key", "%s%s" % (cert.key_type, " (%d bits)" % cert.key_bits
                               if cert.key_bits else "")),
             ("sig alg", cert.signature_algorithm),
             ("from", format_time(cert.not_before)),
             ("until", "%s (%s)" % (format_time(cert.not_after), when)),
             ("sha256", cert.sha256), ("spki pin", spki_pin(cert)),
             ("CA", "yes" if cert.is_ca else "no")]
    return ["  [%d] %-8s %s" % (index, rows[0][0], rows[0][1])] + \
        ["      %-8s %s" % row for row in rows[1:]]


def spki_pin(cert):
    """The HPKP-style pin: base64 of the SHA-256 of the SubjectPublicKeyInfo."""
    import hashlib
    return binascii.b2a_base64(hashlib.sha256(cert.spki).digest()).decode("ascii").strip()


def source_json(result, opts):
    target = result.target
    return [
        ("source", target.source), ("address", result.address),
        ("servername", target.servername), ("error", None if result.error is None
                                              else str(result.error)),
        ("tls_version", result.tls_version), ("cipher", result.cipher),
        ("verified", None if target.path or opts.insecure or not result.served else
         result.error is None and result.verify_error is None),
        ("verify_error", result.verify_error), ("problems", result.problems),
        ("chain", [certificate_json(cert) for cert in result.served]),
    ]


def certificate_json(cert):
    return [("subject", cert.subject), ("issuer", cert.issuer), ("serial", cert.serial_hex),
            ("sans", cert.sans), ("key", cert.key_type), ("key_bits", cert.key_bits),
            ("signature_algorithm", cert.signature_algorithm),
            ("not_before", format_time(cert.not_before)),
            ("not_after", format_time(cert.not_after)), ("sha256", cert.sha256),
            ("spki_sha256", cert.spki_sha256), ("spki_pin", spki_pin(cert)),
            ("is_ca", cert.is_ca)]


def json_text(value, indent=""):
    """JSON (RFC 8259) for None, bool, int, str, lists, and objects given as lists of
    pairs; ASCII only. Written here because minimal hosts have no json module."""
    inner = indent + "  "
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"%s"' % "".join(_json_char(c) for c in value)
    if value and isinstance(value[0], tuple):
        return "{\n%s\n%s}" % (",\n".join('%s%s: %s' % (inner, json_text(k), json_text(v, inner))
                                          for k, v in value), indent)
    if value and isinstance(value[0], list):
        return "[\n%s\n%s]" % (",\n".join(inner + json_text(v, inner) for v in value), indent)
    return "[%s]" % ", ".join(json_text(v, inner) for v in value)


def _json_char(char):
    code = ord(char)
    if char in '"\\':
        return "\\" + char
    if 0x20 <= code < 0x7F:
        return char
    if code > 0xFFFF:
        code -= 0x10000
        return "\\u%04x\\u%04x" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
    return "\\u%04x" % code


def check_report(results, opts, now):
    """Nagios plugin output: a summary line with perfdata, then one line per source."""
    lines = [check_source(result, opts, now) for result in results]
    if opts.same:
        lines = [max(lines[i], same_leaf_status(results, i), key=lambda s: s[0])
                 for i in range(len(results))]
    worst = max(status for status, _ in lines)
    counts = ", ".join("%d %s" % (sum(s == n for s, _ in lines), NAGIOS[n])
                       for n in range(4) if any(s == n for s, _ in lines))
    labels = [r.target.source.replace("'", "").replace("=", "") for r in results]
    perfdata = " ".join("'days_left %s'=%d;%g:;%g:" % (
        label if labels.count(label) == 1 else "%s #%d" % (label, index + 1),
        min_days(result, now), opts.warn_days, opts.crit_days)
        for index, (label, result) in enumerate(zip(labels, results)) if result.path)
    first_problem = next(("; first: " + text for status, text in lines if status == worst
                          and worst), "")   # notifications often show the first line only
    write_stdout("CERTGRAB %s - %d source(s): %s%s%s\n" % (
        NAGIOS[worst], len(results), counts, first_problem, " | " + perfdata if perfdata else "")
        + "".join("%s - %s\n" % (NAGIOS[s], text) for s, text in lines))
    return worst


def min_days(result, now):
    return min(days_left(cert, now) for cert in result.path)


def check_source(result, opts, now):
    """(status, text) for one source."""
    target = result.target
    if result.error is not None and not result.served:
        return 2, "%s" % result.error
    if result.verify_error:
        return 2, "%s" % result.error
    leaf = result.path[0]
    if opts.expect_file and not expected_leaf(opts, leaf):
        return 2, "%s: serves %s, not the leaf in %s (a service not reloaded?)" % (
            target, leaf_summary(leaf), opts.expect_file)
    soonest = min(result.path, key=lambda cert: cert.not_after)
    left = days_left(soonest, now)
    what = "the leaf" if soonest is leaf else "intermediate %s" % printable(soonest.subject)
    text = "%s: %s %s (%s), chain of %d %s" % (
        target, what, "EXPIRED %d days ago" % -left if left < 0 else
        "expires in %d days" % left, format_time(soonest.not_after), len(result.path),
        "verified" if not (target.path or opts.insecure) else "not verified")
    status = 2 if left < opts.crit_days else 1 if left < opts.warn_days else 0
    return status, text


def expected_leaf(opts, leaf):
    try:
        with open(opts.expect_file, "rb") as handle:
            ders = pem_to_ders(handle.read(1 << 20).decode("ascii", "replace"))
    except OSError as exc:
        raise UsageError("cannot read --expect-file %s: %s" % (opts.expect_file,
                                                                 exc.strerror or exc))
    return bool(ders) and ders[0] == leaf.der


def leaf_summary(leaf):
    return "sha256 %s... issued %s" % (leaf.sha256[:16], format_time(leaf.not_before))


def same_leaf_status(results, index):
    """--same: CRITICAL for a source whose leaf differs from what most sources serve."""
    leaves = [r.path[0].sha256 if r.path else None for r in results]
    common = max(leaves, key=lambda leaf: (leaves.count(leaf), leaf is not None,
                                           -leaves.index(leaf)))
    if leaves[index] == common or leaves[index] is None:
        return 0, ""
    return 2, "%s: serves %s, unlike %d of %d sources" % (
        results[index].target, leaf_summary(results[index].path[0]), leaves.count(common),
        len(results))
'''


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

# The options, one per line: flags, the value's name ("-" for a switch), help.
# Each sets the attribute its last flag names (--out-dir sets opts.out_dir).
# A table instead of argparse: argparse and the locale module it pulls in cost
# more than the whole rest of a fetch's own work (see `make bench`); and text,
# unlike a tuple of tuples, costs next to nothing to compile (see load_section).
# --help fills in %(CONSTANT)s from this module.
OPTIONS = """
-n --servername        NAME      SNI and the name verified (default: SOURCE's host)
-p --port              PORT      port for a SOURCE without one (default %(DEFAULT_PORT)d)
--timeout              SECONDS   deadline per source: DNS, connect, handshake (%(DEFAULT_TIMEOUT)g)
--starttls             PROTOCOL  talk PROTOCOL before TLS (list below)
--ehlo                 NAME      EHLO/LHLO name for smtp, lmtp (default: this host)
--alpn                 LIST      ALPN protocols to offer, comma-separated
-4 --ipv4              -         IPv4 only
-6 --ipv6              -         IPv6 only
--cafile               FILE      trust only the CA certificates in FILE
--capath               DIR       trust only the hashed CA directory DIR
--insecure             -         do not verify chain or name (says so on stderr)
--out-dir              DIR       write cert.pem, chain.pem, fullchain.pem in DIR
--cert-path            FILE      write the leaf to FILE
--chain-path           FILE      write the intermediates to FILE
--fullchain-path       FILE      write the leaf and intermediates to FILE
--verified-chain       -         output the path verification built, with its root
--combined-path        FILE      write chain and private key to FILE (0600)
--key-path             FILE      the private key the leaf must match
--key-password-file    FILE      password of an encrypted key
--owner                USER      owner of new files (existing ones keep theirs)
--group                GROUP     group of new files
--mode                 MODE      octal mode of new certificate files (default 0644)
--force                -         install even a leaf not newer than the installed one
--dry-run              -         check and say what would change; write nothing
--deploy-hook          CMD       run CMD with /bin/sh after files changed
--hook-timeout         SECONDS   kill the hook after SECONDS (default %(HOOK_TIMEOUT)g)
--text                 -         describe each chain for people instead of PEM
--json                 -         describe each source as JSON
--check                -         monitoring plugin: Nagios status lines and exit codes
--warn-days            N         --check: WARNING under N days left (%(WARN_DAYS)d)
--crit-days            N         --check: CRITICAL under N days left (%(CRIT_DAYS)d)
--same                 -         --check: CRITICAL unless all sources serve one leaf
--expect-file          FILE      --check: CRITICAL unless the leaf is FILE's
--parallel             N         fetch N sources at a time (default %(MAX_PARALLEL)d)
-q --quiet             -         print errors only
-v --verbose           -         how each source went: TLS version, method, time
-h --help              -         show this help and exit
--version              -         show the version and exit
"""


def option_rows():
    """OPTIONS as rows: (flags, attribute, metavar or None for a switch, help)."""
    rows = []
    for line in OPTIONS.strip().split("\n"):
        words = line.split()
        count = next(i for i, word in enumerate(words) if word == "-" or word[0] != "-")
        flags, metavar = words[:count], words[count]
        rows.append((flags, flags[-1].lstrip("-").replace("-", "_"),
                     None if metavar == "-" else metavar, " ".join(words[count + 1:])))
    return rows


OPTION_ROWS = option_rows()

OUTPUT_OPTIONS = ("out_dir", "cert_path", "chain_path", "fullchain_path", "combined_path")
# Options only runs that write files or check a key use: their rules are in the
# Install section, loaded when one of these is given.
INSTALL_OPTIONS = OUTPUT_OPTIONS + ("key_path", "key_password_file", "owner", "group", "mode",
                                    "force", "dry_run", "deploy_hook", "hook_timeout")
# Options of reports: their rules are in the Report section, loaded when one is given.
REPORT_OPTIONS = ("text", "json", "check", "same", "expect_file", "warn_days", "crit_days")
CHECK_FLAGS = ("--check", "--same", "--expect-file")
NAGIOS_UNKNOWN = 3      # a monitoring plugin's exit code for "could not even check"

class Options(object):
    """The parsed command line: one attribute per option, and sources."""

    def __init__(self):
        for _, attribute, metavar, _ in OPTION_ROWS:
            setattr(self, attribute, None if metavar else False)
        self.sources = []


# Lazy (see load_section): only --help needs this.
HELP_SECTION = sys._getframe().f_lineno, "help_text", r'''
USAGE = "usage: certgrab.py SOURCE [SOURCE ...] [-n NAME] [options]"

HELP_TEXT = """\
Fetch the certificate chain a TLS server presents, verify it, write it.

SOURCE is host, host:port, IPv4, [IPv6]:port or IPv6 (default port 443).
With several SOURCEs, all are fetched at once and the newest valid chain wins.
Verification is on by default, against the system CA store.
With no output option the chain is printed as PEM exactly as served.

options:
%s

--starttls protocols (default port):
%s

examples:
  certgrab.py 203.0.113.7 -n www.example.com > fullchain.pem
  certgrab.py [2001:db8::7]:8443 -n www.example.com --out-dir /etc/ssl/example
  certgrab.py 10.0.0.5 10.0.0.6 -n www.example.com --cafile ca.pem --out-dir x

exit codes:
%s"""


def help_text():
    rows = []
    for flags, _, metavar, text in OPTION_ROWS:
        left = ", ".join(flags) + (" " + metavar if metavar else "")
        text %= globals()
        rows.append("  %-24s %s" % (left, text) if len(left) < 24 else
                    "  %s\n  %-24s %s" % (left, "", text))
    lines = wrap_items(["%s %d" % (name, STARTTLS_PORTS[name])
                        for name in sorted(STARTTLS_PORTS)], 76)
    doc = __doc__ or "\nExit codes\n    (see README.md: python -OO dropped them)\n"
    exit_codes = doc.split("\nExit codes\n", 1)[1].replace("    ", "  ")
    return USAGE + "\n\n" + HELP_TEXT % ("\n".join(rows), "\n".join(
        "  " + line for line in lines), exit_codes)
'''


def option_flag(attribute):
    return next(flags[-1] for flags, name, _, _ in OPTION_ROWS if name == attribute)


def parse_args(argv):
    """Options from the command line: GNU style, long options spelt in full."""
    table = dict((flag, (attribute, metavar))
                 for flags, attribute, metavar, _ in OPTION_ROWS for flag in flags)
    opts, args = Options(), list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.sources += args
            break
        if not arg.startswith("-") or arg == "-":
            opts.sources.append(arg)
            continue
        if arg.startswith("--"):
            flag, has_value, value = arg.partition("=")
            pairs = [(flag, value if has_value else None)]
        else:   # -qv, -n NAME, -nNAME
            pairs = [("-" + c, None) for c in arg[1:]]
            for index, (flag, _) in enumerate(pairs):
                if table.get(flag, (0, None))[1] and arg[index + 2:]:
                    pairs = pairs[:index] + [(flag, arg[index + 2:])]
                    break
        for flag, value in pairs:
            _set_option(opts, table, flag, value, args)
    return opts


def _set_option(opts, table, flag, value, args):
    if flag not in table:
        raise UsageError("unknown option %s" % flag)
    attribute, metavar = table[flag]
    if metavar is None and value is not None:
        raise UsageError("%s takes no value" % flag)
    if metavar is not None and value is None:
        if not args:
            raise UsageError("%s needs a value (%s)" % (flag, metavar))
        value = args.pop(0)
    setattr(opts, attribute, True if metavar is None else value)


def check_options(opts):
    """The rules between options; numbers converted. The rules of option families
    a run does not use sit in their lazy sections, checked when one is given."""
    if not opts.sources:
        raise UsageError("no SOURCE given")
    try:
        opts.timeout = float(DEFAULT_TIMEOUT if opts.timeout is None else opts.timeout)
    except ValueError:
        opts.timeout = -1.0
    if not 0 < opts.timeout < 86400:
        raise UsageError("--timeout must be a number of seconds above 0")
    for first, second in (("ipv4", "ipv6"), ("quiet", "verbose"), ("insecure", "cafile"),
                          ("insecure", "capath"), ("insecure", "verified_chain")):
        if getattr(opts, first) and getattr(opts, second):
            raise UsageError("%s and %s exclude each other" % (
                option_flag(first), option_flag(second)))
    opts.family = socket.AF_INET if opts.ipv4 else socket.AF_INET6 if opts.ipv6 else \
        socket.AF_UNSPEC
    opts.alpn = [p for p in (opts.alpn or "").split(",") if p] or None
    opts.writes = any(getattr(opts, attribute) for attribute in OUTPUT_OPTIONS)
    opts.report, opts.key = None, None
    if opts.starttls is not None or opts.ehlo is not None:
        load_section(STARTTLS_SECTION)
        check_starttls_options(opts)
    if any(getattr(opts, attribute) not in (None, False) for attribute in REPORT_OPTIONS):
        load_section(REPORT_SECTION)
        check_report_options(opts)
    if opts.parallel is not None or len(opts.sources) > 1:
        load_section(FLEET_SECTION)
        check_fleet_options(opts)
    # Every run but a plain fetch reads certificate fields: decoded while fetching.
    opts.details = bool(opts.report or opts.writes or opts.key_path or opts.verbose
                        or len(opts.sources) > 1)
    if opts.details:
        load_section(DETAILS_SECTION)
    if any(getattr(opts, attribute) for attribute in INSTALL_OPTIONS):
        load_section(INSTALL_SECTION)
        check_install_options(opts)


def make_reader(opts, targets):
    """The run's context; with --key-path, one more per key type for dual-cert servers.
    None when every source is a local file: they need no trust store."""
    if all(target.path for target in targets):
        return None
    kinds = ("RSA", "EC") if opts.key else ()
    trust = " and ".join("%s %s" % (flag, getattr(opts, flag[2:])) for flag in
                         ("--cafile", "--capath") if getattr(opts, flag[2:])) or "the system store"
    if not HAS_VERIFIED_CHAIN:
        load_section(BEFORE_310_SECTION)
    new_reader = ChainReader if HAS_VERIFIED_CHAIN else ChainReaderBefore310
    readers = dict((kind, new_reader(make_context(opts, kind), trust)) for kind in kinds)
    reader = new_reader(make_context(opts), trust, readers)
    for each in [reader] + list(readers.values()):
        each.starttls = opts.starttls
    return reader


def main(argv=None):
    """Run certgrab; return the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(argv)
        if opts.help:
            load_section(HELP_SECTION)
            sys.stdout.write(help_text())
            return 0
        if opts.version:
            sys.stdout.write("certgrab %s\n" % __version__)
            return 0
        check_options(opts)
        targets = parse_targets(opts)                   # 1. what to dial, what name to verify
        plan = plan_outputs(opts) if opts.writes else []  # 2. where to write, checked now
        reader = make_reader(opts, targets)             # 3. trust store, chain access
        if opts.insecure:
            warn(opts, "--insecure: the chain is NOT verified; anyone on the path could "
                       "have sent it")
        results = fetch_all(targets, reader, opts)      # 4. one handshake per source
        if opts.report:                                 #    or: describe them all
            return report(results, opts)
        if plan or opts.key:
            apply_gate(results, opts)                   # 5. key, name, dates
        best = choose_result(results, opts)             # 6. the newest good chain
        report_fetch(results, best, reader, opts, plan)
        if not plan:                                    # 7a. stdout: exactly as served
            certs = best.verified if opts.verified_chain else best.served
            write_stdout("".join(der_to_pem(cert.der) for cert in certs))
            return 0
        install_chain(plan, best.verified if opts.verified_chain else best.path, best, opts)
        return 0                                        # 7b. files, then the hook
    except CertgrabError as exc:
        report_error(exc)
        if isinstance(exc, UsageError):
            sys.stderr.write("certgrab: hint: certgrab.py --help lists the options\n")
        if any(arg.split("=")[0] in CHECK_FLAGS for arg in argv):
            sys.stdout.write("CERTGRAB UNKNOWN - %s\n" % exc)    # a plugin's status line
            return NAGIOS_UNKNOWN
        return exc.exit_code


LAZY_SECTIONS = (DETAILS_SECTION, KEYS_SECTION, STARTTLS_SECTION, BEFORE_310_SECTION,
                 FAILURE_SECTION, FLEET_SECTION, INSTALL_SECTION, REPORT_SECTION,
                 HELP_SECTION)      # make lint compiles each one


if __name__ == "__main__":
    sys.exit(main())
