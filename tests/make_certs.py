#!/usr/bin/env python3
"""Make the certificate chains the test suite serves, with the openssl command line tool.

Usage: python3 tests/make_certs.py OUTDIR      (or: from make_certs import generate)

Everything lands in OUTDIR; running it again on a complete OUTDIR does nothing.

    OUTDIR/root-ec/    root-rsa/    root-other/       self-signed CAs (cert.pem, key.pem)
    OUTDIR/<chain>/cert.pem       the leaf
                   chain.pem      intermediates in issuing order (the leaf's issuer first)
                   fullchain.pem  cert.pem + chain.pem
                   key.pem        the leaf's private key
                   root.pem       the root the chain ends at (not served)

    chain      root        intermediates  leaf
    ec1        root-ec     1              EC P-256, valid 2024-2049
    ec1new     root-ec     ec1's          same key as ec1, notBefore one year later (2025)
    ec1short   root-ec     ec1's          same key as ec1, issued after ec1new (2025-06) but
                                          expiring before it (2030): a 90-day -> 6-day renewal
    ec2        root-ec     2              EC P-256
    rsa1       root-rsa    1              RSA 2048
    rsa2       root-rsa    2              RSA 2048
    expired    root-ec     1              EC, valid 2020-2021 only
    wrongname  root-ec     1              EC, SAN DNS:other.example.test only
    ipsan      root-ec     1              EC, SAN IP:127.0.0.1, IP:::1 only
    unknown    root-other  1              EC, normal names, under the unrelated root

Normal leaves carry SAN DNS:www.example.test, DNS:example.test, IP:127.0.0.1, IP:::1,
basicConstraints CA:FALSE, keyUsage digitalSignature(+keyEncipherment for RSA) and
extendedKeyUsage serverAuth, so that OpenSSL's own verification passes. Roots end in 2099,
which forces GeneralizedTime encoding; leaves end in 2049 (UTCTime): the DER reader sees both.
All dates are fixed, so two runs differ only in keys and serial numbers.

NAME is the server name (www.example.test) every test passes with -n; DAY and HOUR are
seconds. Helpers for the tests, independent of certgrab's own PEM code:
    pem_ders(text) -> [DER]     read_ders(path) -> [DER]     ders_to_pem([DER]) -> text

Chains dated from today, for expiry checks (made at test time, not by generate()):
    make_dated_chain(outdir, root_dir, name, leaf_days, intermediate_days=None,
                     leaf_subject=None, intermediate_subject=None, san=NAMES, issued_ago=DAY)
        a fresh intermediate and leaf under the root in root_dir (e.g. OUTDIR/root-ec) whose
        leaf expires leaf_days from now (its intermediate intermediate_days from now, else in
        2099) and was issued issued_ago seconds ago (0: now), written to outdir/name like the
        chains above. Subjects are lists of (attribute, value) and may hold any text: shell
        syntax, control characters, UTF-8.

Chains whose path a name search gets wrong (issue 19), also made at test time:
    make_cross_signed(outdir, root_dir, name)
        an intermediate served cross-signed (with its second CA) before the direct one
    make_lookalike(outdir, chain_dir, name, kind, count=1)
        chain_dir served with look-alikes of its intermediate (same subject and key id,
        another key) right after the leaf
    make_direct_leaf(outdir, root_dir, name)
        a leaf the root issued itself: chain.pem is empty
"""

import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HOUR = 3600  # seconds
DAY = 24 * HOUR  # seconds
NAME = "www.example.test"  # the server name the normal leaves carry: the tests' -n NAME
NAMES = "DNS:%s,DNS:example.test,IP:127.0.0.1,IP:::1" % NAME

# (chain, root, number of intermediates, key type, SAN, leaf startdate, leaf enddate)
CHAINS = [
    ("ec1", "root-ec", 1, "ec", NAMES, "20240101000000Z", "20491231235959Z"),
    ("ec2", "root-ec", 2, "ec", NAMES, "20240101000000Z", "20491231235959Z"),
    ("rsa1", "root-rsa", 1, "rsa", NAMES, "20240101000000Z", "20491231235959Z"),
    ("rsa2", "root-rsa", 2, "rsa", NAMES, "20240101000000Z", "20491231235959Z"),
    ("expired", "root-ec", 1, "ec", NAMES, "20200101000000Z", "20210101000000Z"),
    ("wrongname", "root-ec", 1, "ec", "DNS:other.example.test", "20240101000000Z",
     "20491231235959Z"),
    ("ipsan", "root-ec", 1, "ec", "IP:127.0.0.1,IP:::1", "20240101000000Z", "20491231235959Z"),
    ("unknown", "root-other", 1, "ec", NAMES, "20240101000000Z", "20491231235959Z"),
]
ROOTS = [("root-ec", "ec"), ("root-rsa", "rsa"), ("root-other", "ec")]
ROOT_DATES = ("20180101000000Z", "20991231235959Z")
INTERMEDIATE_DATES = ("20190101000000Z", "20991231235959Z")
EC1NEW_DATES = ("20250101000000Z", "20491231235959Z")
EC1SHORT_DATES = ("20250601000000Z", "20300101000000Z")  # later notBefore, earlier notAfter
DONE_MARKER = ".complete"

