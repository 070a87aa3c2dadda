"""Seeded random mutations of real certificates and TLS Certificate messages.

The DER reader and the handshake-message parser read bytes from the network, so any input
must end in a result or in certgrab's own error (CertgrabError): never IndexError, ValueError,
RecursionError, MemoryError or a hang. A failure message names the seed and case number, and
the mutated bytes in hex, so the case can be replayed.

Values grown past the reader's bounds (grow.py: lengths, OID arcs of thousands of digits,
huge serials and RSA moduli, times, nesting, counts of name attributes, SANs, extensions)
must each be a ParseError naming what was too large; each bound holds from both sides, is
the one docs/limitations.md states, and the grown cases run under Python 3.6, 3.9 and 3.13 and in the
python3-minimal roots too (grow.py as a program).

Cases per test: CERTGRAB_FUZZ_CASES, else 300 locally and 5000 when CI=true (a fifth for
the grown cases under other Pythons and in the roots). The seed: CERTGRAB_FUZZ_SEED (default 20240607).
"""

import binascii
import copy
import ipaddress
import os
import random
import struct
import subprocess

import pytest

import grow
from helpers import ROOT, TESTS, interpreter, minimal_host
from grow import all_nodes, der_encode, der_tree
from make_certs import pem_ders, read_ders

SEED = int(os.environ.get("CERTGRAB_FUZZ_SEED", "20240607"))
CHAINS = ["ec1", "ec2", "rsa1", "rsa2", "ipsan", "expired"]

pytestmark = pytest.mark.fuzz


@pytest.fixture
def parse_whole(certgrab):
    """Parse a certificate: parse_certificate reads every field."""
    return certgrab.parse_certificate


@pytest.fixture(scope="module")
def corpus(certs):
    """Every distinct DER certificate the tests make: leaves, intermediates, roots."""
    ders = []
    for chain in CHAINS:
        for der in read_ders(certs / chain / "fullchain.pem") + read_ders(
                certs / chain / "root.pem"):
            if der not in ders:
                ders.append(der)
    return ders


# Building Certificate message bodies ---------------------------------------------------------

def u24(n):
    return struct.pack(">I", n)[1:]


def tls12_body(ders):
    entries = b"".join(u24(len(d)) + d for d in ders)
    return u24(len(entries)) + entries


def tls13_body(ders, context=b"", extensions=None):
    extensions = extensions or [b""] * len(ders)
    entries = b"".join(u24(len(d)) + d + struct.pack(">H", len(e)) + e
                       for d, e in zip(ders, extensions))
    return bytes([len(context)]) + context + u24(len(entries)) + entries


# status_request extension with a tiny fake OCSP response, as a server may staple it
STAPLE = struct.pack(">HH", 5, 7) + b"\x01" + u24(3) + b"\x30\x01\x00"


def length_offsets(der):
    """Offsets of every DER length byte in der (walking constructed elements)."""
    offsets = []

    def walk(pos, end, depth):
        while pos + 2 <= end and depth < 20:
            tag, first = der[pos], der[pos + 1]
            offsets.append(pos + 1)
            if first < 0x80:
                length, header = first, 2
            else:
                n = first & 0x7F
                if n == 0 or n > 4 or pos + 2 + n > end:
                    return
                length = int.from_bytes(der[pos + 2:pos + 2 + n], "big")
                header = 2 + n
                offsets.extend(range(pos + 2, pos + 2 + n))
            if pos + header + length > end:
                return
            if tag & 0x20:
                walk(pos + header, pos + header + length, depth + 1)
            elif tag == 0x03 and length > 1 and der[pos + header] == 0:
                walk(pos + header + 1, pos + header + length, depth + 1)  # BIT STRING w/ DER
            elif tag == 0x04:
                walk(pos + header, pos + header + length, depth + 1)  # OCTET STRING wrapping
            pos += header + length

    walk(0, len(der), 0)
    return offsets


