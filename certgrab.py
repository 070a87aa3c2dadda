#!/usr/bin/env python3
"""certgrab: fetch the TLS certificate chain a server presents, verify it, write it.

One machine of a fleet renews the certificate; every other machine runs certgrab
from cron, dials that machine (usually by IP address), performs a TLS handshake
with SNI set to the domain, verifies what it was given and writes the chain out.
No SSH, no shared storage: certificates are public, the key was copied once.

Synopsis
    certgrab.py 203.0.113.7 -n www.example.com > fullchain.pem
    certgrab.py [2001:db8::7]:8443 -n www.example.com --out-dir /etc/ssl/example
    certgrab.py 10.0.0.5 10.0.0.6 -n www.example.com --cafile ca.pem --out-dir x

Runs on CPython 3.6 to 3.13 with the standard library only, including Debian's
python3-minimal (no json, shutil, ctypes; no CA store: pass --cafile there).

Pipeline
    SOURCE ... --parse--> host, port, name --TCP--> socket --TLS, SNI=name--> handshake
        |                                                                      |
        |   one thread per source, one deadline (--timeout) per source         v
        +--------------------------------------------------- served chain (DER, as sent)
                                                                               |
    newest valid leaf (notBefore) <--- verdict: OpenSSL verification + name ---+
        |
        +--> stdout: the chain exactly as served (PEM, leaf first)
        +--> files:  the cleaned path (leaf, intermediates in order, no root),
                     each written to a temporary file, fsynced, renamed into place

Security model
    - Verification is on by default: the chain must lead to a trusted root (the
      system store, or --cafile/--capath) and the leaf must cover --servername
      (or the IP address dialled). --insecure turns this off and says so.
    - Nothing is written unless every step before it succeeded; a file is either
      the old version or the new one, never half of each. New certificate files
      get mode 0644; an existing file keeps its mode and owner.
    - Everything read from the network is bounded in size and time, and parsed by
      the small DER reader below before it is trusted with anything.

Exit codes
    0  success: chain fetched, verified and written
    2  usage error: bad option, SOURCE, port, --cafile or --capath
    3  cannot fetch: connection refused/timed out, not TLS, TLS failure
    4  verification failed: unknown issuer, expired, name mismatch
    5  cannot write an output file
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


HAS_VERIFIED_CHAIN = hasattr(ssl._ssl._SSLSocket, "get_verified_chain")  # 3.10+
# Python 3.6 reports every verification failure as a plain SSLError.
VERIFY_FAILED_REASON = "CERTIFICATE_VERIFY_FAILED"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_PORT = 443
DEFAULT_TIMEOUT = 10.0  # seconds; one deadline per source: DNS, connect and handshake
MAX_CHAIN = 20          # certificates; real chains have 2 to 5, more is hostile
MAX_PARALLEL = 32       # sources fetched at once; bounds threads and sockets
NEW_FILE_MODE = 0o644   # certificates are public; never group- or world-writable
DIR_MODE = 0o755        # for a missing output directory
TEMP_MARK = ".certgrab-tmp-"  # in the names of temporary files beside the outputs

TLS_HANDSHAKE = 22      # TLS content type of handshake records
TLS_CERTIFICATE = 11    # handshake message type of Certificate
TLS13_VERSION = 0x0304

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


# ---------------------------------------------------------------------------
# Certificates: a small DER reader for X.509, PEM in and out.
# ---------------------------------------------------------------------------

DER_INTEGER, DER_BIT_STRING, DER_OCTET_STRING, DER_OID = 0x02, 0x03, 0x04, 0x06
DER_SEQUENCE, DER_SET = 0x30, 0x31
DER_VERSION, DER_EXTENSIONS = 0xA0, 0xA3          # [0] and [3] in TBSCertificate
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
OID_SAN, OID_BASIC_CONSTRAINTS = "2.5.29.17", "2.5.29.19"
OID_SKI, OID_AKI = "2.5.29.14", "2.5.29.35"


class Certificate(object):
    """The fields of one X.509 certificate that certgrab looks at."""

    def __init__(self, der):
        self.der = der
        self.subject = self.issuer = ""        # text, e.g. "C=US, O=Example, CN=R1"
        self.subject_der = self.issuer_der = b""
        self.serial = 0
        self.not_before = self.not_after = 0  # seconds since the epoch, UTC
        self.dns_names, self.ip_addresses = [], []
        self.key_type, self.key_bits = "unknown", 0
        self.spki = b""                        # SubjectPublicKeyInfo, DER
        self.signature_algorithm = ""
        self.is_ca = False
        self.ski = self.aki = None             # key identifiers, bytes or None

    @property
    def self_issued(self):
        return self.subject_der == self.issuer_der

    def issued(self, other):
        """True if this certificate's subject (and key id) names other's issuer."""
        if self.subject_der != other.issuer_der:
            return False
        return self.ski is None or other.aki is None or self.ski == other.aki

    def __repr__(self):
        return "<Certificate %s>" % self.subject


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


def _element(data, item):
    """The whole encoding of an element, header included."""
    return data[item[3]:item[2]]


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
    if oid == OID_SAN:
        for name in _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE):
            raw = data[name[1]:name[2]]
            if name[0] == SAN_DNS:
                cert.dns_names.append(raw.decode("ascii", "replace"))
            elif name[0] == SAN_IP and len(raw) in (4, 16):
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                cert.ip_addresses.append(socket.inet_ntop(family, raw))
    elif oid == OID_BASIC_CONSTRAINTS:
        fields = _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE)
        cert.is_ca = bool(fields) and fields[0][0] == 0x01 and data[fields[0][1]:fields[0][2]] != b"\0"
    elif oid == OID_SKI:
        inner = _wrapped(data, value, DER_OCTET_STRING)
        cert.ski = data[inner[1]:inner[2]]
    elif oid == OID_AKI:
        for field in _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE):
            if field[0] == 0x80:
                cert.aki = data[field[1]:field[2]]


def parse_certificate(der):
    """Parse one DER certificate; raise ParseError on anything malformed."""
    der = bytes(der)
    cert = Certificate(der)
    top = _tlv(der, 0, len(der))
    if top[2] != len(der):
        raise ParseError("malformed certificate: trailing bytes after the certificate")
    outer = _children(der, top, DER_SEQUENCE, 3)
    tbs = _children(der, outer[0], DER_SEQUENCE, 6)
    if tbs[0][0] == DER_VERSION:
        tbs = tbs[1:]
    if len(tbs) < 6 or tbs[0][0] != DER_INTEGER:
        raise ParseError("malformed certificate: bad TBSCertificate")
    serial, issuer, validity, subject, spki = tbs[0], tbs[2], tbs[3], tbs[4], tbs[5]
    cert.serial = int.from_bytes(der[serial[1]:serial[2]], "big")
    cert.signature_algorithm = _oid(der, _children(der, outer[1], DER_SEQUENCE, 1)[0])
    cert.signature_algorithm = OID_SIGNATURES.get(cert.signature_algorithm,
                                                  cert.signature_algorithm)
    cert.issuer, cert.subject = _name(der, issuer), _name(der, subject)
    cert.issuer_der, cert.subject_der = _element(der, issuer), _element(der, subject)
    times = _children(der, validity, DER_SEQUENCE, 2)
    cert.not_before, cert.not_after = _time(der, times[0]), _time(der, times[1])
    _public_key(cert, der, spki)
    for item in tbs[6:]:
        if item[0] != DER_EXTENSIONS:
            continue
        for extension in _children(der, _children(der, item, DER_EXTENSIONS, 1)[0], DER_SEQUENCE):
            fields = _children(der, extension, DER_SEQUENCE, 2)
            _extension(cert, der, _oid(der, fields[0]), fields[-1])
    return cert


def der_to_pem(der):
    return ssl.DER_cert_to_PEM_cert(der)


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


def format_time(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def printable(text):
    """Text from a certificate, safe for a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256
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