CA_CONFIG = """\
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir
rand_serial = yes
default_md = sha256
policy = policy_anything
unique_subject = no
email_in_dn = no
preserve = yes
copy_extensions = none
[ policy_anything ]
organizationName = optional
commonName = supplied
[ req ]
distinguished_name = req_dn
prompt = no
[ req_dn ]
CN = unused
"""

EXTENSIONS = """\
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ intermediate_with_sub ]
basicConstraints = critical, CA:TRUE, pathlen:1
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ leaf_ec ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = ${{ENV::SAN}}
[ leaf_rsa ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = ${{ENV::SAN}}
"""

KEY_OPTIONS = {
    "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-newkey", "rsa:2048"],
}


PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\s*(.*?)-----END CERTIFICATE-----", re.S)


def pem_ders(text):
    """The DER bytes of every CERTIFICATE block in text (str), in order."""
    return [base64.b64decode("".join(body.split())) for body in PEM_BLOCK.findall(text)]


def read_ders(path):
    """The DER certificates of a PEM file."""
    with open(str(path)) as f:
        return pem_ders(f.read())


def ders_to_pem(ders):
    """PEM text for DER certificates, 64 columns, the way openssl writes it."""
    out = []
    for der in ders:
        b64 = base64.b64encode(der).decode("ascii")
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        out.append("-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n"
                   % "\n".join(lines))
    return "".join(out)