# Mutations -------------------------------------------------------------------------------

def flip_bits(rng, data, offsets):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(rng, data, offsets):
    return data[:rng.randrange(len(data))]


def insert(rng, data, offsets):
    i = rng.randrange(len(data) + 1)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data[:i] + junk + data[i:]


def delete(rng, data, offsets):
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def duplicate(rng, data, offsets):
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 64))
    return data[:j] + data[i:j] + data[j:]


def tweak_length(rng, data, offsets):
    """Set a length byte to a boundary value: 0, 0x7f, 0x80 (indefinite), 0x81..0x84, 0xff."""
    data = bytearray(data)
    offsets = [i for i in offsets if i < len(data)]  # earlier mutations may have shortened it
    for _ in range(rng.randint(1, 3)):
        i = rng.choice(offsets) if offsets else rng.randrange(len(data))
        data[i] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x88, 0xFF,
                              (data[i] + 1) & 0xFF, (data[i] - 1) & 0xFF])
    return bytes(data)


def huge_length(rng, data, offsets):
    """Replace the length at a length offset with a 4-byte length far beyond the data."""
    offsets = [i for i in offsets if i < len(data)]
    i = rng.choice(offsets) if offsets else rng.randrange(len(data))
    return data[:i] + b"\x84\x7f\xff\xff\xff" + data[i + 1:]


MUTATIONS = [flip_bits, truncate, insert, delete, duplicate, tweak_length, huge_length]


# Structure-aware mutations: change one element deep inside and re-encode every enclosing
# length, so the damage reaches the field readers (names, times, OIDs, SANs, keys) instead
# of stopping at the outermost length check. The trees are grow.py's (der_tree, der_encode).

TAGS = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x17, 0x18, 0x1E, 0x30, 0x31,
        0x80, 0x82, 0x87, 0xA0, 0xA3, 0xFF]


def structural(rng, tree, donors, rounds):
    """DER for a copy of tree after `rounds` structural changes; donors: other trees."""
    tree = copy.deepcopy(tree)
    for _ in range(rounds):
        _change_one_element(rng, rng.choice(all_nodes(tree)), donors)
    return der_encode(tree)


def _change_one_element(rng, node, donors):
    op = rng.randrange(7)
    if op == 0:  # a primitive value mutated in place (flip, cut, grow, empty)
        value = node[1] if isinstance(node[1], bytes) else der_encode(node[1])
        node[1] = rng.choice([flip_bits, truncate, insert, delete, duplicate])(
            rng, value or b"\x00", []) if value else b""
    elif op == 1:  # another tag
        node[0] = rng.choice(TAGS)
    elif op == 2 and isinstance(node[1], list) and node[1]:  # drop a child
        del node[1][rng.randrange(len(node[1]))]
    elif op == 3 and isinstance(node[1], list) and node[1]:  # repeat a child
        node[1].insert(rng.randrange(len(node[1]) + 1), copy.deepcopy(rng.choice(node[1])))
    elif op == 4 and isinstance(node[1], list) and len(node[1]) > 1:  # reorder children
        rng.shuffle(node[1])
    elif op == 5:  # graft an element from another certificate
        graft = copy.deepcopy(rng.choice(all_nodes(rng.choice(donors))))
        node[0], node[1] = graft
    else:  # odd primitive contents: empty, huge, zero-padded, non-ASCII
        node[1] = rng.choice([b"", b"\x00" * rng.randint(1, 40), b"\xff" * rng.randint(1, 40),
                              b"\x80", "é☃".encode("utf-8"), b"\x00\x00\x00\x01",
                              bytes(rng.randrange(256) for _ in range(rng.randint(1, 80)))])


def mutate(rng, data, offsets):
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            return data
        data = rng.choice(MUTATIONS)(rng, data, offsets)
    return data


def replay_note(seed, case, data):
    return "seed %d case %d input %s" % (seed, case, binascii.hexlify(data[:4096]).decode())


