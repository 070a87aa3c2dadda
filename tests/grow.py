"""Certificates grown past the DER reader's bounds, for test_fuzz.py.

Each growth takes a real certificate, finds one field by its place in X.509's shape and
makes it larger than certgrab reads: a length, an OID arc, an integer (serial, version,
RSA modulus, DSA and EC primes), a validity time, the nesting, a count (attributes of a
name, subjectAltNames, extensions, CRL distribution points and their names) or the whole
certificate. Every grown certificate must
be certgrab's own ParseError, naming what was too large: never another exception (Python
3.11+ raises ValueError when an int of more than 4,300 digits becomes text), never a
certificate read as if nothing were wrong.

The builders (with_serial, with_sans, ...) make one value exactly as large as asked, so
that test_fuzz.py can also check each bound from both sides.

Standard library only, in Python 3.6 syntax: test_fuzz.py imports it, and runs it as a
program under Python 3.6, 3.9 and 3.13 and in the python3-minimal roots:

    python3 grow.py CERTGRAB_DIR SEED CASES DER_FILE...

prints "ok: N grown certificates, every one a ParseError" and exits 0, or prints each
failure (case, kind, what happened) and exits 1.
"""

import copy
import random
import sys

INTEGER, OCTET_STRING, OID, SEQUENCE, SET = 0x02, 0x04, 0x06, 0x30, 0x31
NULL = [0x05, b""]
OID_RSA = "1.2.840.113549.1.1.1"
OID_DSA = "1.2.840.10040.4.1"
OID_EC = "1.2.840.10045.2.1"
OID_PRIME_FIELD = "1.2.840.10045.1.1"
OID_SAN = "2.5.29.17"
OID_CRL_DP = "2.5.29.31"
OID_CN = "2.5.4.3"
PRIVATE_ARC = "1.3.6.1.4.1.55555"     # a private enterprise arc for made-up extensions
# The DER reader's bounds, as docs/limitations.md states them (test_fuzz.py checks that
# certgrab.py and the docs say the same): a value past one is a malformed certificate.
MAX_CERTIFICATE = 100 * 1024    # bytes of one certificate
MAX_OID_BYTES = 63              # bytes of an object identifier
MAX_OID_ARC_BITS = 128          # bits of one arc of it
MAX_SERIAL_BITS = 512           # bits of a serial number
MAX_VERSION_BITS = 8            # bits of the version number
MAX_RSA_BITS = 16384            # bits of an RSA modulus
MAX_DSA_BITS = 10000            # bits of a DSA prime
MAX_EC_FIELD_BITS = 661         # bits of an explicit EC curve's prime and coefficients
MAX_NAME_ATTRIBUTES = 100       # attributes of one name
MAX_SANS = 1000                 # subjectAltNames
MAX_EXTENSIONS = 100            # extensions
MAX_CRL_NAMES = 100             # CRL distribution points, and names in them
BOUNDS = ("MAX_CERTIFICATE", "MAX_OID_BYTES", "MAX_OID_ARC_BITS", "MAX_SERIAL_BITS",
          "MAX_VERSION_BITS", "MAX_RSA_BITS", "MAX_DSA_BITS", "MAX_EC_FIELD_BITS",
          "MAX_NAME_ATTRIBUTES", "MAX_SANS", "MAX_EXTENSIONS", "MAX_CRL_NAMES")
LARGEST = 40000         # bytes of the largest grown value: the certificate stays under the
                        # reader's size bound, so the value's own bound is the one met


# DER as nested lists: [tag, value], value a list of nodes (constructed) or bytes ----------