def openssl(*args, env=None, input=None):
    """Run one openssl command (env: variables added to ours; input: bytes for its stdin);
    its stdout (bytes), or RuntimeError with its stderr when it fails."""
    args = [str(a) for a in args]
    run_env = dict(os.environ)
    run_env.update(env or {})
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    proc = subprocess.run(["openssl"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=run_env, timeout=60, **stdin)
    if proc.returncode != 0:
        raise RuntimeError("openssl %s failed:\n%s" % (" ".join(args),
                                                       proc.stderr.decode(errors="replace")))
    return proc.stdout


class _Workdir(object):
    """A scratch directory holding one small `openssl ca` database and the config files."""

    def __init__(self, path):
        self.path = path
        os.makedirs(path)
        open(os.path.join(path, "index.txt"), "w").close()
        self.config = os.path.join(path, "ca.cnf")
        with open(self.config, "w") as f:
            f.write(CA_CONFIG.format(dir=path))
        self.extfile = os.path.join(path, "ext.cnf")
        with open(self.extfile, "w") as f:
            f.write(EXTENSIONS.format())
        self.counter = 0

    def tmp(self, suffix):
        self.counter += 1
        return os.path.join(self.path, "%d%s" % (self.counter, suffix))


def _request(work, cn, keytype, keyfile=None):
    """Make a CSR (and a new key unless keyfile is given); return (csr path, key path)."""
    csr = work.tmp(".csr")
    args = ["req", "-new", "-config", work.config, "-subj", "/O=certgrab tests/CN=%s" % cn,
            "-out", csr]
    if keyfile:
        args += ["-key", keyfile]
    else:
        keyfile = work.tmp(".key")
        args += KEY_OPTIONS[keytype] + ["-nodes", "-keyout", keyfile]
    openssl(*args)
    return csr, keyfile


def _sign(work, csr, extensions, dates, issuer=None, san="", extfile=None):
    """Issue a certificate for csr with `openssl ca`; self-signed when issuer is None.
    extensions names a section of EXTENSIONS, or of extfile when given."""
    out = work.tmp(".pem")
    args = ["ca", "-batch", "-notext", "-config", work.config, "-in", csr, "-out", out,
            "-extfile", extfile or work.extfile, "-extensions", extensions,
            "-startdate", dates[0], "-enddate", dates[1]]
    if issuer is None:
        args += ["-selfsign", "-keyfile", work.selfsign_key]
    else:
        args += ["-cert", issuer[0], "-keyfile", issuer[1]]
    openssl(*args, env={"SAN": san or "DNS:unused.example.test"})
    with open(out) as f:
        return f.read()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _make_root(outdir, scratch, name, keytype):
    work = _Workdir(os.path.join(scratch, name))
    csr, key = _request(work, "certgrab test %s" % name, keytype)
    work.selfsign_key = key
    pem = _sign(work, csr, "root", ROOT_DATES)
    target = os.path.join(outdir, name)
    os.makedirs(target, exist_ok=True)
    _write(os.path.join(target, "cert.pem"), pem)
    with open(key) as f:
        _write(os.path.join(target, "key.pem"), f.read())


def _make_chain(outdir, scratch, spec):
    """Make one chain directory from a CHAINS entry."""
    name, root, depth, keytype, san, start, end = spec
    work = _Workdir(os.path.join(scratch, name))
    root_dir = os.path.join(outdir, root)
    issuer = (os.path.join(root_dir, "cert.pem"), os.path.join(root_dir, "key.pem"))
    intermediates = []  # in order of issuance: the root's child first
    for level in range(depth):
        csr, key = _request(work, "certgrab test %s intermediate %d" % (name, level + 1), keytype)
        ext = "intermediate" if level == depth - 1 else "intermediate_with_sub"
        pem = _sign(work, csr, ext, INTERMEDIATE_DATES, issuer)
        cert = work.tmp(".pem")
        _write(cert, pem)
        intermediates.append(pem)
        issuer = (cert, key)
    csr, leaf_key = _request(work, "%s leaf" % name, keytype)
    leaf = _sign(work, csr, "leaf_" + keytype, (start, end), issuer, san)
    chain = "".join(reversed(intermediates))  # the leaf's issuer first
    with open(leaf_key) as f:
        key_text = f.read()
    with open(os.path.join(root_dir, "cert.pem")) as f:
        root_text = f.read()
    _write_chain_dir(os.path.join(outdir, name), leaf, chain, key_text, root_text)
    if name == "ec1":
        newer = _sign(work, csr, "leaf_ec", EC1NEW_DATES, issuer, san)
        _write_chain_dir(os.path.join(outdir, "ec1new"), newer, chain, key_text, root_text)
        short = _sign(work, csr, "leaf_ec", EC1SHORT_DATES, issuer, san)
        _write_chain_dir(os.path.join(outdir, "ec1short"), short, chain, key_text, root_text)


def _write_chain_dir(target, leaf, chain, key, root):
    os.makedirs(target, exist_ok=True)
    _write(os.path.join(target, "cert.pem"), leaf)
    _write(os.path.join(target, "chain.pem"), chain)
    _write(os.path.join(target, "fullchain.pem"), leaf + chain)
    _write(os.path.join(target, "key.pem"), key)
    _write(os.path.join(target, "root.pem"), root)


def _run_parallel(jobs):
    """Run callables in threads (openssl processes do the work); re-raise the first failure."""
    errors = []

    def wrap(job):
        try:
            job()
        except Exception as e:  # collected and re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def generate(outdir):
    """Create every chain under outdir (a str or Path); return outdir. Idempotent."""
    outdir = os.path.abspath(str(outdir))
    if os.path.exists(os.path.join(outdir, DONE_MARKER)):
        return outdir
    os.makedirs(outdir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="work-", dir=outdir)
    _run_parallel([lambda r=r: _make_root(outdir, scratch, *r) for r in ROOTS])
    _run_parallel([lambda c=c: _make_chain(outdir, scratch, c) for c in CHAINS])
    subprocess.run(["rm", "-rf", scratch], check=True)
    _write(os.path.join(outdir, DONE_MARKER), "")
    return outdir


# ---------------------------------------------------------------- chains dated from today

DATED_SLACK = HOUR  # seconds added to each end date, so "expires in N days" still says N


def subject_arg(pairs):
    """The `openssl req -subj` text for [(attribute, value)]: \\, / and + escaped."""
    return "".join("/%s=%s" % (attribute, re.sub(r"([\\/+])", r"\\\1", value))
                   for attribute, value in pairs)


def _request_subject(work, pairs, keytype):
    """A CSR with a new key for a subject of any characters (UTF-8); (csr, key) paths."""
    csr, key = work.tmp(".csr"), work.tmp(".key")
    openssl("req", "-new", "-utf8", "-config", work.config, "-subj", subject_arg(pairs),
            "-out", csr, *KEY_OPTIONS[keytype], "-nodes", "-keyout", key)
    return csr, key


def _stamp(epoch):
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(epoch))


def _dates_from_now(days, now, issued_ago=DAY):
    """(startdate, enddate) for openssl ca: from issued_ago seconds ago (a day unless
    told) to `days` days from now."""
    return _stamp(now - issued_ago), _stamp(now + days * DAY + DATED_SLACK)