# ---------------------------------------------------------------------------
# Connecting: SOURCE to address, TCP within the deadline.
# ---------------------------------------------------------------------------

class Target(object):
    """One SOURCE: where to dial, and the name to send (SNI) and verify."""

    def __init__(self, source, host, port, servername):
        self.source, self.host, self.port = source, host, port
        self.servername = servername          # None: an IP with no -n: no SNI
        self.verify_name = servername or host.split("%")[0]

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


def check_dns_name(name, what):
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
    try:
        ascii_name = name if name.isascii() else name.encode("idna").decode("ascii")
    except AttributeError:  # str.isascii is 3.7+
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if not ascii_name or len(ascii_name) > 253 or not set(ascii_name) <= allowed \
            or any(not label for label in ascii_name.split(".")):
        raise UsageError("%s: not a host name or IP address" % what)


def parse_targets(opts):
    default_port = parse_port(opts.port, "-p/--port") if opts.port else DEFAULT_PORT
    servername = None
    if opts.servername:
        servername = opts.servername.rstrip(".")
        if not is_ip(servername):
            check_dns_name(servername, "bad --servername %r" % opts.servername)
    targets = []
    for source in opts.sources:
        host, port = parse_source(source, default_port)
        name = servername or (None if is_ip(host) else host)
        targets.append(Target(source, host, port, name))
    return targets