def der_tree(der, pos=0, end=None):
    """Parse valid DER into nodes [tag, children-list or value-bytes]."""
    end = len(der) if end is None else end
    nodes = []
    while pos < end:
        tag, first = der[pos], der[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            length, header = int.from_bytes(der[pos + 2:pos + 2 + n], "big"), 2 + n
        value = der[pos + header:pos + header + length]
        if tag & 0x20:
            nodes.append([tag, der_tree(value)])
        else:
            nodes.append([tag, value])
        pos += header + length
    return nodes


def der_length(n):
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def der_encode(nodes):
    """DER of nodes. A node may carry a third item, a function of its content's size
    that gives the length octets to write instead of the true ones; a node [None, DER]
    is written as that DER."""
    out = []
    for node in nodes:
        tag, value = node[0], node[1]
        if tag is None:                     # DER made already (grow_nesting)
            out.append(value)
            continue
        body = der_encode(value) if isinstance(value, list) else value
        length = node[2](len(body)) if len(node) > 2 else der_length(len(body))
        out.append(bytes([tag]) + length + body)
    return b"".join(out)


def all_nodes(nodes, found=None):
    found = [] if found is None else found
    for node in nodes:
        found.append(node)
        if isinstance(node[1], list):
            all_nodes(node[1], found)
    return found


def oid_node(arcs):
    """An OBJECT IDENTIFIER node for arcs, a dotted text or a list of ints."""
    if isinstance(arcs, str):
        arcs = [int(arc) for arc in arcs.split(".")]
    body = b"".join(_base128(arc) for arc in [arcs[0] * 40 + arcs[1]] + list(arcs[2:]))
    return [OID, body]


def _base128(number):
    out = [number & 0x7F]
    number >>= 7
    while number:
        out.append(0x80 | (number & 0x7F))
        number >>= 7
    return bytes(reversed(out))


def positive(rng, size):
    """The content octets of a minimally encoded positive INTEGER of size bytes whose
    first byte is 01 to 7f: more than 8 * (size - 1) bits."""
    return bytes([rng.randint(1, 0x7F)]) + random_bytes(rng, size - 1)


def random_bytes(rng, size):
    return rng.getrandbits(8 * size).to_bytes(size, "big") if size else b""


# The fields of a certificate tree --------------------------------------------------------

def fields(tree):
    """The TBSCertificate's list of fields and the index of the serial (after [0] version)."""
    tbs = tree[0][1][0][1]
    return tbs, 1 if tbs[0][0] == 0xA0 else 0


def field(tree, name):
    tbs, first = fields(tree)
    return tbs[first + ("serial", "signature", "issuer", "validity", "subject",
                        "spki").index(name)]


def extensions(tree):
    """The SEQUENCE node of the extensions (added when the certificate has none)."""
    tbs, first = fields(tree)
    for node in tbs[first + 6:]:
        if node[0] == 0xA3:
            return node[1][0]
    tbs.append([0xA3, [[SEQUENCE, []]]])
    return tbs[-1][1][0]


def extension(oid, value):
    return [SEQUENCE, [oid_node(oid), [OCTET_STRING, value]]]


# Builders: one value exactly as large as asked -------------------------------------------

def with_serial(tree, content):
    field(tree, "serial")[1] = content


def with_version(tree, content):
    tbs, first = fields(tree)
    if first:
        tbs[0][1] = [[INTEGER, content]]
    else:
        tbs.insert(0, [0xA0, [[INTEGER, content]]])


def with_spki(tree, algorithm, parameters, key):
    """The subjectPublicKeyInfo: algorithm OID, its parameters node, key DER."""
    field(tree, "spki")[1] = [[SEQUENCE, [oid_node(algorithm), parameters]],
                              [0x03, b"\x00" + key]]


def with_rsa_modulus(tree, content):
    key = der_encode([[SEQUENCE, [[INTEGER, content], [INTEGER, b"\x01\x00\x01"]]]])
    with_spki(tree, OID_RSA, NULL, key)


def with_dsa_prime(tree, content):
    parameters = [SEQUENCE, [[INTEGER, content], [INTEGER, b"\x01"], [INTEGER, b"\x02"]]]
    with_spki(tree, OID_DSA, parameters, der_encode([[INTEGER, b"\x03"]]))


def with_explicit_curve(tree, prime, a=b"\x01", b=b"\x02"):
    """An EC key on explicit curve parameters (version, field, curve, base, order)."""
    parameters = [SEQUENCE, [[INTEGER, b"\x01"],
                             [SEQUENCE, [oid_node(OID_PRIME_FIELD), [INTEGER, prime]]],
                             [SEQUENCE, [[OCTET_STRING, a], [OCTET_STRING, b]]],
                             [OCTET_STRING, b"\x04\x01\x02"], [INTEGER, b"\x07"]]]
    with_spki(tree, OID_EC, parameters, b"\x04\x01\x02")


def with_name_attributes(tree, which, per_rdn):
    """Subject or issuer (which) made of RDNs holding per_rdn attributes each: a list
    of counts, e.g. [1] * 101, or [101] for one multi-valued RDN."""
    rdns = [[SET, [[SEQUENCE, [oid_node(OID_CN), [0x0C, b"a%d" % n]]] for n in range(count)]]
            for count in per_rdn]
    field(tree, which)[1] = rdns


def with_sans(tree, count):
    """A subjectAltName of count DNS names, in place of the certificate's own."""
    names = der_encode([[SEQUENCE, [[0x82, b"h%d.example.test" % n] for n in range(count)]]])
    exts = extensions(tree)
    exts[1] = [e for e in exts[1] if e[1][0] != oid_node(OID_SAN)] + [extension(OID_SAN, names)]


def with_crl_names(tree, count, points=False):
    """A CRL Distribution Points extension of count URIs: all in one point's fullName, or
    with points, one point each."""
    uris = [[0x86, b"http://c%d.example.test/x.crl" % n] for n in range(count)]
    full = [[SEQUENCE, [[0xA0, [[0xA0, [uri]]]]]] for uri in uris] if points else \
        [[SEQUENCE, [[0xA0, [[0xA0, uris]]]]]]
    exts = extensions(tree)
    exts[1] = [e for e in exts[1] if e[1][0] != oid_node(OID_CRL_DP)] + [
        extension(OID_CRL_DP, der_encode([[SEQUENCE, full]]))]


def with_extensions(tree, count):
    """count extensions: the certificate's own, then made-up ones."""
    exts = extensions(tree)
    extra = count - len(exts[1])
    exts[1] += [extension("%s.%d" % (PRIVATE_ARC, n), b"") for n in range(extra)]


def with_oid_in(tree, node):
    """Put node (an OID) where the reader reads an OID: in a made-up extension."""
    extensions(tree)[1].append([SEQUENCE, [node, [OCTET_STRING, b""]]])


def padded_to(tree, size):
    """DER of the certificate made size bytes long by a made-up extension."""
    exts = extensions(tree)
    exts[1].append(extension(PRIVATE_ARC + ".1000", b""))
    filler = exts[1][-1][1][1]
    for _ in range(4):          # the length octets around the filler may grow with it
        filler[1] = bytes(max(0, len(filler[1]) + size - len(der_encode(tree))))
    return der_encode(tree)


# Growths: each makes one value larger than the reader's bound for it ---------------------

def grow_length(rng, tree):
    """An element's long-form length claims more than the whole certificate holds,
    up to the most 4 length octets can say."""
    node = rng.choice(all_nodes(tree))
    least = len(der_encode(tree)) + 16     # more than any container holds, even after
    claim = rng.choice([least, least + rng.randint(1, 1 << 16), 0x7FFFFFFF, 0x80000000,
                        0xFFFFFFFF, rng.randint(least, 0xFFFFFFFF)])   # this header grew
    node.append(lambda size: b"\x84" + claim.to_bytes(4, "big"))
    return der_encode(tree)


def grow_length_octets(rng, tree):
    """An element's length written in 5 to 127 octets (the reader takes 4 at most)."""
    node, count = rng.choice(all_nodes(tree)), rng.randint(5, 127)
    node.append(lambda size: bytes([0x80 | count]) + size.to_bytes(count, "big"))
    return der_encode(tree)


def grow_oid(rng, tree):
    """An OID the reader reads (algorithms, name attributes, extensions, curves) with
    an arc of thousands of digits, an arc just past the bound, or too many arcs."""
    nodes = [node for node in all_nodes(tree) if node[0] == OID]
    arc = rng.choice([10 ** rng.randint(39, 6000) + rng.randrange(1 << 64),
                      (1 << MAX_OID_ARC_BITS) + rng.randrange(1000)])
    big = oid_node([1, 2, 3, arc])
    many = oid_node([1, 2] + [rng.randint(1, 127)
                              for _ in range(rng.randint(MAX_OID_BYTES, 2000))])
    rng.choice(nodes)[1] = rng.choice([big, many])[1]
    return der_encode(tree)


def grow_integer(put, max_bits):
    """A growth that puts (with put) a positive integer of more than max_bits, up to
    LARGEST bytes, where the reader reads that integer."""
    def grow(rng, tree):
        put(tree, positive(rng, rng.randint(max_bits // 8 + 2, LARGEST)))
        return der_encode(tree)
    return grow


def grow_ec_field(rng, tree):
    """The prime of explicit curve parameters, or one of its coefficients."""
    big = positive(rng, rng.randint(MAX_EC_FIELD_BITS // 8 + 2, LARGEST))
    if rng.random() < 0.5:
        with_explicit_curve(tree, big)
    else:
        with_explicit_curve(tree, b"\x17", **{rng.choice("ab"): big})
    return der_encode(tree)


def grow_time(rng, tree):
    """notBefore or notAfter as a UTCTime or GeneralizedTime of thousands of digits."""
    digits = "".join(str(rng.randrange(10)) for _ in range(rng.randint(16, 8000)))
    rng.choice(field(tree, "validity")[1])[:] = [rng.choice([0x17, 0x18]),
                                                  (digits + "Z").encode("ascii")]
    return der_encode(tree)


def grow_nesting(rng, tree):
    """A field the reader reads wrapped in up to thousands of SEQUENCEs."""
    tbs, first = fields(tree)
    index = first + rng.randrange(6)          # serial, signature, ..., subjectPublicKeyInfo
    wrapped = der_encode([tbs[index]])
    for _ in range(rng.randint(1, 3000)):     # as bytes: der_encode would recurse as deep
        wrapped = bytes([SEQUENCE]) + der_length(len(wrapped)) + wrapped
    tbs[index] = [None, wrapped]
    return der_encode(tree)


def grow_name(rng, tree):
    """The subject or issuer with more attributes than the bound: one per RDN, all in
    one RDN, or mixed."""
    count = rng.randint(MAX_NAME_ATTRIBUTES + 1, 3000)
    per_rdn = rng.choice([[1] * count, [count], [2] * (count // 2 + 1)])
    with_name_attributes(tree, rng.choice(["subject", "issuer"]), per_rdn)
    return der_encode(tree)


def grow_sans(rng, tree):
    with_sans(tree, rng.randint(MAX_SANS + 1, 4000))
    return der_encode(tree)


def grow_crl_names(rng, tree):
    with_crl_names(tree, rng.randint(MAX_CRL_NAMES + 1, 2000), rng.random() < 0.5)
    return der_encode(tree)


def grow_extensions(rng, tree):
    with_extensions(tree, rng.randint(MAX_EXTENSIONS + 1, 2000))
    return der_encode(tree)


def grow_certificate(rng, tree):
    return padded_to(tree, MAX_CERTIFICATE + rng.randint(1, 1 << 20))


# (kind, growth, words the ParseError must hold: what was too large)
GROWTHS = [
    ("length", grow_length, "overruns"),
    ("length octets", grow_length_octets, "bad DER length"),
    ("OID", grow_oid, "object identifier"),
    ("serial", grow_integer(with_serial, MAX_SERIAL_BITS), "serial number of more than"),
    ("version", grow_integer(with_version, MAX_VERSION_BITS), "X.509 version of more than"),
    ("RSA modulus", grow_integer(with_rsa_modulus, MAX_RSA_BITS), "RSA modulus of more than"),
    ("DSA prime", grow_integer(with_dsa_prime, MAX_DSA_BITS), "DSA prime of more than"),
    ("EC field", grow_ec_field, "of more than"),
    ("time", grow_time, "validity time"),
    ("nesting", grow_nesting, "malformed certificate"),
    ("name attributes", grow_name, "name of more than"),
    ("subjectAltNames", grow_sans, "subjectAltNames"),
    ("extensions", grow_extensions, "extensions"),
    ("CRL distribution points", grow_crl_names, "CRL distribution points"),
    ("certificate size", grow_certificate, "bytes, more than"),
]


def grown(rng, ders, count):
    """count (case, kind, DER, words) tuples, seeded: every kind in turn, each growing a
    copy of one of the certificates ders."""
    trees = [der_tree(der) for der in ders]
    for case in range(count):
        kind, grow, words = GROWTHS[case % len(GROWTHS)]
        yield case, kind, grow(rng, copy.deepcopy(rng.choice(trees))), words


def outcome(certgrab, der, words):
    """None when certgrab's parse_certificate refuses der with a ParseError holding
    words; else what happened instead."""
    try:
        certgrab.parse_certificate(der)
    except certgrab.ParseError as exc:
        return None if words in str(exc) else "ParseError without %r: %s" % (words, exc)
    except Exception as exc:  # the point: any other exception is a failure to report
        return "%s: %s" % (type(exc).__name__, str(exc)[:200])
    return "read without an error"


def main(argv):
    if len(argv) < 5:
        sys.exit("usage: grow.py CERTGRAB_DIR SEED CASES DER_FILE...")
    sys.path.insert(0, argv[1])
    import certgrab
    rng, ders = random.Random(int(argv[2])), []
    for path in argv[4:]:
        with open(path, "rb") as handle:
            ders.append(handle.read())
    failures = []
    for case, kind, der, words in grown(rng, ders, int(argv[3])):
        problem = outcome(certgrab, der, words)
        if problem:
            failures.append("case %d (%s, %d bytes): %s" % (case, kind, len(der), problem))
    for failure in failures:
        print(failure)
    if not failures:
        print("ok: %s grown certificates, every one a ParseError" % argv[3])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