def make_dated_chain(outdir, root_dir, name, leaf_days, intermediate_days=None,
                     leaf_subject=None, intermediate_subject=None, san=NAMES, issued_ago=DAY):
    """Make outdir/name: an EC chain under root_dir whose leaf expires leaf_days from now
    and was issued issued_ago seconds ago."""
    now = time.time()
    outdir, root_dir = os.path.abspath(str(outdir)), os.path.abspath(str(root_dir))
    work = _Workdir(tempfile.mkdtemp(prefix="work-%s-" % name, dir=outdir) + "/ca")
    root = (os.path.join(root_dir, "cert.pem"), os.path.join(root_dir, "key.pem"))
    csr, key = _request_subject(work, intermediate_subject or [
        ("O", "certgrab tests"), ("CN", "certgrab test %s intermediate" % name)], "ec")
    dates = INTERMEDIATE_DATES if intermediate_days is None else \
        _dates_from_now(intermediate_days, now)
    intermediate = _sign(work, csr, "intermediate", dates, root)
    intermediate_path = work.tmp(".pem")
    _write(intermediate_path, intermediate)
    csr, leaf_key = _request_subject(work, leaf_subject or [
        ("O", "certgrab tests"), ("CN", "%s leaf" % name)], "ec")
    leaf = _sign(work, csr, "leaf_ec", _dates_from_now(leaf_days, now, issued_ago),
                 (intermediate_path, key), san)
    with open(leaf_key) as f:
        key_text = f.read()
    with open(root[0]) as f:
        root_text = f.read()
    _write_chain_dir(os.path.join(outdir, name), leaf, intermediate, key_text, root_text)
    subprocess.run(["rm", "-rf", os.path.dirname(work.path)], check=True)
    return os.path.join(outdir, name)


# ------------------------------------------------- look-alike and cross-signed intermediates

LOOKALIKE_EXTENSIONS = """\
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = {root_ski}
[ intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = {ski}
authorityKeyIdentifier = keyid:always
"""
LOOKALIKE_DATES = {"rsa": INTERMEDIATE_DATES, "expired": ("20200101000000Z", "20210101000000Z")}


def _certificate_field(pem_path, *args):
    """What `openssl x509 -noout ARGS` prints about a certificate, after its first line
    (for -ext) or after "subject=" (for -subject)."""
    text = openssl("x509", "-in", pem_path, "-noout", *args).decode()
    return text.split("=", 1)[1].strip() if args[0] == "-subject" else \
        text.splitlines()[1].strip()


def _subject_pairs(pem_path):
    """[(attribute, value)] of a certificate's subject, in encoded order (no commas in
    the values of these tests' names)."""
    rfc2253 = _certificate_field(pem_path, "-subject", "-nameopt", "RFC2253")
    return [tuple(part.split("=", 1)) for part in reversed(rfc2253.split(","))]


def make_lookalike(outdir, chain_dir, name, kind, count=1):
    """outdir/name: chain_dir's chain, served with count look-alikes of the leaf's issuer
    right after the leaf.

    A look-alike has the subject and subject key identifier of the certificate served
    after the leaf (the real intermediate) but another key, and is issued by a fake root
    that has the real root's subject and key identifier (an attacker holds the leaf's
    key, not a CA's). kind "rsa": an RSA key where the real one is EC, valid dates
    (OpenSSL skips an issuer whose key type cannot have signed the leaf); kind "expired":
    an EC key valid in 2020 only (OpenSSL prefers an issuer within its dates). Several
    look-alikes share one key and differ in serial. Files: served.pem (the leaf, the
    look-alikes, then the rest of chain_dir's served.pem, or of its fullchain.pem),
    lookalike.pem (the look-alikes), and cert.pem, chain.pem (the path OpenSSL builds),
    fullchain.pem, key.pem, root.pem copied from chain_dir."""
    chain_dir, target = str(chain_dir), os.path.join(os.path.abspath(str(outdir)), name)
    os.makedirs(target)
    for each in ("cert.pem", "chain.pem", "fullchain.pem", "key.pem", "root.pem"):
        with open(os.path.join(chain_dir, each)) as f:
            _write(os.path.join(target, each), f.read())
    served_file = os.path.join(chain_dir, "served.pem")
    served = read_ders(served_file if os.path.exists(served_file)
                       else os.path.join(chain_dir, "fullchain.pem"))
    real = os.path.join(target, "real.pem")
    _write(real, ders_to_pem(served[1:2]))
    root = os.path.join(target, "root.pem")
    work = _Workdir(tempfile.mkdtemp(prefix="work-%s-" % name, dir=target) + "/ca")
    extfile = work.tmp(".cnf")
    _write(extfile, LOOKALIKE_EXTENSIONS.format(
        root_ski=_certificate_field(root, "-ext", "subjectKeyIdentifier"),
        ski=_certificate_field(real, "-ext", "subjectKeyIdentifier")))
    csr, work.selfsign_key = _request_subject(work, _subject_pairs(root), "ec")
    fake_root = work.tmp(".pem")
    _write(fake_root, _sign(work, csr, "root", ROOT_DATES, extfile=extfile))
    csr, _ = _request_subject(work, _subject_pairs(real), "rsa" if kind == "rsa" else "ec")
    lookalikes = "".join(_sign(work, csr, "intermediate", LOOKALIKE_DATES[kind],
                               (fake_root, work.selfsign_key), extfile=extfile)
                         for _ in range(count))
    _write(os.path.join(target, "lookalike.pem"), lookalikes)
    _write(os.path.join(target, "served.pem"),
           ders_to_pem(served[:1]) + lookalikes + ders_to_pem(served[1:]))
    subprocess.run(["rm", "-rf", os.path.dirname(work.path), real], check=True)
    return target