def only_certgrab_errors(certgrab, function, data, note):
    """Call function(data); anything but success or CertgrabError fails with a replay note."""
    try:
        return function(data)
    except certgrab.CertgrabError:
        return None
    except Exception as e:  # the point of the test: report any other exception type
        pytest.fail("%s raised %s: %s\n%s" % (function.__name__, type(e).__name__, e, note))


# The unmutated inputs parse correctly (so the fuzzing starts from meaningful data) ----------

def test_parse_certificate_reads_the_real_fields(certgrab, certs):
    leaf = certgrab.parse_certificate(read_ders(certs / "ec1" / "cert.pem")[0])
    inter = certgrab.parse_certificate(read_ders(certs / "ec1" / "chain.pem")[0])
    root = certgrab.parse_certificate(read_ders(certs / "ec1" / "root.pem")[0])
    rsa = certgrab.parse_certificate(read_ders(certs / "rsa1" / "cert.pem")[0])
    for attr in ("subject", "issuer", "serial", "not_before", "not_after", "sans", "key_type",
                 "key_bits", "spki", "is_ca"):
        assert hasattr(leaf, attr), "parse_certificate result lacks .%s" % attr
    assert "ec1 leaf" in str(leaf.subject)
    assert "ec1 intermediate" in str(leaf.issuer)
    assert leaf.issuer == inter.subject and inter.issuer == root.subject
    assert (leaf.is_ca, inter.is_ca, root.is_ca) == (False, True, True)
    assert leaf.key_bits == 256 and "EC" in leaf.key_type.upper()
    assert rsa.key_bits == 2048 and "RSA" in rsa.key_type.upper()
    assert isinstance(leaf.spki, bytes) and leaf.spki[:1] == b"\x30"
    assert leaf.spki in read_ders(certs / "ec1" / "cert.pem")[0]


def test_parse_certificate_names(certgrab, certs):
    leaf = certgrab.parse_certificate(read_ders(certs / "ec1" / "cert.pem")[0])
    names = getattr(leaf, "sans", None)
    if names is None:
        names = list(leaf.dns_names) + list(leaf.ip_addresses)
    text = " ".join(str(n) for n in names)
    for want in ("www.example.test", "example.test", "127.0.0.1"):
        assert want in text, text
    assert any(str(ipaddress.ip_address("::1")) in str(n) or "0:0:0:0:0:0:0:1" in str(n)
               for n in names), text


def test_parse_certificate_dates_in_both_encodings(certgrab, certs):
    """Leaves end in 2049 (UTCTime), roots in 2099 (GeneralizedTime)."""
    import calendar
    leaf = certgrab.parse_certificate(read_ders(certs / "ec1" / "cert.pem")[0])
    root = certgrab.parse_certificate(read_ders(certs / "ec1" / "root.pem")[0])
    newer = certgrab.parse_certificate(read_ders(certs / "ec1new" / "cert.pem")[0])

    def epoch(value):
        if hasattr(value, "timetuple"):
            return calendar.timegm(value.utctimetuple())
        return value

    assert epoch(leaf.not_before) == calendar.timegm((2024, 1, 1, 0, 0, 0))
    assert epoch(leaf.not_after) == calendar.timegm((2049, 12, 31, 23, 59, 59))
    assert epoch(root.not_after) == calendar.timegm((2099, 12, 31, 23, 59, 59))
    assert epoch(newer.not_before) > epoch(leaf.not_before)


def test_parse_certificate_serial_matches_openssl(certgrab, certs):
    path = certs / "rsa2" / "cert.pem"
    text = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-serial"],
                          stdout=subprocess.PIPE, check=True).stdout.decode()
    serial = int(text.strip().split("=", 1)[1], 16)
    parsed = certgrab.parse_certificate(read_ders(path)[0]).serial
    assert parsed == serial or str(parsed).replace(":", "").lower() == "%x" % serial