def remaining(deadline, target, doing):
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("%s: timed out %s" % (target, doing),
                         hint="the server is slow or silent; raise --timeout if it is just slow")
    return left


def resolve(target, family, deadline):
    """Addresses for the target; DNS gets the deadline too (it ignores socket timeouts)."""
    if is_ip(target.host):
        return socket.getaddrinfo(target.host, target.port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)
    import threading
    answer = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(target.host, target.port, family, socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(remaining(deadline, target, "resolving %s" % target.host))
    if not answer:
        remaining(0, target, "resolving %s" % target.host)
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
            remaining(0, target, "connecting to %s port %d" % (address[0], address[1]))
        except OSError as exc:
            sock.close()
            failure = exc
    raise FetchError("%s: cannot connect to port %d: %s" % (
        target, target.port, failure.strerror or failure))


# ---------------------------------------------------------------------------
# TLS: trust store, handshake, and the chain the server sent.
# ---------------------------------------------------------------------------

def make_context(opts):
    """A client context: verifying (the default) or --insecure."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if opts.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if opts.cafile or opts.capath:
        if opts.capath and not os.path.isdir(opts.capath):
            raise UsageError("--capath %s: not a directory" % opts.capath)
        try:
            ctx.load_verify_locations(cafile=opts.cafile, capath=opts.capath)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError("cannot load --cafile %s: %s" % (
                opts.cafile, getattr(exc, "strerror", None) or ssl_reason(exc)))
        return ctx
    load_system_store(ctx)
    return ctx


def load_system_store(ctx):
    """The system's CA store; the hashed directory first, as it loads lazily."""
    paths = ssl.get_default_verify_paths()
    env_file = os.environ.get(paths.openssl_cafile_env)
    if paths.capath and is_hashed_dir(paths.capath):
        ctx.load_verify_locations(capath=paths.capath)
        if env_file and paths.cafile:
            ctx.load_verify_locations(cafile=paths.cafile)
    elif paths.cafile:
        ctx.load_verify_locations(cafile=paths.cafile)
    else:
        raise VerifyError(
            "no trusted CA certificates on this host (looked for %s and %s)"
            % (paths.openssl_cafile, paths.openssl_capath),
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


def tls_hint(reason):
    reason = reason.lower()
    if "wrong version" in reason or "record layer" in reason or "packet length" in reason \
            or "unknown protocol" in reason or "http request" in reason:
        return "the server did not answer with TLS: is this port plain text (HTTP, or a " \
               "protocol that needs STARTTLS)?"
    if "alert" in reason:
        return "the server refused the handshake; check -n/--servername (the name it serves)"
    if "eof" in reason:
        return "the server closed the connection during the handshake"
    return None


def verify_hint(message, target):
    message = message.lower()
    if "expired" in message or "not yet valid" in message:
        return "check this machine's clock (date -u); if it is right, the server serves a " \
               "stale certificate. --insecure fetches it anyway"
    if "match" in message:
        return "the certificate does not cover %s: pass -n/--servername with a name it " \
               "covers" % target.verify_name
    return "the chain does not lead to a root this host trusts: pass --cafile ROOT.pem " \
           "(or install ca-certificates); --insecure skips verification"


class ChainReader(object):
    """The context for every handshake of a run, and the way to read chains."""

    def __init__(self, ctx):
        self.ctx, self.method = ctx, chain_method()
        self._messages, self._openssl = [], None
        if self.method == "msg_callback":
            ctx._msg_callback = self._record
        elif self.method == "ctypes":
            self._openssl = OpenSSLPeek(ctx)

    def _record(self, conn, direction, version, content_type, msg_type, data):
        if direction == "read" and content_type == TLS_HANDSHAKE and msg_type == TLS_CERTIFICATE:
            self._messages.append((conn, version, data))

    def served(self, tls):
        """The certificates as the server sent them: list of DER."""
        if self.method == "get_unverified_chain":
            return tls.get_unverified_chain()
        if self.method == "_sslobj.get_unverified_chain":
            chain = tls._sslobj.get_unverified_chain() or []
            return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]
        if self.method == "msg_callback":
            for conn, version, data in self._messages:
                if conn is tls:
                    return parse_certificate_message(data[4:], version == TLS13_VERSION)
            return []
        return self._openssl.peer_chain(tls)

    def verified(self, tls):
        """The path OpenSSL built (3.10+), as DER; None where Python cannot tell."""
        if not HAS_VERIFIED_CHAIN:
            return None
        chain = tls._sslobj.get_verified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verify_message(self, tls):
        return self._openssl.verify_message(tls) if self._openssl else None

    def store_certificates(self):
        return [parse_certificate(der) for der in self.ctx.get_ca_certs(binary_form=True)]


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


class FetchResult(object):
    """What one source gave: the chain, the verdict, or the error."""

    def __init__(self, target):
        self.target, self.error, self.address = target, None, None
        self.served, self.path, self.problems, self.verified = [], [], [], []
        self.tls_version = self.cipher = self.verify_error = None
        self.elapsed = 0.0

    @property
    def leaf(self):
        return self.path[0] if self.path else None


def fetch_chain(target, reader, opts):
    """Connect, handshake and read the chain; errors are kept in the result."""
    result, started = FetchResult(target), time.monotonic()
    try:
        _fetch_into(result, reader, opts, started + opts.timeout)
    except CertgrabError as exc:
        result.error = exc
    result.elapsed = time.monotonic() - started
    return result


def _fetch_into(result, reader, opts, deadline):
    target = result.target
    sock = open_connection(target, opts.family, deadline)
    result.address = sock.getpeername()[0]
    tls = reader.ctx.wrap_socket(sock, server_hostname=target.verify_name,
                                 do_handshake_on_connect=False)
    try:
        failure = _handshake(tls, reader, target, deadline)
        served, verified = reader.served(tls), None
        if failure is None and opts.verified_chain:
            verified = reader.verified(tls)
        result.tls_version, result.cipher = tls.version(), (tls.cipher() or (None,))[0]
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
        result.verify_error = str(failure)
        raise failure
    if opts.verified_chain:
        result.verified = (rebuild_verified(result.path, reader) if verified is None
                           else [parse_certificate(der) for der in verified])


def _handshake(tls, reader, target, deadline):
    """Complete the handshake. A failed verification is returned, not raised,
    so that the chain can still be read from the connection."""
    try:
        tls.settimeout(remaining(deadline, target, "before the TLS handshake"))
        tls.do_handshake()
    except ssl.CertificateError as exc:     # 3.7+: every verify failure; 3.6: name only
        return verify_failure(getattr(exc, "verify_message", None) or str(exc), target)
    except socket.timeout:
        remaining(0, target, "during the TLS handshake")
    except ssl.SSLError as exc:
        if exc.reason == VERIFY_FAILED_REASON:    # Python 3.6
            return verify_failure(reader.verify_message(tls) or ssl_reason(exc), target)
        reason = ssl_reason(exc)
        raise FetchError("%s: TLS handshake failed: %s" % (target, reason), hint=tls_hint(reason))
    except OSError as exc:
        reason = exc.strerror or str(exc) or exc.__class__.__name__
        raise FetchError("%s: TLS handshake failed: %s" % (target, reason), hint=tls_hint(reason))
    return None


def verify_failure(message, target):
    return VerifyError("%s: certificate verification failed: %s" % (target, message),
                       hint=verify_hint(message, target))


def rebuild_verified(path, reader):
    """Python < 3.10: the cleaned path, extended with issuers from the trust store."""
    chain, store = list(path), reader.store_certificates()
    while not chain[-1].self_issued and len(chain) <= MAX_CHAIN:
        issuer = next((c for c in store if c.issued(chain[-1])), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def fetch_all(targets, reader, opts):
    """Fetch every target, concurrently; results in the order given."""
    if len(targets) == 1:
        return [fetch_chain(targets[0], reader, opts)]
    import threading
    results, pending, lock = [None] * len(targets), list(range(len(targets))), threading.Lock()

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

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(MAX_PARALLEL, len(targets)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def choose_result(results, opts):
    """The newest good chain (latest leaf notBefore); the other failures warned about."""
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


# ---------------------------------------------------------------------------
# Install: output files, written whole or not at all.
# ---------------------------------------------------------------------------

def plan_outputs(opts):
    """(path, kind) for every file asked for, checked before any network I/O."""
    plan = []
    if opts.out_dir:
        plan += [(os.path.join(opts.out_dir, name), name[:-4]) for name in OUT_DIR_FILES]
    for kind, path in (("cert", opts.cert_path), ("chain", opts.chain_path),
                       ("fullchain", opts.fullchain_path)):
        if path:
            plan.append((path, kind))
    absolute = [os.path.abspath(path) for path, _ in plan]
    if len(set(absolute)) != len(absolute):
        raise UsageError("two outputs name the same file")
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


def file_contents(kind, chain):
    certs = {"cert": chain[:1], "chain": chain[1:], "fullchain": chain}[kind]
    return "".join(der_to_pem(cert.der) for cert in certs).encode("ascii")


def read_existing(path):
    try:
        with open(path, "rb") as existing:
            return existing.read()
    except OSError:
        return None


def install_files(plan, chain):
    """Write each planned file that differs from what is on disk; return their paths.

    Every new version is staged as a temporary file beside its target and
    fsynced before the first rename, so a failure leaves the old files alone.
    """
    wanted = [(path, file_contents(kind, chain)) for path, kind in plan]
    changed = [(path, data) for path, data in wanted if read_existing(path) != data]
    staged, path = [], None
    try:
        for path, data in changed:
            staged.append((stage_file(path, data), path))
        for temp, path in staged:
            os.replace(temp, path)
    except OSError as exc:
        for temp, _ in staged:
            remove_quietly(temp)
        raise WriteError("cannot write %s: %s" % (path, exc.strerror or exc))
    for directory in set(os.path.dirname(os.path.abspath(p)) for p, _ in changed):
        sync_directory(directory)
    return [path for path, _ in changed]


def stage_file(path, data):
    """A fsynced temporary copy of data beside path, with path's mode and owner."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, DIR_MODE, exist_ok=True)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    temp = os.path.join(directory, "." + os.path.basename(path) + TEMP_MARK
                        + binascii.hexlify(os.urandom(6)).decode("ascii"))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if old is not None and os.geteuid() == 0:
            os.fchown(fd, old.st_uid, old.st_gid)
        os.fchmod(fd, (old.st_mode & 0o7777 if old else NEW_FILE_MODE) & ~0o022)
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


def info(opts, message):
    if opts.verbose:
        sys.stderr.write("certgrab: %s\n" % message)


def report_fetch(results, best, reader, opts):
    """Chain problems of the winner; with -v, how each source went."""
    for problem in best.problems:
        warn(opts, "%s: %s (output files get the issuing path: leaf, intermediates, no root)"
             % (best.target, problem))
    for result in results:
        if result.error is None:
            info(opts, "%s (%s): %s %s, %d certificate(s) read with %s, %s, %.0f ms" % (
                result.target, result.address, result.tls_version, result.cipher,
                len(result.served), reader.method,
                "NOT verified (--insecure)" if opts.insecure else "verified",
                result.elapsed * 1000))
            for index, cert in enumerate(result.served):
                info(opts, "  %d %s (issuer %s) %s to %s" % (
                    index, printable(cert.subject), printable(cert.issuer),
                    format_time(cert.not_before), format_time(cert.not_after)))
    if len(results) > 1:
        warn(opts, "using the chain from %s (newest leaf, issued %s)"
             % (best.target, format_time(best.leaf.not_before))) if not opts.quiet else None


def write_stdout(certs):
    try:
        sys.stdout.write("".join(der_to_pem(cert.der) for cert in certs))
        sys.stdout.flush()
    except OSError as exc:
        raise WriteError("cannot write to standard output: %s" % (exc.strerror or exc))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

# One row per option: flags, attribute, metavar (None for a switch), help.
# A table instead of argparse: argparse and the locale module it pulls in cost
# more than the whole rest of a fetch's own work (see `make bench`).
OPTIONS = (
    ("-n --servername", "servername", "NAME",
     "SNI and the name verified (default: SOURCE's host)"),
    ("-p --port", "port", "PORT", "port for a SOURCE without one (default %d)" % DEFAULT_PORT),
    ("--timeout", "timeout", "SECONDS",
     "deadline per source: DNS, connect, handshake (%g)" % DEFAULT_TIMEOUT),
    ("-4", "ipv4", None, "IPv4 only"),
    ("-6", "ipv6", None, "IPv6 only"),
    ("--cafile", "cafile", "FILE", "trust only the CA certificates in FILE"),
    ("--capath", "capath", "DIR", "trust only the hashed CA directory DIR"),
    ("--insecure", "insecure", None, "do not verify chain or name (says so on stderr)"),
    ("--out-dir", "out_dir", "DIR", "write cert.pem, chain.pem, fullchain.pem in DIR"),
    ("--cert-path", "cert_path", "FILE", "write the leaf to FILE"),
    ("--chain-path", "chain_path", "FILE", "write the intermediates to FILE"),
    ("--fullchain-path", "fullchain_path", "FILE", "write the leaf and intermediates to FILE"),
    ("--verified-chain", "verified_chain", None,
     "output the path verification built, with its root"),
    ("-q --quiet", "quiet", None, "print errors only"),
    ("-v --verbose", "verbose", None, "how each source went: TLS version, method, time"),
    ("-h --help", "help", None, "show this help and exit"),
    ("--version", "version", None, "show the version and exit"),
)

USAGE = "usage: certgrab.py SOURCE [SOURCE ...] [-n NAME] [options]"

HELP_TEXT = """\
Fetch the certificate chain a TLS server presents, verify it, write it.

SOURCE is host, host:port, IPv4, [IPv6]:port or IPv6 (default port 443).
With several SOURCEs, all are fetched at once and the newest valid chain wins.
Verification is on by default, against the system CA store.
With no output option the chain is printed as PEM exactly as served.

options:
%s

examples:
  certgrab.py 203.0.113.7 -n www.example.com > fullchain.pem
  certgrab.py [2001:db8::7]:8443 -n www.example.com --out-dir /etc/ssl/example
  certgrab.py 10.0.0.5 10.0.0.6 -n www.example.com --cafile ca.pem --out-dir x

exit codes:
  0  success: chain fetched, verified and written
  2  usage error: bad option, SOURCE, port, --cafile or --capath
  3  cannot fetch: connection refused/timed out, not TLS, TLS failure
  4  verification failed: unknown issuer, expired, name mismatch
  5  cannot write an output file
"""


class Options(object):
    """The parsed command line: one attribute per OPTIONS row, and sources."""

    def __init__(self):
        for _, attribute, metavar, _ in OPTIONS:
            setattr(self, attribute, None if metavar else False)
        self.sources = []


def help_text():
    rows = []
    for flags, _, metavar, text in OPTIONS:
        left = ", ".join(flags.split()) + (" " + metavar if metavar else "")
        rows.append("  %-24s %s" % (left, text) if len(left) < 24 else
                    "  %s\n  %-24s %s" % (left, "", text))
    return USAGE + "\n\n" + HELP_TEXT % "\n".join(rows)


def option_flag(attribute):
    return next(flags.split()[-1] for flags, name, _, _ in OPTIONS if name == attribute)


def parse_args(argv):
    """Options from the command line: GNU style, long options spelt in full."""
    table = dict((flag, (attribute, metavar))
                 for flags, attribute, metavar, _ in OPTIONS for flag in flags.split())
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
    """The rules between options; numbers converted."""
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


def main(argv=None):
    """Run certgrab; return the exit code (see the module docstring)."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        if opts.help or opts.version:
            sys.stdout.write(help_text() if opts.help else "certgrab %s\n" % __version__)
            return 0
        check_options(opts)
        targets = parse_targets(opts)                   # 1. what to dial, what name to verify
        plan = plan_outputs(opts)                       # 2. where to write, checked up front
        reader = ChainReader(make_context(opts))        # 3. trust store, chain access
        if opts.insecure:
            warn(opts, "--insecure: the chain is NOT verified; anyone on the path could "
                       "have sent it")
        results = fetch_all(targets, reader, opts)      # 4. one handshake per source
        best = choose_result(results, opts)             # 5. the newest good chain
        report_fetch(results, best, reader, opts)
        if not plan:                                    # 6a. stdout: exactly as served
            write_stdout(best.verified if opts.verified_chain else best.served)
            return 0
        changed = install_files(plan, best.verified if opts.verified_chain else best.path)
        info(opts, "wrote %s" % (", ".join(changed) or "nothing: files already up to date"))
        return 0                                        # 6b. files: the cleaned path
    except UsageError as exc:
        report_error(exc)
        sys.stderr.write("certgrab: hint: certgrab.py --help lists the options\n")
        return exc.exit_code
    except CertgrabError as exc:
        report_error(exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