def make_cross_signed(outdir, root_dir, name):
    """outdir/name: an EC chain under root_dir whose intermediate is served twice: first
    cross-signed by a second CA under the same root (same subject, same key), with that CA,
    and then as the root issued it. Served: leaf, cross-signed, second CA, intermediate.
    OpenSSL's search takes the first issuer served that is within its dates, so it
    verifies leaf, cross-signed, second CA, root, though leaf, intermediate, root is
    shorter. chain.pem holds the path OpenSSL builds (cross-signed, second CA); served.pem
    what the server sends; the rest as make_dated_chain."""
    outdir, root_dir = os.path.abspath(str(outdir)), os.path.abspath(str(root_dir))
    work = _Workdir(tempfile.mkdtemp(prefix="work-%s-" % name, dir=outdir) + "/ca")
    root = (os.path.join(root_dir, "cert.pem"), os.path.join(root_dir, "key.pem"))
    csr, key = _request(work, "certgrab test %s intermediate" % name, "ec")
    direct = _sign(work, csr, "intermediate", INTERMEDIATE_DATES, root)
    second_csr, second_key = _request(work, "certgrab test %s second CA" % name, "ec")
    second = work.tmp(".pem")
    _write(second, _sign(work, second_csr, "intermediate_with_sub", INTERMEDIATE_DATES, root))
    cross = _sign(work, csr, "intermediate", INTERMEDIATE_DATES, (second, second_key))
    issuer = work.tmp(".pem")
    _write(issuer, direct)
    leaf_csr, leaf_key = _request(work, "%s leaf" % name, "ec")
    leaf = _sign(work, leaf_csr, "leaf_ec", ("20240101000000Z", "20491231235959Z"),
                 (issuer, key), NAMES)
    with open(leaf_key) as f:
        key_text = f.read()
    with open(root[0]) as f:
        root_text = f.read()
    with open(second) as f:
        second_text = f.read()
    target = os.path.join(outdir, name)
    _write_chain_dir(target, leaf, cross + second_text, key_text, root_text)
    _write(os.path.join(target, "served.pem"), leaf + cross + second_text + direct)
    subprocess.run(["rm", "-rf", os.path.dirname(work.path)], check=True)
    return target


def make_direct_leaf(outdir, root_dir, name):
    """outdir/name: an EC leaf issued by the root in root_dir itself (no intermediate; an
    empty chain.pem), files as make_dated_chain."""
    outdir, root_dir = os.path.abspath(str(outdir)), os.path.abspath(str(root_dir))
    work = _Workdir(tempfile.mkdtemp(prefix="work-%s-" % name, dir=outdir) + "/ca")
    root = (os.path.join(root_dir, "cert.pem"), os.path.join(root_dir, "key.pem"))
    csr, key = _request(work, "%s leaf" % name, "ec")
    leaf = _sign(work, csr, "leaf_ec", ("20240101000000Z", "20491231235959Z"), root, NAMES)
    with open(key) as f:
        key_text = f.read()
    with open(root[0]) as f:
        root_text = f.read()
    _write_chain_dir(os.path.join(outdir, name), leaf, "", key_text, root_text)
    subprocess.run(["rm", "-rf", os.path.dirname(work.path)], check=True)
    return os.path.join(outdir, name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_certs.py OUTDIR")
    print(generate(sys.argv[1]))