@pytest.mark.parametrize("tls13", [False, True])
def test_certificate_message_round_trip(certgrab, corpus, tls13):
    ders = corpus[:3]
    body = tls13_body(ders) if tls13 else tls12_body(ders)
    assert certgrab.parse_certificate_message(body, tls13) == ders
    if tls13:
        stapled = tls13_body(ders, extensions=[STAPLE, b"", b""])
        assert certgrab.parse_certificate_message(stapled, True) == ders


def test_pem_to_ders_round_trip(certgrab, certs):
    text = (certs / "rsa2" / "fullchain.pem").read_text()
    assert certgrab.pem_to_ders(text) == pem_ders(text)


# The fuzzing ----------------------------------------------------------------------------

def test_fuzz_parse_certificate(certgrab, parse_whole, corpus, fuzz_cases):
    """Byte-level damage: bit flips, cuts, insertions, length bytes."""
    rng = random.Random(SEED)
    offsets = [length_offsets(der) for der in corpus]
    for case in range(fuzz_cases):
        index = rng.randrange(len(corpus))
        data = mutate(rng, corpus[index], offsets[index])
        only_certgrab_errors(certgrab, parse_whole, data,
                             replay_note(SEED, case, data))


def test_fuzz_parse_certificate_structure(certgrab, parse_whole, corpus, fuzz_cases):
    """Element-level damage with consistent lengths, so the field readers see it."""
    rng = random.Random(SEED + 2)
    donors = [der_tree(der) for der in corpus]
    assert [der_encode(tree) for tree in donors] == corpus
    parsed = 0
    for case in range(fuzz_cases):
        data = structural(rng, rng.choice(donors), donors, rng.choice([1, 1, 2, 3]))
        if rng.random() < 0.1:
            data = flip_bits(rng, data, [])
        if only_certgrab_errors(certgrab, parse_whole, data,
                                replay_note(SEED + 2, case, data)) is not None:
            parsed += 1
    # Many mutations leave a certificate readable: the cases reach past the first check.
    assert parsed > fuzz_cases // 20, parsed


def test_fuzz_parse_certificate_edge_inputs(certgrab, parse_whole):
    """None of these is a certificate: each is certgrab's error, never another exception."""
    for data in [b"", b"\x30", b"\x30\x00", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff",
                 b"\x30\x03\x30\x01\x30", b"\x30" * 2000, b"\x30\x81" * 1000,
                 b"\x02\x01\x00", b"\xff" * 64, b"\x30\x02\x30\x00"]:
        assert only_certgrab_errors(certgrab, parse_whole, data,
                                    replay_note(SEED, -1, data)) is None, data[:16]


def _message_offsets(ders, tls13):
    """Offsets of every length field byte in a body built from ders."""
    offsets, pos = [], 0
    if tls13:
        offsets.append(0)
        pos = 1
    offsets.extend(range(pos, pos + 3))
    pos += 3
    for der in ders:
        offsets.extend(range(pos, pos + 3))
        pos += 3 + len(der)
        if tls13:
            offsets.extend(range(pos, pos + 2))
            pos += 2
    return offsets


@pytest.mark.parametrize("tls13", [False, True])
def test_fuzz_parse_certificate_message(certgrab, corpus, fuzz_cases, tls13):
    rng = random.Random(SEED + (13 if tls13 else 12))

    def parse(data):
        return certgrab.parse_certificate_message(data, tls13)

    parse.__name__ = "parse_certificate_message(tls13=%s)" % tls13
    for case in range(fuzz_cases):
        ders = [rng.choice(corpus) for _ in range(rng.randint(1, 4))]
        if tls13:
            context = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 0, 1, 4])))
            exts = [rng.choice([b"", b"", STAPLE]) for _ in ders]
            body = tls13_body(ders, context, exts)
            fields = [i + len(context) if i > 0 else i for i in _message_offsets(ders, True)]
        else:
            body = tls12_body(ders)
            fields = _message_offsets(ders, False)
        kind = rng.random()
        if kind < 0.4:  # a length field set to a boundary or random value
            data = bytearray(body)
            for _ in range(rng.randint(1, 3)):
                data[rng.choice(fields)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF,
                                                       rng.randrange(256)])
            data = bytes(data)
        else:
            data = mutate(rng, body, fields)
        result = only_certgrab_errors(certgrab, parse, data, replay_note(SEED, case, data))
        if result is not None:
            assert isinstance(result, list) and all(isinstance(d, bytes) for d in result)
            assert sum(len(d) for d in result) <= len(data)


@pytest.mark.parametrize("tls13", [False, True])
def test_fuzz_certificate_message_edge_inputs(certgrab, tls13):
    for data in [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00", b"\x00\x00\x00\x00",
                 b"\xff\xff\xff\xff", b"\x00\xff\xff\xff", b"\x00\x00\x00\x03\x00\x00\x00",
                 b"\x00\x00\x00\x05\x00\x00\x01\x30\xff", b"\x01" * 100, b"\x00" * 100]:
        only_certgrab_errors(certgrab, lambda d: certgrab.parse_certificate_message(d, tls13),
                             data, replay_note(SEED, -1, data))


def test_fuzz_pem_to_ders(certgrab, certs, fuzz_cases):
    rng = random.Random(SEED + 1)
    text = (certs / "ec2" / "fullchain.pem").read_text()
    for case in range(fuzz_cases // 2):
        data = bytearray(text.encode("ascii"))
        choice = rng.random()
        if choice < 0.5:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.choice(b"-=A/+\n \x00\xff!")
        elif choice < 0.8:
            data = data[:rng.randrange(len(data))]
        else:
            i = rng.randrange(len(data))
            data[i:i] = rng.choice([b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----",
                                    b"====", b"\n\n", b"\xc3\xa9"])
        mutated = bytes(data).decode("latin-1")
        only_certgrab_errors(certgrab, certgrab.pem_to_ders, mutated,
                             replay_note(SEED, case, bytes(data)))


# Values grown past the DER reader's bounds (grow.py) -------------------------------------------

def test_grown_values_are_parse_errors(certgrab, corpus, fuzz_cases):
    """Every kind of growth in turn (lengths, OID arcs, serial, version, RSA, DSA and EC
    sizes, times, nesting, name attributes, SANs, extensions, the whole certificate), each
    past its bound by a seeded amount, up to thousands of digits: a ParseError that says
    what was too large, never another exception, never read as if nothing were wrong."""
    rng = random.Random(SEED + 19)
    kinds = set()
    for case, kind, der, words in grow.grown(rng, corpus, max(fuzz_cases, 2 * len(grow.GROWTHS))):
        problem = grow.outcome(certgrab, der, words)
        assert problem is None, "%s: %s\n%s" % (kind, problem, replay_note(SEED + 19, case, der))
        kinds.add(kind)
    assert kinds == set(kind for kind, _, _ in grow.GROWTHS)


def cert_tree(certs, chain="ec1"):
    return der_tree(read_ders(certs / chain / "cert.pem")[0])


def parse_both_sides(certgrab, certs, build, at_bound, past_bound):
    """build(tree, value) at the bound and one past it: (the certificate read at the
    bound, the error past it)."""
    inside, outside = cert_tree(certs), cert_tree(certs)
    build(inside, at_bound)
    build(outside, past_bound)
    parsed = certgrab.parse_certificate(der_encode(inside))
    with pytest.raises(certgrab.ParseError) as refused:
        certgrab.parse_certificate(der_encode(outside))
    return parsed, str(refused.value)


def test_certificate_size_bound_from_both_sides(certgrab, certs):
    at = grow.padded_to(cert_tree(certs), grow.MAX_CERTIFICATE)
    past = grow.padded_to(cert_tree(certs), grow.MAX_CERTIFICATE + 1)
    assert (len(at), len(past)) == (grow.MAX_CERTIFICATE, grow.MAX_CERTIFICATE + 1)
    assert certgrab.parse_certificate(at).subject.endswith("CN=ec1 leaf")
    with pytest.raises(certgrab.ParseError, match="102401 bytes, more than 102400"):
        certgrab.parse_certificate(past)


def test_oid_bounds_from_both_sides(certgrab, certs):
    def arc(tree, value):
        grow.with_oid_in(tree, grow.oid_node([1, 3, 6, value]))

    def arcs(tree, count):
        grow.with_oid_in(tree, grow.oid_node([1, 3] + [1] * (count - 1)))

    largest = (1 << grow.MAX_OID_ARC_BITS) - 1          # 39 digits
    _, error = parse_both_sides(certgrab, certs, arc, largest, largest + 1)
    assert "an object identifier arc of more than 128 bits" in error
    _, error = parse_both_sides(certgrab, certs, arcs, grow.MAX_OID_BYTES,
                                grow.MAX_OID_BYTES + 1)
    assert "an object identifier of 64 bytes, more than 63" in error


def test_integer_bounds_from_both_sides(certgrab, certs):
    """The content octets of the largest value each bound allows, and of one bit more."""
    def top(bits):
        return ((1 << bits) - 1).to_bytes(bits // 8 + 1, "big")

    def over(bits):
        return (1 << bits).to_bytes(bits // 8 + 1, "big")

    parsed, error = parse_both_sides(certgrab, certs, grow.with_serial,
                                     top(grow.MAX_SERIAL_BITS), over(grow.MAX_SERIAL_BITS))
    assert parsed.serial.bit_length() == 512 and "serial number of more than 512 bits" in error
    for build, bound, words in ((grow.with_rsa_modulus, grow.MAX_RSA_BITS, "RSA modulus"),
                                (grow.with_dsa_prime, grow.MAX_DSA_BITS, "DSA prime")):
        parsed, error = parse_both_sides(certgrab, certs, build, top(bound), over(bound))
        assert parsed.key_bits == bound and "%s of more than %d bits" % (words, bound) in error
    parsed, error = parse_both_sides(certgrab, certs, grow.with_explicit_curve,
                                     top(grow.MAX_EC_FIELD_BITS), over(grow.MAX_EC_FIELD_BITS))
    assert (parsed.key_type, parsed.key_bits) == ("EC explicit curve", 661)
    assert "EC field prime of more than 661 bits" in error


def test_count_bounds_from_both_sides(certgrab, certs):
    def rdns(tree, count):
        grow.with_name_attributes(tree, "subject", [1] * count)

    def one_rdn(tree, count):
        grow.with_name_attributes(tree, "issuer", [count])

    for build, bound, words, read in (
            (rdns, grow.MAX_NAME_ATTRIBUTES, "a name of more than 100 attributes",
             lambda cert: cert.subject.count("CN=")),
            (one_rdn, grow.MAX_NAME_ATTRIBUTES, "a name of more than 100 attributes",
             lambda cert: cert.issuer.count("CN=")),
            (grow.with_sans, grow.MAX_SANS, "more than 1000 subjectAltNames",
             lambda cert: len(cert.dns_names)),
            (grow.with_extensions, grow.MAX_EXTENSIONS, "more than 100 extensions", None),
            (grow.with_crl_names, grow.MAX_CRL_NAMES, "more than 100 names in CRL "
             "distribution points", lambda cert: len(cert.crl_urls)),
            (lambda tree, count: grow.with_crl_names(tree, count, points=True),
             grow.MAX_CRL_NAMES, "more than 100 CRL distribution points",
             lambda cert: len(cert.crl_urls))):
        parsed, error = parse_both_sides(certgrab, certs, build, bound, bound + 1)
        assert read is None or read(parsed) == bound
        assert words in error


# How docs/limitations.md states each bound ("%s": the number, with thousands separators)
DOCS_BOUNDS = {
    "MAX_CERTIFICATE": "larger than %s KiB", "MAX_OID_BYTES": "identifier of more than %s bytes",
    "MAX_OID_ARC_BITS": "an arc of more than %s bits",
    "MAX_SERIAL_BITS": "serial number of more than %s bits",
    "MAX_VERSION_BITS": "version of more than %s bits",
    "MAX_RSA_BITS": "RSA modulus of more than %s bits",
    "MAX_DSA_BITS": "DSA prime of more than %s bits",
    "MAX_EC_FIELD_BITS": "EC parameters of more than %s bits",
    "MAX_NAME_ATTRIBUTES": "name of more than %s attributes",
    "MAX_SANS": "more than %s subjectAltNames", "MAX_EXTENSIONS": "more than %s extensions",
    "MAX_CRL_NAMES": "more than %s CRL distribution points or names in them",
}


def test_bounds_are_the_ones_the_docs_state(certgrab):
    """certgrab.py's constants, grow.py's and docs/limitations.md say the same."""
    with open(os.path.join(ROOT, "docs", "limitations.md"), encoding="utf-8") as f:
        limitations = " ".join(f.read().split())
    assert sorted(DOCS_BOUNDS) == sorted(grow.BOUNDS)
    for name in grow.BOUNDS:
        value = getattr(grow, name)
        assert getattr(certgrab, name) == value, name
        shown = DOCS_BOUNDS[name] % "{:,}".format(value // 1024 if name == "MAX_CERTIFICATE"
                                                    else value)
        assert shown in limitations, "docs/limitations.md lacks %r (%s)" % (shown, name)


# The grown cases under the oldest and newest Pythons, and on bare Debian hosts -----------------

GROW_PYTHONS = (6, 9, 13)   # python3.6, 3.9 and 3.13
ELSEWHERE = 5           # these runs take a fifth of fuzz_cases: 1,000 in CI, 70 of each kind


def cases_elsewhere(fuzz_cases):
    return max(fuzz_cases // ELSEWHERE, 2 * len(grow.GROWTHS))


def write_corpus(corpus, directory):
    paths = []
    for index, der in enumerate(corpus):
        paths.append(os.path.join(directory, "corpus-%02d.der" % index))
        with open(paths[-1], "wb") as handle:
            handle.write(der)
    return paths


def assert_all_parse_errors(completed, cases):
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert completed.stdout == "ok: %d grown certificates, every one a ParseError\n" % cases


@pytest.mark.slow
@pytest.mark.parametrize("minor", GROW_PYTHONS, ids=lambda minor: "py3.%d" % minor)
def test_grown_values_under_old_and_new_pythons(minor, corpus, fuzz_cases, tmp_path):
    """grow.py as a program: 3.6 has no int-to-text limit, 3.9 and 3.13 have it."""
    cases = cases_elsewhere(fuzz_cases)
    completed = subprocess.run(
        [interpreter(minor), os.path.join(TESTS, "grow.py"), ROOT, str(SEED + 19),
         str(cases)] + write_corpus(corpus, str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert_all_parse_errors(completed, cases)


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["bookworm", "bullseye"])
def test_grown_values_on_python3_minimal(suite, corpus, fuzz_cases):
    """The same in the Debian 12 and 11 python3-minimal roots of `make roots`."""
    grow_py = os.path.join(TESTS, "grow.py")
    with minimal_host(suite, [(grow_py, "grow.py")], prefix="certgrab-grow-") as host:
        inside = host.inside(host.scratch)
        ders = [inside + "/" + os.path.basename(path)
                for path in write_corpus(corpus, str(host.scratch))]
        cases = cases_elsewhere(fuzz_cases)
        completed = host.python(inside + "/grow.py", inside, SEED + 19, cases, *ders,
                                timeout=600)
        assert_all_parse_errors(completed, cases)
