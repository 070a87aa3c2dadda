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
        --out-dir /etc/ssl/example --deploy-hook 'systemctl reload nginx' -q \\
        --prometheus /var/lib/prometheus/node-exporter/certgrab-example.prom
    certgrab.py --check 203.0.113.7 -n www.example.com --warn 36h --crit 10%
    certgrab.py --config /etc/certgrab/certgrab.conf --syslog    (a section per certificate)

Runs on CPython 3.6 to 3.13 with the standard library only, including Debian's
python3-minimal (no json, shutil, ctypes; no CA store: pass --cafile there).
The file reads in the order a run flows: Compatibility, Constants, Errors and
messages, Certificates, Keys, Sources and connecting, STARTTLS, TLS, Several
sources, Install, Reports, Metrics for Prometheus, Command line, Config file,
and main() with the one run it steps through (run_one) last.

Pipeline
    SOURCE ... --parse--> host, port, name --TCP--> socket --STARTTLS?--> dialogue
    (--all-addresses: a host name --DNS--> a source per address, the name as SNI)
                                                                             |
        one thread per source, one deadline (--timeout) per source           v
    served chain (DER, as sent) <-- read per Python version <-- TLS handshake, SNI=name
        |                            (new_chain_reader)
        +--> every certificate parsed whole: structure, names, dates, keys, SANs
        +--> intermediates the server left out but verification found: completed
        +--> gate: verified, key matches a --key-path, leaf covers the name, in date
        +--> newest passing leaf (notBefore) of all sources
        +--> stdout: the chain exactly as served (PEM, leaf first), or
        +--> files, under a lock on their directory: not older than installed,
             not younger than --min-age, only what changed (privkey.pem too, with
             --privkey), temp file + fsync + rename --> --deploy-hook --> --confirm:
             the service serves the new leaf, or the previous files go back

Security model
    - Verification is on by default: the chain must lead to a trusted root (the
      system store, or --cafile/--capath) and the leaf must cover --servername
      (or the IP address dialled). --insecure turns this off and says so.
    - Before files are written the leaf must also match --key-path (one of them,
      when given twice for a key rollover), cover the name (even with --insecure),
      be within its dates and not be older than the newest leaf in any output; an
      output that is not a readable certificate file refuses every chain (--force
      overrides only these last two checks). Files get the complete issuing path: never
      less than a browser needs, even when the server left intermediates out.
    - Nothing is written unless every step before it succeeded; a file is either
      the old version or the new one, never half of each. New certificate files
      get mode 0644 (--mode), the files with the key (--combined-path, and
      privkey.pem with --privkey) 0600; an existing file keeps its mode and owner;
      nothing is ever group- or world-writable, executable or set-id.
    - The private key is read only to compare its public half. Never print or
      copy the private key except into the files that ask for it: --combined-path
      and privkey.pem (--privkey), which get the --key-path the leaf matched.
    - The deploy hook gets its context in environment variables, never by
      formatting certificate text into a command line.
    - --confirm keeps the previous version of each output it replaces beside it
      (.NAME.certgrab-previous, 0600, until the service is confirmed to serve
      the new files) and records a rolled-back leaf beside the first output
      (.NAME.certgrab-rolled-back, 0600); both are read only as regular files of
      this user that no one else may write, never through a link.
    - Everything read from the network is bounded in size and time, and every
      certificate is parsed whole by the small DER reader below before it is
      trusted with anything: a malformed one is that source's error.

Exit codes
    0  success: chain verified and written (and the hook run), or up to date,
       or a new leaf held back by --min-age (files and hook left alone)
    2  usage error: bad option, SOURCE, port; unusable or unreadable --cafile,
       --key-path
    3  cannot fetch: connection refused/timed out, not TLS, TLS failure
    4  verification failed: unknown issuer, expired, name mismatch
    5  cannot write: the previous files are unchanged, or (the hint says which)
       some are new and the next run completes the set
    6  refused by a safety check: key mismatch, name, dates, not newer, or an
       output that is not a readable certificate file; files untouched
    7  files installed, deploy hook pending: it failed, timed out, or ran but
       could not be recorded (the next run runs it again); with --confirm also:
       the service does not serve the new leaf after the hook (the hook stays
       pending), or it completed no TLS handshake at all: the previous files
       are back, and each run refuses that leaf (7) until a newer one or --force
    With --check, --same or --expect-file, a monitoring plugin's codes instead:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (e.g. a usage error).
    With --config, the highest code of its sections (2 for a mistake in the file).
"""

__version__ = "0.2.0"

import argparse
import binascii
import errno
import hashlib
import os
import socket
import ssl
import stat
import sys
import threading
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


# 3.10+ can also give the path OpenSSL verified; older Pythons rebuild it.
HAS_VERIFIED_CHAIN = hasattr(ssl._ssl._SSLSocket, "get_verified_chain")


def new_chain_reader(ctx, trust, by_key_kind=None):
    """The chain reader for this Python: ChainReader on 3.10+, where the ssl
    module gives both chains; ChainReaderBefore310 (msg_callback or ctypes,
    see chain_method) on 3.6 to 3.9. Both are in the TLS section."""
    if HAS_VERIFIED_CHAIN:
        return ChainReader(ctx, trust, by_key_kind)
    return ChainReaderBefore310(ctx, trust, by_key_kind)


def open_file_limit(wanted):
    """How many files this process may open, after raising its soft limit toward
    wanted (never past the hard limit, and only when it is lower). The resource
    module does it where it exists. Debian's python3-minimal lacks it: there the
    soft limit is read with sysconf and cannot be raised; where even that cannot
    say, ASSUMED_FILE_LIMIT is assumed."""
    try:
        import resource
    except ImportError:
        return _sysconf_file_limit(wanted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and soft < wanted:
        raised = wanted if hard == unlimited else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):   # e.g. macOS caps it at OPEN_MAX
            pass
    return wanted if soft == unlimited else soft


def _sysconf_file_limit(wanted):
    try:
        soft = os.sysconf("SC_OPEN_MAX")        # the soft RLIMIT_NOFILE; -1: unlimited
    except (ValueError, OSError, AttributeError):
        return ASSUMED_FILE_LIMIT
    return wanted if soft < 0 else soft


def limit_to_tls12(ctx):
    if hasattr(ctx, "maximum_version"):                       # 3.7+
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.options |= getattr(ssl, "OP_NO_TLSv1_3", 0x20000000)


TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")   # what --tls-min and --tls-max accept


def limit_tls_versions(ctx, minimum, maximum):
    """--tls-min and --tls-max: TLSVersion on 3.7+, OP_NO_* options on 3.6.
    Versions compare as text: "1.0" < "1.1" < "1.2" < "1.3"."""
    names = dict(zip(TLS_VERSIONS, ("TLSv1", "TLSv1_1", "TLSv1_2", "TLSv1_3")))
    if hasattr(ctx, "minimum_version"):                       # 3.7+
        if minimum:
            ctx.minimum_version = getattr(ssl.TLSVersion, names[minimum])
        if maximum:
            ctx.maximum_version = getattr(ssl.TLSVersion, names[maximum])
        return
    for version in TLS_VERSIONS:
        if minimum and version < minimum or maximum and version > maximum:
            ctx.options |= getattr(ssl, "OP_NO_" + names[version], 0)


# Python 3.6 reports every verification failure as a plain SSLError with this
# reason, and a name mismatch as ssl.CertificateError (a ValueError).
VERIFY_FAILED_REASON = "CERTIFICATE_VERIFY_FAILED"
# Python 3.6 checks the name in Python code, which needs a str; later ones take
# ASCII bytes (a str would make them import the idna codec).
NAME_AS_STR = sys.version_info < (3, 7)


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_PORT = 443
DEFAULT_TIMEOUT = 10.0  # seconds; one deadline per source: DNS, connect and handshake
MAX_CHAIN = 20          # certificates a server may send; real chains have 2 to 5
MAX_FILE = 1 << 20      # bytes read from a key, password, --config, --expect-file or output
MAX_LOCAL_FILE = 8 << 20  # bytes of a local certificate file (SOURCE): 1000 PEM are ~2 MiB
MAX_LOCAL_CERTS = 1000  # certificates read from one local file: a CA bundle holds ~150
DEFAULT_PARALLEL = 256  # sources fetched at once by default (--parallel): 1,024 sources at
                        # 100 ms RTT take ~2 s; wider gains little, as the handshakes'
                        # CPU (~1.5 ms each) then bounds the run
PARALLEL_LIMIT = 1024   # the most --parallel accepts: one thread per source fetched at once
SECTIONS_AT_ONCE = 8    # sections run concurrently at most; each opens --parallel connections
FILES_PER_FETCH = 2     # descriptors one fetch may hold at once: its socket, and a DNS
                        # lookup's socket or a --capath file OpenSSL opens to verify
FILES_KEPT = 32         # descriptors left for the rest: stdio, --cafile, key, locks, hook
ASSUMED_FILE_LIMIT = 1024  # open files allowed when the system cannot say (a common default)
NO_FILE_WAIT = 0.05     # seconds between tries for a socket while no descriptor is free
PROGRESS_FROM = 8       # sources; from this many on, a terminal sees progress
PROGRESS_EVERY = 0.1    # seconds between updates of the progress line
MINUTE, HOUR, DAY = 60, 3600, 86400  # seconds
WARN_SHARE = 0.2        # --check default: WARNING under a fifth of a certificate's lifetime
CRIT_SHARE = 0.1        # left, CRITICAL under a tenth. ACME clients renew at a third left
                        # (half under 10 days: certbot 4): a fifth left is a renewal overdue
                        # by 12 days of 90 or 43 hours of 6, and a 6-day certificate is
                        # CRITICAL with 14.4 hours left. README: "Short-lived certificates".
DURATION_UNITS = {"s": 1, "m": MINUTE, "h": HOUR, "d": DAY}  # --warn/--crit 90m, 36h, 2d
HOURS_BELOW = 7 * DAY   # seconds; spans shorter than a week are told in days and hours
MAX_NAMES_SHOWN = 3     # SANs that name a certificate with an empty subject in a message
METRICS_TEMP_STALE = 3600  # seconds; an older temp beside --prometheus FILE is a killed run's
NEW_FILE_MODE = 0o644   # certificates are public; never group- or world-writable
DIR_MODE = 0o755        # for a missing output directory
TEMP_MARK = ".certgrab-tmp-"  # in the names of temporary files beside the outputs
HOOK_TIMEOUT = 300.0    # seconds a --deploy-hook may run before it is killed
HOOK_PENDING_MTIME = 1  # mtime (1970-01-01T00:00:01Z) of files whose hook has not yet run
CONFIRM_TIMEOUT = 30.0  # seconds --confirm waits for the service to serve the new leaf: a
                        # reload takes a second or two; a restart of a big service longer
CONFIRM_INTERVAL = 1.0  # seconds between two tries of --confirm on one service
PREVIOUS_MARK = ".certgrab-previous"  # ".NAME" + this, beside an output: its version before
                        # an install that --confirm has not yet confirmed (0600)
ROLLED_BACK_MARK = ".certgrab-rolled-back"  # ".NAME" + this, beside the first output: the
                        # leaf that broke the service and was rolled back (PEM, 0600)
LOCK_POLL = 0.05        # seconds between tries for a directory lock another run holds
LOCK_SLACK = 30.0       # seconds, beyond that run's own timeouts, before giving up on it
MAX_LINE = 8192         # bytes; a STARTTLS reply line longer than this is hostile
MAX_PLAINTEXT = 65536   # bytes a server may send before TLS starts
MAX_REPLY_LINES = 200   # lines in one STARTTLS reply (capability lists are a few dozen)
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")

FEWER_AT_ONCE = "too many sources at once for this host's limits: raise the open-files " \
    "limit (ulimit -n) or pass a lower --parallel"
OUT_DIR_FILES = ("cert.pem", "chain.pem", "fullchain.pem")  # certbot's names
PRIVKEY_FILE = "privkey.pem"  # certbot's name for the key; in --out-dir with --privkey
CERTIFICATE_SUFFIXES = (".pem", ".crt", ".cer")  # a SOURCE with one of these is a file
NAGIOS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # a monitoring plugin's states, 0 to 3
NAGIOS_UNKNOWN = 3      # a monitoring plugin's exit code for "could not even check"
TEXT_WIDTH = 64         # characters of a --text value column: lines stay within 80


# ---------------------------------------------------------------------------
# Errors and messages: library code raises; only main() turns errors into
# exit codes. Every line for people goes through one Reporter.
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

    def __init__(self, message, hint=None, reason=None):
        CertgrabError.__init__(self, message, hint)
        self.reason = reason            # OpenSSL's words, for reports


class WriteError(CertgrabError):
    exit_code = 5


class RefusedError(CertgrabError):
    """A safety check refused the chain: wrong key, name, validity, or older."""
    exit_code = 6


class HookError(CertgrabError):
    exit_code = 7


class ConfirmError(HookError):
    """--confirm: the service did not take the new leaf. outcome is "not_confirmed"
    (the hook stays pending) or "restored" (the previous files are back, and that
    leaf is not installed again): a code for metrics and syslog, never message text."""

    def __init__(self, message, outcome, hint=None):
        HookError.__init__(self, message, hint)
        self.outcome = outcome


class InputError(CertgrabError):
    """A file named on the command line exists but cannot be read: exit 2 without the
    usage hint, since --help cannot fix an I/O error."""
    exit_code = 2


class Reporter(object):
    """stderr lines for people: errors always, warnings unless quiet, details
    when verbose. A message that cannot be written (stderr closed, or cron's
    output on a full disk) is dropped: it never changes what a run does."""

    def __init__(self, quiet=False, verbose=False, syslog=None):
        self.quiet, self.verbose = quiet, verbose
        self.syslog = syslog                # the syslog module with --syslog, else None
        self.subject, self.result = "", ""  # what was checked, and how it went
        self.started = time.monotonic()

    def error(self, exc):
        self._write("certgrab: %s\n" % exc)
        if exc.hint:
            self.hint(exc.hint)

    def hint(self, text):
        self._write("certgrab: hint: %s\n" % text)

    def warn(self, message):
        if not self.quiet:
            self._write("certgrab: warning: %s\n" % message)

    def say(self, message):
        if not self.quiet:
            self._write("certgrab: %s\n" % message)

    def notice(self, message):
        """A line even under -q: it explains an action cron's log would otherwise not."""
        self._write("certgrab: %s\n" % message)

    def info(self, message):
        if self.verbose:
            self._write("certgrab: %s\n" % message)

    def progress(self, text):
        """A line that rewrites itself on a terminal."""
        self._write(text)

    def _write(self, text):
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):       # ValueError: stderr was closed
            pass

    def checking(self, subject):
        """What this run (or section) checks, for its --syslog line."""
        self.subject = subject

    def outcome(self, text):
        """How it went when it did not fail: "unchanged", "installed sha256:..."."""
        self.result = text

    def log(self, code, exc=None):
        """--syslog: the one line of this run or section: what was checked, the
        outcome (or why it failed), its exit code and the time it took."""
        if self.syslog is None:
            return
        if exc is not None:
            kind = exc.outcome.replace("_", " ") if isinstance(exc, ConfirmError) else \
                "refused" if isinstance(exc, RefusedError) else \
                "hook failed" if isinstance(exc, HookError) else "failed"
            outcome = "%s: %s" % (kind, exc)
        else:
            outcome = self.result or "done"
        line = "%s%s; exit %d; %.2f s" % (self.subject + ": " if self.subject else "", outcome,
                                         code, time.monotonic() - self.started)
        priority = self.syslog.LOG_ERR if code else \
            self.syslog.LOG_NOTICE if outcome.startswith("installed") else self.syslog.LOG_INFO
        self.syslog.syslog(priority, " ".join(line.split()))   # one line, whatever it quotes


class SectionReporter(Reporter):
    """The Reporter of one --config section: its stderr lines say which section."""

    def __init__(self, section, quiet=False, verbose=False, syslog=None):
        Reporter.__init__(self, quiet, verbose, syslog)
        self.section = section

    def _write(self, text):
        Reporter._write(self, text.replace("certgrab: ", "certgrab: [%s] " % self.section, 1))

    def checking(self, subject):
        Reporter.checking(self, "section %s: %s" % (self.section, subject))

    def log(self, code, exc=None):
        if not self.quiet:              # with --quiet, the run's line names failed sections
            Reporter.log(self, code, exc)


def open_syslog():
    """--syslog: the stdlib syslog module, opened as "certgrab[PID]", facility daemon."""
    try:
        import syslog
    except ImportError:
        raise UsageError("--syslog: this Python has no syslog module")
    syslog.openlog("certgrab", syslog.LOG_PID, syslog.LOG_DAEMON)
    return syslog


# ---------------------------------------------------------------------------
# Certificates: a small DER reader for X.509, PEM in and out.
# ---------------------------------------------------------------------------

DER_INTEGER, DER_BIT_STRING, DER_OCTET_STRING, DER_OID = 0x02, 0x03, 0x04, 0x06
DER_SEQUENCE, DER_SET = 0x30, 0x31
DER_VERSION, DER_EXTENSIONS = 0xA0, 0xA3          # [0] and [3] in TBSCertificate
SAN_TYPES = {0xA0: "othername", 0x81: "email", 0x82: "DNS", 0xA3: "X400Name", 0xA4: "DirName",
             0xA5: "EdiPartyName", 0x86: "URI", 0x87: "IP", 0x88: "RID"}   # OpenSSL's names
DER_BOOLEAN, DER_T61_STRING = 0x01, 0x14
DER_TRUE = b"\xff"                                # DER writes TRUE so; FALSE is 00

# RFC 4514's short names, and two that OpenSSL and certgrab have always printed;
# every other attribute type prints as its dotted OID.
OID_NAMES = {
    "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.6": "C", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID", "2.5.4.5": "serialNumber",
    "1.2.840.113549.1.9.1": "emailAddress",
}
# Name values with a string representation (RFC 4514 2.4), and how they are decoded. Like
# pyca/cryptography, the 8-bit types are read as UTF-8 (PrintableString, IA5String and the
# like are ASCII, a subset), refused if invalid, except a T61String that is not UTF-8: that
# is Latin-1 in practice. Any other value prints as "#" and the hex of its DER encoding.
NAME_STRING_CODECS = {0x0C: "utf-8", 0x12: "utf-8", 0x13: "utf-8", 0x14: "utf-8",
                      0x16: "utf-8", 0x1A: "utf-8", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}
RFC4514_SPECIALS = {"\\": "\\\\", '"': '\\"', "+": "\\+", ",": "\\,", ";": "\\;",
                    "<": "\\<", ">": "\\>", "\0": "\\00"}

OID_RSA, OID_RSA_PSS = "1.2.840.113549.1.1.1", "1.2.840.113549.1.1.10"
OID_EC, OID_DSA, OID_PRIME_FIELD = "1.2.840.10045.2.1", "1.2.840.10040.4.1", "1.2.840.10045.1.1"
OID_CURVES = {"1.2.840.10045.3.1.7": ("P-256", 256), "1.3.132.0.34": ("P-384", 384),
              "1.3.132.0.35": ("P-521", 521), "1.3.132.0.33": ("P-224", 224),
              "1.2.840.10045.3.1.1": ("P-192", 192), "1.3.132.0.10": ("secp256k1", 256),
              "1.3.36.3.3.2.8.1.1.7": ("brainpoolP256r1", 256),
              "1.3.36.3.3.2.8.1.1.11": ("brainpoolP384r1", 384),
              "1.3.36.3.3.2.8.1.1.13": ("brainpoolP512r1", 512)}
P256, P384, P521 = (2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1,
                    2 ** 384 - 2 ** 128 - 2 ** 96 + 2 ** 32 - 1, 2 ** 521 - 1)
K256 = 2 ** 256 - 2 ** 32 - 977
# Explicit curve parameters (prime p, coefficients a and b) of the curves such keys use,
# named as OpenSSL and pyca/cryptography name them; other explicit curves stay unnamed.
EC_EXPLICIT_CURVES = {
    (P256, P256 - 3, 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b):
        "1.2.840.10045.3.1.7",
    (P384, P384 - 3, int("b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875a"
                         "c656398d8a2ed19d2a85c8edd3ec2aef", 16)): "1.3.132.0.34",
    (P521, P521 - 3, int("0051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef1"
                         "09e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b503f00",
                         16)): "1.3.132.0.35",
    (K256, 0, 7): "1.3.132.0.10",
}
OID_EDWARDS = {"1.3.101.112": ("Ed25519", 256), "1.3.101.113": ("Ed448", 456),
               "1.3.101.110": ("X25519", 256), "1.3.101.111": ("X448", 448)}
OID_SIGNATURES = {
    "1.2.840.113549.1.1.2": "md2WithRSAEncryption",
    "1.2.840.113549.1.1.4": "md5WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.2.840.113549.1.1.10": "RSASSA-PSS",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.113549.1.1.14": "sha224WithRSAEncryption",
    "1.2.840.10045.4.1": "ecdsa-with-SHA1", "1.2.840.10045.4.3.1": "ecdsa-with-SHA224",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256", "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512", "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448",
    "1.2.840.10040.4.3": "dsa-with-sha1", "2.16.840.1.101.3.4.3.1": "dsa-with-sha224",
    "2.16.840.1.101.3.4.3.2": "dsa-with-sha256",
}
# Signature algorithms whose AlgorithmIdentifier has no parameters at all (RFC 5758, 8410):
# pyca/cryptography refuses a NULL there (it lets sha1 DSA and ECDSA keep their old NULL).
SIGNATURES_WITHOUT_PARAMETERS = frozenset((
    "1.2.840.10045.4.3.1", "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4",
    "2.16.840.1.101.3.4.3.1", "2.16.840.1.101.3.4.3.2", "1.3.101.112", "1.3.101.113"))
OID_SAN_DER, OID_BASIC_CONSTRAINTS_DER = b"\x06\x03\x55\x1d\x11", b"\x06\x03\x55\x1d\x13"
PEM_LABELS = ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE")  # as OpenSSL reads them
OID_SKI_DER, OID_AKI_DER = b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x23"  # 2.5.29.14, .35


class Certificate(object):
    """One X.509 certificate, read whole by parse_certificate.

    der, and its parts: subject_der and issuer_der (the names as DER, for chain
    order), ski and aki (key identifiers, bytes or None), subject and issuer as
    RFC 4514 text in the order encoded ("C=US, O=Example, CN=R1"), serial
    (a signed int), signature_algorithm, not_before and not_after (epoch
    seconds, UTC), spki (DER), key_type, key_bits, alt_names (every
    subjectAltName as (type, text)), dns_names and ip_addresses (those of type
    DNS and IP), and is_ca; name (for messages: the subject, or the SANs when
    it is empty) and lifetime (seconds) are derived. The fields agree with
    pyca/cryptography's reading; README's "--json" section says where their
    formats differ.
    """

    def __init__(self, der):
        self.der = der
        self.subject_der = self.issuer_der = b""
        self.ski = self.aki = None
        self.subject = self.issuer = self.signature_algorithm = ""
        self.serial = self.not_before = self.not_after = 0
        self.spki, self.key_type, self.key_bits = b"", "unknown", 0
        self.alt_names, self.dns_names, self.ip_addresses = [], [], []
        self.is_ca = False

    @property
    def self_issued(self):
        return self.subject_der == self.issuer_der

    def issued(self, other):
        """True if this certificate's subject (and key id) names other's issuer."""
        if self.subject_der != other.issuer_der:
            return False
        return self.ski is None or other.aki is None or self.ski == other.aki

    @property
    def serial_hex(self):
        """The serial in hex, an even number of digits, with its sign."""
        text = "%x" % abs(self.serial)
        return "-" * (self.serial < 0) + "0" * (len(text) % 2) + text

    @property
    def sans(self):
        """Every subjectAltName in encoded order: DNS names and IP addresses bare,
        the other types as OpenSSL writes them ("email:a@example.com", "URI:...")."""
        return [text if kind in ("DNS", "IP") else "%s:%s" % (kind, text)
                for kind, text in self.alt_names]

    @property
    def sha256(self):
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self):
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

    @property
    def covered_names(self):
        """The names the certificate covers, for messages: "a, b", or "no names"."""
        return printable(", ".join(self.dns_names + self.ip_addresses)) or "no names"

    def describe(self):
        return "serial %s issued %s, expires %s" % (
            self.serial_hex, format_time(self.not_before), format_time(self.not_after))

    @property
    def name(self):
        """How messages name the certificate, terminal-safe: its subject, or for an
        empty one (the tlsserver and shortlived profiles) its SANs, or its serial."""
        if self.subject:
            return printable(self.subject)
        if self.sans:
            more = len(self.sans) - MAX_NAMES_SHOWN
            return "(no subject) SAN %s%s" % (printable(", ".join(self.sans[:MAX_NAMES_SHOWN])),
                                              " and %d more" % more if more > 0 else "")
        return "(no subject, no SAN) serial %s" % self.serial_hex

    @property
    def lifetime(self):
        """Seconds from notBefore to notAfter."""
        return self.not_after - self.not_before


def parse_certificate(der):
    """Read one DER certificate whole; ParseError if any part is malformed."""
    cert = Certificate(bytes(der))
    der = cert.der
    top = _tlv(der, 0, len(der))
    if top[2] != len(der):
        raise ParseError("malformed certificate: trailing bytes after the certificate")
    outer = _children(der, top, DER_SEQUENCE, 3)
    tbs = _children(der, outer[0], DER_SEQUENCE, 6)
    if tbs[0][0] == DER_VERSION:
        tbs = tbs[1:]
    if len(tbs) < 6 or tbs[0][0] != DER_INTEGER or any(t[0] != DER_SEQUENCE for t in tbs[1:6]):
        raise ParseError("malformed certificate: bad TBSCertificate")
    _check_version(der, outer[0])
    cert.serial = _integer(der, tbs[0])
    cert.signature_algorithm = _signature_algorithm(der, outer[1])
    _signature_algorithm(der, tbs[1])
    cert.issuer_der, cert.subject_der = _element(der, tbs[2]), _element(der, tbs[4])
    cert.issuer, cert.subject = _name(der, tbs[2]), _name(der, tbs[4])
    times = _children(der, tbs[3], DER_SEQUENCE, 2)
    cert.not_before, cert.not_after = _time(der, times[0]), _time(der, times[1])
    _public_key(cert, der, tbs[5])
    for oid, value in _extensions(der, tbs):
        _extension(cert, der, oid, value)
    return cert


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


def parse_chain(ders, source):
    """Every certificate of a chain; a malformed one is named by source and position."""
    certs = []
    for index, der in enumerate(ders):
        try:
            certs.append(parse_certificate(der))
        except ParseError as exc:
            raise ParseError("%s: certificate %d of %d: %s" % (source, index + 1, len(ders),
                                                                exc))
    return certs


def _check_version(der, tbs_item):
    """The TBSCertificate's [0] EXPLICIT version, if present, must be v2 or v3
    (v1, the default, is never written in DER)."""
    first = _children(der, tbs_item, DER_SEQUENCE, 1)[0]
    if first[0] == DER_VERSION:
        inner = _children(der, first, DER_VERSION, 1)
        number = _integer(der, inner[0]) if len(inner) == 1 else -1
        if number not in (1, 2):
            raise ParseError("malformed certificate: X.509 version %d" % (number + 1))


def _extensions(der, tbs):
    """(OID as DER, value) of each extension, in order; ParseError for one that
    appears twice (RFC 5280 4.2) or a "critical" FALSE written out (DER omits a
    default)."""
    seen = set()
    for item in tbs[6:]:
        if item[0] != DER_EXTENSIONS:
            continue
        for extension in _children(der, _children(der, item, DER_EXTENSIONS, 1)[0],
                                   DER_SEQUENCE):
            fields = _children(der, extension, DER_SEQUENCE, 2)
            if fields[0][0] != DER_OID:
                raise ParseError("malformed certificate: bad extension")
            oid = _element(der, fields[0])
            if oid in seen or len(fields) > 3 or len(fields) == 3 and not _boolean(der, fields[1]):
                raise ParseError("malformed certificate: bad or repeated extension %s"
                                 % _oid(der, fields[0]))
            seen.add(oid)
            yield oid, fields[-1]


def _oid(data, item):
    if item[0] != DER_OID or item[1] == item[2]:
        raise ParseError("malformed certificate: bad object identifier")
    arcs, value, start = [], 0, True
    for byte in data[item[1]:item[2]]:
        if start and byte == 0x80:
            raise ParseError("malformed certificate: object identifier not minimally encoded")
        value = (value << 7) | (byte & 0x7F)
        start = not byte & 0x80
        if start:
            arcs.append(value)
            value = 0
    if data[item[2] - 1] & 0x80:
        raise ParseError("malformed certificate: truncated object identifier")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


def _integer(data, item):
    """A DER INTEGER (signed, minimally encoded) as an int."""
    raw = data[item[1]:item[2]]
    if item[0] != DER_INTEGER or not raw or len(raw) > 1 and (
            raw[0] == 0 and raw[1] < 0x80 or raw[0] == 0xFF and raw[1] >= 0x80):
        raise ParseError("malformed certificate: bad INTEGER")
    return int.from_bytes(raw, "big", signed=True)


def _boolean(data, item):
    raw = data[item[1]:item[2]]
    if item[0] != DER_BOOLEAN or raw not in (b"\0", DER_TRUE):
        raise ParseError("malformed certificate: bad BOOLEAN")
    return raw == DER_TRUE


def _hex_element(data, item):
    """RFC 4514's form of a value without a string representation: # and its DER in hex."""
    return "#" + binascii.hexlify(_element(data, item)).decode("ascii")


def _escape_dn_value(text):
    """RFC 4514 2.4 escaping, as pyca/cryptography does it."""
    text = "".join(RFC4514_SPECIALS.get(char, char) for char in text)
    if text[:1] in ("#", " "):
        text = "\\" + text
    if text[-1:] == " ":
        text = text[:-1] + "\\ "
    return text


def _attribute_value(data, item):
    """One attribute value of a Name, as RFC 4514 writes it."""
    if item[0] & 0xC0:
        raise ParseError("malformed certificate: name value with tag 0x%02x" % item[0])
    codec = NAME_STRING_CODECS.get(item[0])
    if codec is None:
        return _hex_element(data, item)
    raw = data[item[1]:item[2]]
    try:
        return _escape_dn_value(raw.decode(codec))
    except UnicodeDecodeError:
        if item[0] != DER_T61_STRING:
            raise ParseError("malformed certificate: a name holds invalid %s" % codec.upper())
        return _escape_dn_value(raw.decode("latin-1"))


def _name(data, item):
    """A Name as RFC 4514 text in the order it is encoded: "C=US, O=Org, CN=name"
    (the attributes of a multi-valued RDN joined by "+")."""
    rdns = []
    for rdn in _children(data, item, DER_SEQUENCE):
        attributes = []
        for attribute in _children(data, rdn, DER_SET, 1):
            fields = _children(data, attribute, DER_SEQUENCE, 2)
            if len(fields) != 2:
                raise ParseError("malformed certificate: bad name attribute")
            oid = _oid(data, fields[0])
            attributes.append("%s=%s" % (OID_NAMES.get(oid, oid),
                                         _attribute_value(data, fields[1])))
        rdns.append("+".join(attributes))
    return ", ".join(rdns)


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (no calendar import)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _days_in_month(year, month):
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _time(data, item):
    """UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ),
    the forms RFC 5280 4.1.2.5 allows, to epoch seconds. Only real times: 30 February,
    second 60 (X.509 has no leap seconds) and year 0 are refused, never shifted."""
    text = data[item[1]:item[2]]
    if not (item[0] == 0x17 and len(text) == 13 or item[0] == 0x18 and len(text) == 15) \
            or not text[:-1].isdigit() or text[-1:] != b"Z":
        raise ParseError("malformed certificate: bad validity time")
    year = int(text[:-11])
    if item[0] == 0x17:
        year += 2000 if year < 50 else 1900
    month, day, hour, minute, second = (int(text[i:i + 2]) for i in range(-11, -1, 2))
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month) \
            or hour > 23 or minute > 59 or second > 59:
        raise ParseError("malformed certificate: impossible validity time %s"
                         % text.decode("ascii"))
    return (_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)


def _ec_curve(data, parameters):
    """(name, bits) of an EC key's curve: a named curve, or explicit parameters."""
    if parameters is not None and parameters[0] == DER_OID:
        curve = _oid(data, parameters)
        return OID_CURVES.get(curve, (curve, 0))
    if parameters is None or parameters[0] != DER_SEQUENCE:
        raise ParseError("malformed certificate: EC key without its curve")
    fields = _children(data, parameters, DER_SEQUENCE, 5)   # version, field, curve, G, n
    field = _children(data, fields[1], DER_SEQUENCE, 2)
    coefficients = _children(data, fields[2], DER_SEQUENCE, 2)
    if _oid(data, field[0]) != OID_PRIME_FIELD:
        return "explicit binary-field curve", 0
    prime = _integer(data, field[1])
    a, b = (int.from_bytes(data[c[1]:c[2]], "big") for c in coefficients[:2])
    curve = EC_EXPLICIT_CURVES.get((prime, a, b))
    return OID_CURVES[curve] if curve else ("explicit curve", max(prime.bit_length(), 0))


def _public_key(cert, data, item):
    cert.spki = _element(data, item)
    algorithm, key = _children(data, item, DER_SEQUENCE, 2)[:2]
    algorithm = _children(data, algorithm, DER_SEQUENCE, 1)
    oid = _oid(data, algorithm[0])
    parameters = algorithm[1] if len(algorithm) > 1 else None
    if oid in (OID_RSA, OID_RSA_PSS):
        modulus = _children(data, _wrapped(data, key, DER_BIT_STRING), DER_SEQUENCE, 2)[0]
        cert.key_type = "RSA" if oid == OID_RSA else "RSA-PSS"
        cert.key_bits = _integer(data, modulus).bit_length()
    elif oid == OID_EC:
        name, cert.key_bits = _ec_curve(data, parameters)
        cert.key_type = "EC " + name
    elif oid == OID_DSA:
        if parameters is None:   # "inherited from the issuer": RFC 3279 allows, nobody reads it
            raise ParseError("malformed certificate: DSA key without its parameters")
        prime = _children(data, parameters, DER_SEQUENCE, 3)[0]
        cert.key_type, cert.key_bits = "DSA", _integer(data, prime).bit_length()
    elif oid in OID_EDWARDS:
        cert.key_type, cert.key_bits = OID_EDWARDS[oid]
    else:
        cert.key_type = oid


def _signature_algorithm(data, item):
    """The name of a signature AlgorithmIdentifier; ParseError if its parameters are
    present where the algorithm has none."""
    fields = _children(data, item, DER_SEQUENCE, 1)
    oid = _oid(data, fields[0])
    if len(fields) > 1 and oid in SIGNATURES_WITHOUT_PARAMETERS:
        raise ParseError("malformed certificate: parameters with %s" % OID_SIGNATURES[oid])
    return OID_SIGNATURES.get(oid, oid)


def _ia5_text(raw):
    """An IA5String of a subjectAltName: UTF-8 read as such (as pyca/cryptography does),
    any other byte beyond ASCII as \\xNN, never replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(byte) if byte < 0x80 else "\\x%02x" % byte for byte in raw)


def _general_name(data, item):
    """One GeneralName (RFC 5280 4.2.1.6) as (type, text): the types and the forms of the
    values as OpenSSL prints them (DNS, IP, email, URI, DirName, RID, othername, ...)."""
    kind, raw = SAN_TYPES.get(item[0]), data[item[1]:item[2]]
    if kind in ("DNS", "email", "URI"):
        return kind, _ia5_text(raw)
    if kind == "IP":
        if len(raw) not in (4, 16):
            raise ParseError("malformed certificate: IP address of %d bytes" % len(raw))
        return kind, socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if kind == "RID":
        return kind, _oid(data, (DER_OID,) + tuple(item[1:]))
    if kind == "DirName":
        inner = _children(data, item, item[0], 1)
        if len(inner) != 1:
            raise ParseError("malformed certificate: bad directoryName")
        return kind, _name(data, inner[0])
    if kind == "othername":
        fields = _children(data, item, item[0], 2)
        value = _children(data, fields[1], 0xA0, 1)
        if len(fields) != 2 or len(value) != 1:
            raise ParseError("malformed certificate: bad otherName")
        return kind, "%s:%s" % (_oid(data, fields[0]), _hex_element(data, value[0]))
    if kind:
        return kind, "#" + binascii.hexlify(raw).decode("ascii")
    raise ParseError("malformed certificate: subjectAltName entry with tag 0x%02x" % item[0])


def _extension(cert, data, oid, value):
    if oid == OID_SAN_DER:
        names = _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE, 1)
        for kind, text in (_general_name(data, name) for name in names):
            cert.alt_names.append((kind, text))
            if kind == "DNS":
                cert.dns_names.append(text)
            elif kind == "IP":
                cert.ip_addresses.append(text)
    elif oid == OID_BASIC_CONSTRAINTS_DER:
        fields = _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE)
        if fields and fields[0][0] == DER_BOOLEAN:
            cert.is_ca = _boolean(data, fields[0])
            if not cert.is_ca:
                raise ParseError("malformed certificate: cA FALSE written out (DER omits it)")
    elif oid == OID_SKI_DER:
        inner = _wrapped(data, value, DER_OCTET_STRING)
        cert.ski = data[inner[1]:inner[2]]
    elif oid == OID_AKI_DER:
        for field in _children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE):
            if field[0] == 0x80:                  # [0] keyIdentifier
                cert.aki = data[field[1]:field[2]]


def der_to_pem(der):
    return ssl.DER_cert_to_PEM_cert(der)


def _pem_body(text):
    """The bytes of one PEM block's base64, after any RFC 1421 headers."""
    lines = text.strip().splitlines()
    if lines and ":" in lines[0]:
        while lines and lines[0].strip():
            lines.pop(0)
    try:
        return binascii.a2b_base64("".join(line.strip() for line in lines))
    except (binascii.Error, ValueError):
        raise ParseError("malformed PEM: bad base64 in a certificate")


def pem_to_ders(text):
    """Every certificate block of a PEM text, decoded: the labels OpenSSL reads
    (PEM_LABELS); other blocks are ignored. A TRUSTED CERTIFICATE (OpenSSL's, with
    trust settings after the certificate) gives the certificate alone."""
    ders, pos = [], 0
    while True:
        start = text.find("-----BEGIN ", pos)
        label_end = text.find("-----", start + 11)
        if start < 0 or label_end < 0:
            return ders
        label, pos = text[start + 11:label_end], label_end + 5
        if label not in PEM_LABELS:
            continue
        stop = text.find("-----END %s-----" % label, pos)
        if stop < 0:
            raise ParseError("malformed PEM: BEGIN %s without END" % label)
        der = _pem_body(text[pos:stop])
        if label == "TRUSTED CERTIFICATE":
            der = der[:_tlv(der, 0, len(der))[2]]
        ders.append(der)
        pos = stop + len(label) + 14


def format_time(epoch):
    """RFC 3339 UTC, the year always in four digits (strftime's %Y is not, below 1000)."""
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % time.gmtime(epoch)[:6]


def printable(text):
    """Text from a certificate, safe for a terminal: control characters (and the
    backslash, so that an escape cannot be faked) written as escapes."""
    return "".join(c if c.isprintable() and c != "\\" else "\\x%02x" % ord(c) if ord(c) < 256
                   else "\\u%04x" % ord(c) for c in text)


OUT_OF_ORDER = "the chain was served out of order"   # a problem --check warns about


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
        problems.append(OUT_OF_ORDER)
    if len(path) > 1 and path[-1].self_issued:
        problems.append("the root certificate (%s) was included" % path[-1].name)
        path.pop()
    if rest:
        problems.append("%d unrelated or duplicate certificate(s) were included: %s" % (
            len(rest), "; ".join(c.name for c in rest)))
    return path, problems


# ---------------------------------------------------------------------------
# Keys: --key-path, read once; matched against the leaf before anything is written.
# ---------------------------------------------------------------------------


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


def read_small_file(path, what):
    """A local file of at most MAX_FILE bytes, for option what."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError as exc:
        raise InputError("cannot read %s %s: %s" % (what, path, exc.strerror or exc))
    if len(data) > MAX_FILE:
        raise UsageError("%s %s: larger than %d bytes" % (what, path, MAX_FILE))
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


def matching_key(keys, leaf):
    """The first of the --key-path keys that belongs to the leaf; None if none does."""
    return next((key for key in keys if key_matches(key, leaf)), None)


# ---------------------------------------------------------------------------
# Sources and connecting: SOURCE to address, TCP within the deadline.
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
        self.file = path                      # a local certificate file (reports only)

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


def parse_servername(text):
    """-n/--servername: a DNS name (trailing dot removed) or an IP address; None if absent."""
    if text is None:
        return None
    servername = text.rstrip(".")
    if not is_ip(servername):
        check_dns_name(servername, "bad --servername %r" % text)
    return servername


def parse_targets(sources, servername, default_port, files_allowed):
    """A Target for each SOURCE; local files only where files_allowed (reports)."""
    targets = []
    for source in sources:
        if looks_like_file(source) and os.path.isfile(source):
            if not files_allowed:
                raise UsageError("SOURCE %s is a file: local files go with --text, --json or "
                                 "--check" % source)
            targets.append(Target(source, None, None, servername, path=source))
            continue
        if files_allowed and looks_like_file(source):
            raise UsageError("SOURCE %s: no such file" % source)
        host, port = parse_source(source, default_port)
        name = servername or (None if is_ip(host) else host)
        targets.append(Target(source, host, port, name))
    return tuple(targets)


def looks_like_file(source):
    """A SOURCE with a / or a certificate suffix names a local PEM file."""
    return "/" in source or source.endswith(CERTIFICATE_SUFFIXES)


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
    answer = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(target.host_bytes, target.port, family,
                                             socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    try:
        thread.start()
    except RuntimeError:            # "can't start new thread": out of threads or memory
        raise FetchError("%s: cannot resolve %s: no thread free for the lookup" % (
            target, target.host), hint=FEWER_AT_ONCE)
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
        sock = new_socket(family, kind, proto, target, deadline)
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


def new_socket(family, kind, proto, target, deadline):
    """A socket; while the process (or the system) has no descriptor free, wait
    for another source to close one, until the deadline."""
    while True:
        try:
            return socket.socket(family, kind, proto)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise FetchError("%s: cannot open a socket: %s" % (target, exc.strerror or exc))
            if deadline - time.monotonic() <= NO_FILE_WAIT:
                raise FetchError("%s: cannot open a socket: %s" % (target, exc.strerror),
                                 hint=FEWER_AT_ONCE)
        time.sleep(NO_FILE_WAIT)


def read_local_chain(result):
    """A local file as a source: its certificates in file order, from PEM blocks
    (see pem_to_ders) or a single DER certificate. A bundle is read up to
    MAX_LOCAL_CERTS (not MAX_CHAIN, a bound for what a server sends), and a
    larger one says so in the warnings."""
    path = result.target.file
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LOCAL_FILE + 1)
    except OSError as exc:
        raise FetchError("cannot read %s: %s" % (path, exc.strerror or exc))
    if len(data) > MAX_LOCAL_FILE:
        raise FetchError("%s: larger than %d MiB; not a certificate file" % (
            path, MAX_LOCAL_FILE >> 20))
    ders = pem_to_ders(data.decode("ascii", "replace"))
    if not ders and data[:1] == b"\x30" and b"-----BEGIN" not in data:
        ders = [data]                    # DER, as openssl x509 -outform DER writes it
    if not ders:
        raise FetchError("%s: no PEM certificate in it" % path)
    result.served = parse_chain(ders[:MAX_LOCAL_CERTS], path)
    result.issuing, result.problems = clean_path(result.served)
    if len(ders) > MAX_LOCAL_CERTS:
        result.problems.append("only the first %d of the %d certificates in %s were read" % (
            MAX_LOCAL_CERTS, len(ders), path))


# ---------------------------------------------------------------------------
# STARTTLS: the plaintext dialogue before the handshake, one function per
# protocol, each bounded by MAX_LINE, MAX_REPLY_LINES and MAX_PLAINTEXT.
# ---------------------------------------------------------------------------

MYSQL_CLIENT_SSL = 0x0800
MYSQL_CLIENT_FLAGS = 0x0800 | 0x0200 | 0x8000 | 0x0001   # SSL, PROTOCOL_41, SECURE, LONG_PW
POSTGRES_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
LDAP_STARTTLS = bytes.fromhex("301d02010177188016") + b"1.3.6.1.4.1.1466.20037"
XMPP_STREAM = ("<?xml version='1.0'?><stream:stream xmlns='jabber:%s' "
               "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>")


def parse_ehlo(text):
    """--ehlo: a host name or an address literal ([192.0.2.1], [IPv6:2001:db8::1])."""
    if text is not None and not (text.startswith("[") and text.endswith("]")
                                 and is_ip(text[1:-1].replace("IPv6:", ""))):
        check_dns_name(text, "bad --ehlo %r" % text)
    return text


class Plaintext(object):
    """The plaintext part of a connection: every read bounded in size and time."""

    def __init__(self, sock, target, protocol, deadline, ehlo=None):
        self.sock, self.target, self.protocol, self.deadline = sock, target, protocol, deadline
        self.ehlo = ehlo                # --ehlo, for smtp and lmtp
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


def ehlo_name(talk):
    """--ehlo, this host's name when it is a dotted name, else our address literal."""
    if talk.ehlo:
        return talk.ehlo
    name = socket.gethostname()
    if "." in name and set(name) <= HOST_CHARS:
        return name
    address = talk.sock.getsockname()[0]
    return "[IPv6:%s]" % address if ":" in address else "[%s]" % address


def _greeting_failed(talk):
    return lambda reply: talk.fail("unexpected greeting", reply)


def starttls_smtp(talk, hello=b"EHLO"):
    coded_reply(talk, (220,), _greeting_failed(talk))
    talk.send(hello + b" " + ascii_host(ehlo_name(talk)).encode("ascii") + b"\r\n")
    lines = coded_reply(talk, (250,), lambda r: talk.fail("%s refused" % hello.decode(), r))
    if not any(line[4:].strip().upper() == "STARTTLS" for line in lines):
        raise talk.refuse(lines)
    talk.send(b"STARTTLS\r\n")
    coded_reply(talk, (220,), talk.refused)


def starttls_lmtp(talk):
    starttls_smtp(talk, hello=b"LHLO")


def starttls_ftp(talk):
    while coded_reply(talk, (120, 220), _greeting_failed(talk))[-1][:3] == "120":
        pass                            # "ready in a minute" comes before the 220 (RFC 959)
    talk.send(b"AUTH TLS\r\n")
    coded_reply(talk, (234,), talk.refused)


def starttls_pop3(talk):
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


def starttls_imap(talk):
    greeting = talk.line()
    if not greeting.upper().startswith("* OK"):
        raise talk.fail("unexpected greeting", greeting)
    lines = _imap_command(talk, b"c1", b"CAPABILITY")
    if "STARTTLS" not in " ".join(lines[:-1]).upper().split():
        raise talk.refuse(lines)
    lines = _imap_command(talk, b"c2", b"STARTTLS")
    if not lines[-1].upper().startswith("C2 OK"):
        raise talk.refused(lines)


def starttls_sieve(talk):
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


def starttls_nntp(talk):
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


def starttls_xmpp(talk, kind="client"):
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


def starttls_xmpp_server(talk):
    starttls_xmpp(talk, kind="server")


def starttls_irc(talk):
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


def starttls_postgres(talk):
    talk.send(POSTGRES_SSL_REQUEST)
    answer = talk.exactly(1)
    if answer == b"N":
        raise talk.refuse("N: TLS is off")
    if answer == b"E":                  # an ErrorResponse: a server too old for SSLRequest
        answer += talk.buffer[:200]
    if answer != b"S":
        raise talk.fail("not a PostgreSQL answer to SSLRequest", as_text(answer))


def starttls_mysql(talk):
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


def starttls_ldap(talk):
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


def starttls_postgres_direct(talk):
    """PostgreSQL 17+ direct TLS: no dialogue, ALPN "postgresql" (see make_context)."""


# --starttls PROTOCOL: its dialogue and its default port.
STARTTLS = {
    "smtp": (starttls_smtp, 25), "lmtp": (starttls_lmtp, 24), "pop3": (starttls_pop3, 110),
    "imap": (starttls_imap, 143), "ftp": (starttls_ftp, 21), "xmpp": (starttls_xmpp, 5222),
    "xmpp-server": (starttls_xmpp_server, 5269), "irc": (starttls_irc, 6667),
    "postgres": (starttls_postgres, 5432), "postgres-direct": (starttls_postgres_direct, 5432),
    "mysql": (starttls_mysql, 3306), "nntp": (starttls_nntp, 119),
    "sieve": (starttls_sieve, 4190), "ldap": (starttls_ldap, 389),
}


def starttls_dialogue(sock, target, protocol, ehlo, deadline):
    """Talk the protocol up to the point where the TLS handshake starts."""
    talk = Plaintext(sock, target, protocol, deadline, ehlo)
    STARTTLS[protocol][0](talk)
    talk.finish()


# ---------------------------------------------------------------------------
# TLS: trust store, handshake, and the chain the server sent.
# ---------------------------------------------------------------------------

def make_context(settings, key_kind=None):
    """A client context: verifying (the default) or --insecure.

    With key_kind ("RSA" or "EC") it offers only TLS 1.2 cipher suites signed
    by that key type: the way to ask a dual-certificate server for the other
    certificate, since Python cannot restrict TLS 1.3 signature algorithms.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.alpn:
        ctx.set_alpn_protocols(settings.alpn)
    if settings.tls_min or settings.tls_max:
        limit_tls_versions(ctx, settings.tls_min, settings.tls_max)
    if key_kind:
        ctx.set_ciphers("aECDSA" if key_kind == "EC" else "aRSA")
        limit_to_tls12(ctx)
    if settings.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if settings.cafile or settings.capath:
        if settings.capath and not os.path.isdir(settings.capath):
            raise UsageError("--capath %s: not a directory" % settings.capath)
        try:
            ctx.load_verify_locations(cafile=settings.cafile, capath=settings.capath)
        except ssl.SSLError as exc:
            raise UsageError("cannot load --cafile %s: %s" % (settings.cafile, ssl_reason(exc)))
        except OSError as exc:
            raise InputError("cannot load --cafile %s: %s" % (settings.cafile,
                                                               exc.strerror or exc))
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
    Python 3.6 to 3.9 use ChainReaderBefore310 instead (see new_chain_reader)."""

    def __init__(self, ctx, trust, by_key_kind=None):
        self.ctx, self.trust, self.method = ctx, trust, chain_method()
        self.starttls = None        # set by make_reader: the protocol, for hints
        self.by_key_kind = by_key_kind or {}    # key kind -> ChainReader asking for it

    def served_ders(self, tls):
        """The certificates as the server sent them: list of DER."""
        if self.method == "get_unverified_chain":
            return tls.get_unverified_chain()
        chain = tls._sslobj.get_unverified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verified_ders(self, tls):
        """The path OpenSSL built, as DER."""
        chain = tls._sslobj.get_verified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verify_message(self, tls):
        return None


TLS_HANDSHAKE = 22      # TLS content type of handshake records
TLS_CERTIFICATE = 11    # handshake message type of Certificate
TLS13_VERSION = 0x0304


class ChainReaderBefore310(ChainReader):
    """No get_verified_chain: the served chain from the Certificate message
    (3.8, 3.9) or from OpenSSL's own structures (3.6, 3.7)."""

    def __init__(self, ctx, trust, by_key_kind=None):
        ChainReader.__init__(self, ctx, trust, by_key_kind)
        self._messages, self._openssl, self._store = {}, None, None  # _messages:
        # connection -> its Certificate message, while it is being read
        if self.method == "msg_callback":
            ctx._msg_callback = self._record
        else:
            self._openssl = OpenSSLPeek(ctx)

    def _record(self, conn, direction, version, content_type, msg_type, data):
        if direction == "read" and content_type == TLS_HANDSHAKE and msg_type == TLS_CERTIFICATE:
            self._messages.setdefault(conn, (version, data))

    def served_ders(self, tls):
        """Taken out of _messages, which holds only connections still being read."""
        if self._openssl:
            return self._openssl.peer_chain(tls)
        version, data = self._messages.pop(tls, (None, None))
        if data is None:
            return []
        return parse_certificate_message(data[4:], version == TLS13_VERSION)

    def verified_ders(self, tls):
        return None             # rebuild_verified finds the path instead

    def verify_message(self, tls):
        return self._openssl.verify_message(tls) if self._openssl else None

    def store_certificates(self):
        """The loaded trust store, parsed; a CA certificate certgrab cannot read
        is left out (OpenSSL has already verified the path with it). A --cafile
        store is parsed once per run; a hashed directory loads lazily, so it is
        read again for each source."""
        if self._store is not None:
            return self._store
        certs = []
        for der in self.ctx.get_ca_certs(binary_form=True):
            try:
                certs.append(parse_certificate(der))
            except ParseError:
                pass
        if self.trust.startswith("--cafile") and "--capath" not in self.trust:
            self._store = certs
        return certs


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


class FetchResult(object):
    """What one source gave, or its error. served: the certificates as sent, in
    their order; issuing: the issuing path from the leaf (clean_path), what files
    get; verified: the path verification built, root included, kept only for
    --verified-chain (and on Python < 3.10 where rebuilt to count it); problems:
    how served differed from issuing, for warnings."""

    def __init__(self, target):
        self.target, self.error, self.address = target, None, None
        self.served, self.issuing, self.problems, self.verified = [], [], [], []
        self.tls_version = self.cipher = self.verify_error = self.note = None
        self.elapsed = 0.0
        self.key = None         # the --key-path the leaf matched (refetch_for_key)
        self.missing = 0        # intermediates the server left out (check_completeness)

    @property
    def leaf(self):
        return self.issuing[0] if self.issuing else None


def fetch_chain(target, reader, settings):
    """Fetch one source; with --key-path, a dual-certificate server may be asked
    again for the certificate of the key's type (refetch_for_key)."""
    result = _fetch_once(target, reader, settings)
    return refetch_for_key(result, reader, settings) if settings.keys else result


def _fetch_once(target, reader, settings):
    """Connect, handshake and read the chain; errors are kept in the result."""
    result, started = FetchResult(target), time.monotonic()
    try:
        if target.file:
            read_local_chain(result)
        else:
            _fetch_into(result, reader, settings, started + settings.timeout)
    except CertgrabError as exc:
        result.error = exc
    result.elapsed = time.monotonic() - started
    return result


def _fetch_into(result, reader, settings, deadline):
    target = result.target
    sock = open_connection(target, settings.family, deadline)
    result.address = sock.getpeername()[0]
    if settings.starttls:
        try:
            starttls_dialogue(sock, target, settings.starttls, settings.ehlo, deadline)
        except CertgrabError:
            sock.close()
            raise
    name = target.name_bytes.decode() if NAME_AS_STR else target.name_bytes
    tls = reader.ctx.wrap_socket(sock, server_hostname=name,
                                 do_handshake_on_connect=False)
    try:
        failure = _handshake(tls, reader, target, deadline)
        served_ders = reader.served_ders(tls)
        verified_ders = reader.verified_ders(tls) if failure is None and not settings.insecure \
            else None
        cipher = tls.cipher() or (None, None)        # set even when verification failed
        result.tls_version, result.cipher = tls.version() or cipher[1], cipher[0]
    finally:
        tls.close()
    if not served_ders:
        raise FetchError("%s: could not read the chain the server sent (method: %s)"
                         % (target, reader.method))
    if len(served_ders) > MAX_CHAIN:
        raise FetchError("%s: the server sent more than %d certificates" % (target, MAX_CHAIN))
    result.served = parse_chain(served_ders, target)
    result.issuing, result.problems = clean_path(result.served)
    if failure is not None:
        result.verify_error = failure.reason
        raise explain_verify_failure(failure, result, reader.trust, bool(settings.plan))
    if not settings.insecure:
        check_completeness(result, reader, verified_ders, settings)


def check_completeness(result, reader, verified_ders, settings):
    """Keep the verified path. When the server left out intermediates that
    verification found in the trust store, the issuing path (what files get)
    is completed with them, result.missing counts them, and a problem names
    the server as misconfigured: never install less than a browser needs."""
    if verified_ders is not None:
        result.verified = verified_path(result, verified_ders)
    else:
        result.verified = rebuild_verified(result.issuing, reader)
    path = result.verified
    if len(path) > 1 and path[-1].self_issued:
        path = path[:-1]                                    # the root stays in the store
    sent = len(result.issuing)
    if len(path) > sent and [c.der for c in path[:sent]] == [c.der for c in result.issuing]:
        result.missing, result.issuing = len(path) - sent, list(path)
        result.problems.append(
            "%s, without the %d intermediate certificate(s) that verification found in %s: "
            "the server is misconfigured (point it at fullchain.pem); clients that lack them "
            "fail" % (sent_only(sent, len(path)), result.missing, reader.trust))


def verified_path(result, ders):
    """The verified path as certificates. Where it starts with the issuing path,
    as it nearly always does, those are reused as already parsed: only what the
    trust store added (intermediates, the root) is decoded here."""
    sent = [cert.der for cert in result.issuing]
    source = "%s: the verified path" % result.target
    if ders[:len(sent)] == sent:
        return result.issuing + parse_chain(ders[len(sent):], source)
    return parse_chain(ders, source)


def sent_only(sent, complete):
    """How much of its chain an incomplete server sent (the root aside)."""
    if sent == 1:
        return "the server sent only its leaf"
    return "the server sent only %d of the %d certificates of its chain" % (sent, complete)


def explain_verify_failure(failure, result, trust, installing):
    """A verification failure, told with what the server sent: a leaf alone,
    the root the chain leads to, the names the leaf covers. While installing,
    no hint suggests --insecure."""
    reason, leaf, last = failure.reason, result.issuing[0], result.issuing[-1]
    lower = reason.lower()
    if "match" in lower:
        hint = "the leaf covers %s; pass -n/--servername with one of those names" % (
            leaf.covered_names)
    elif "issuer" not in lower and "self signed" not in lower and "self-signed" not in lower:
        hint = verify_hint(reason, result.target, trust, installing)
    elif len(result.issuing) == 1 and not leaf.self_issued and not leaf.is_ca:
        return VerifyError("%s: certificate verification failed: %s: the server sent only its "
                           "leaf (issued by \"%s\"); point it at fullchain.pem" % (
                               result.target, reason, printable(leaf.issuer)),
                           hint="certbot's fullchain.pem holds the leaf and its "
                                "intermediates, cert.pem only the leaf", reason=reason)
    else:
        hint = unknown_root_hint(last, trust, installing)
    return VerifyError(str(failure), hint=hint, reason=reason)


def unknown_root_hint(last, trust, installing):
    """Name the root the chain leads to; --insecure only when not installing."""
    root = printable(last.subject if last.self_issued else last.issuer)
    if trust == "the system store":
        hint = "the chain leads to the root \"%s\", which this host does not trust: pass " \
               "--cafile ROOT.pem with that root (or install ca-certificates)" % root
    else:
        hint = "the chain leads to the root \"%s\", which %s does not hold: if your CA " \
               "changed its root, add the new one" % (root, trust)
    return hint if installing else hint + "; --insecure skips verification"


def _handshake(tls, reader, target, deadline):
    """Complete the handshake. A failed verification is returned, not raised,
    so that the chain can still be read from the connection."""
    try:
        tls.settimeout(remaining(deadline, target, "before the TLS handshake"))
        tls.do_handshake()
    except socket.timeout:
        raise timed_out(target, "during the TLS handshake")
    except (ssl.CertificateError, OSError) as exc:      # an SSLError is an OSError
        return handshake_failure(exc, tls, reader, target)
    return None


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
    return VerifyError("%s: certificate verification failed: %s" % (target, message),
                       hint=verify_hint(message, target, trust), reason=message)


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


def verify_hint(message, target, trust, installing=False):
    message = message.lower()
    if "expired" in message or "not yet valid" in message:
        return "check this machine's clock (date -u); if it is right, the server serves a " \
               "stale certificate%s" % ("" if installing else ". --insecure fetches it anyway")
    if "match" in message:
        return "the certificate does not cover %s: pass -n/--servername with a name it " \
               "covers" % target.verify_name
    if trust != "the system store":
        return "the chain does not lead to a root in %s: is it the right root? " \
               "--insecure skips verification" % trust
    return "the chain does not lead to a root this host trusts: pass --cafile ROOT.pem " \
           "(or install ca-certificates); --insecure skips verification"


def refetch_for_key(result, reader, settings):
    """Match the leaf with the --key-path keys, once (result.key, for the gate).
    When none matches and the server sent the certificate for the other key type
    (a dual-certificate server): ask again, offering only that type's suites."""
    if result.error is None:
        result.key = matching_key(settings.keys, result.leaf)
    wanted = _wanted_key_kind(result, settings.keys)
    if wanted and wanted in reader.by_key_kind:
        retry = _fetch_once(result.target, reader.by_key_kind[wanted], settings)
        if retry.error is None:
            retry.key = matching_key(settings.keys, retry.leaf)
            retry.note = "asked again for the %s certificate, matching --key-path" % wanted
            return retry
    return result


def _wanted_key_kind(result, keys):
    """The other key type, when no --key-path matches the served leaf and one of
    them is (or, for a key certgrab cannot read, may be) of that type."""
    if not keys or result.error is not None or result.key is not None:
        return None
    served = result.leaf.key_type.split()[0]
    kinds = [key.kind for key in keys if key.kind and key.kind != served]
    if kinds:
        return kinds[0]
    if served in ("RSA", "EC") and any(key.kind is None for key in keys):
        return "EC" if served == "RSA" else "RSA"
    return None


# ---------------------------------------------------------------------------
# Several sources: fetched at once, the newest good chain wins.
# ---------------------------------------------------------------------------

def fetch_all(targets, reader, settings, reporter, sharers=1):
    """Fetch every target, fetch_width at a time; results in the order given.
    Progress on a terminal for long runs, written by this thread. sharers: how
    many runs (--config's sections) share this process's limits at once."""
    if len(targets) == 1:
        return [fetch_chain(targets[0], reader, settings)]
    done, lock = [0], threading.Lock()

    def fetch(target):
        result = _fetch_guarded(target, reader, settings)
        with lock:
            done[0] += 1
        return result

    def progress(threads):
        for thread in threads:
            while thread.is_alive():
                reporter.progress("\rcertgrab: %d/%d sources done" % (done[0], len(targets)))
                thread.join(PROGRESS_EVERY)
        reporter.progress("\rcertgrab: %d/%d sources done\n" % (done[0], len(targets)))

    width = fetch_width(settings.parallel, len(targets), reporter, sharers)
    show = len(targets) >= PROGRESS_FROM and not reporter.quiet and sys.stderr.isatty()
    return map_in_threads(fetch, targets, width, reporter, "fetching %d source(s)",
                          progress if show else None)


def map_in_threads(function, items, width, reporter, doing, waiting=None):
    """[function(item) for item in items], width threads at a time (fewer when the
    host refuses more threads; with none at all, one by one in this thread); each
    thread takes the next item when done. waiting(threads), if given, runs in this
    thread meanwhile. An exception escaping function is a bug: raised here, once
    every thread is done."""
    results, pending, lock = [None] * len(items), list(range(len(items))), threading.Lock()
    pending.reverse()                                   # pop() takes the first given

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop()
            try:
                results[index] = function(items[index])
            except BaseException as exc:  # a bug: re-raised in the calling thread below
                results[index] = exc

    threads = start_workers(worker, width, reporter, doing)
    if not threads:
        worker()
    elif waiting:
        waiting(threads)
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _fetch_guarded(target, reader, settings):
    """fetch_chain; running out of memory is this source's error."""
    try:
        return fetch_chain(target, reader, settings)
    except MemoryError:
        result = FetchResult(target)
        result.error = FetchError("%s: out of memory" % target, hint=FEWER_AT_ONCE)
        return result


def fetch_width(parallel, count, reporter, sharers=1):
    """Sources fetched at once: --parallel (default DEFAULT_PARALLEL), no more
    than there are sources, and no more than the open-files limit allows once
    raised toward its hard limit, shared by the sharers runs at once (--config's
    sections). A --parallel above that is lowered, saying so."""
    wanted = min(count, parallel or DEFAULT_PARALLEL)
    limit = open_file_limit(FILES_KEPT + wanted * FILES_PER_FETCH * sharers)
    allowed = max(1, (limit - FILES_KEPT) // FILES_PER_FETCH // sharers)
    if wanted <= allowed:
        return wanted
    shared = ", shared by %d sections at once" % sharers if sharers > 1 else ""
    if parallel:
        reporter.warn("--parallel %d lowered to %d: this process may open only %d files "
                      "(ulimit -n), %d per source at once%s" % (parallel, allowed, limit,
                                                                 FILES_PER_FETCH, shared))
    else:
        reporter.info("fetching %d sources at a time: this process may open only %d files "
                      "(ulimit -n)%s" % (allowed, limit, shared))
    return allowed


def start_workers(worker, width, reporter, doing):
    """Start width threads running worker; fewer (said) when the system refuses more.
    doing says what each thread does, for that warning: "fetching %d source(s)"."""
    threads = []
    for _ in range(width):
        thread = threading.Thread(target=worker, daemon=True)
        try:
            thread.start()
        except RuntimeError:        # "can't start new thread": out of threads or memory
            reporter.warn("could start only %d of %d threads (out of threads or memory): "
                          "%s at a time" % (len(threads), width, doing % max(1, len(threads))))
            break
        threads.append(thread)
    return threads


def address_target(target, sockaddr):
    """The Target of one address of target's host name: dialled at that address, with
    the name's SNI and verified name, named in reports as name[address]:port."""
    address = sockaddr[0]
    if len(sockaddr) > 3 and sockaddr[3] and "%" not in address:
        address += "%%%d" % sockaddr[3]             # an IPv6 link-local address's zone
    label = "%s[%s]:%d" % (target.host, address, target.port)
    return Target(label, address, target.port, target.servername)


def addresses_of(target, family, timeout):
    """--all-addresses: a Target per A and AAAA address of target's host name, in the
    resolver's order (the lookup within timeout, as resolve() does for any source);
    a FetchResult holding the error when the name resolves to nothing."""
    result, started = FetchResult(target), time.monotonic()
    try:
        answers = resolve(target, family, started + timeout)
        if not answers:
            raise FetchError("%s: %s resolves to no address" % (target, target.host))
    except CertgrabError as exc:
        result.error, result.elapsed = exc, time.monotonic() - started
        return result
    return [address_target(target, answer[4]) for answer in answers]


def _address_key(target):
    """What makes two address sources the same: address (as bytes), port and name."""
    address, _, zone = target.host.partition("%")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address), zone, target.port, target.servername


def _first_time(target, seen, reporter, of_a_name):
    """True unless a name's address was met before (a SOURCE given as an address is
    always fetched, and remembered)."""
    key = _address_key(target)
    if key in seen and of_a_name:
        reporter.info("%s: the same address as an earlier source: fetched once" % target)
        return False
    seen.add(key)
    return True


def fetch_every_address(targets, reader, settings, reporter, sharers=1):
    """--all-addresses: fetch_all, after each SOURCE that is a host name became a
    source per address (addresses_of). Results in the order given, each name's
    addresses in the resolver's order; a name that resolves to nothing is that
    source's error. An address met before (a SOURCE given as that address, or
    another name's, with the same port and name) is fetched once."""
    names = [target for target in targets if target.host and not is_ip(target.host)]
    looked_up = {}
    if names:
        width = fetch_width(settings.parallel, len(names), reporter, sharers)
        looked_up = dict(zip(names, map_in_threads(
            lambda target: addresses_of(target, settings.family, settings.timeout), names,
            width, reporter, "looking up %d name(s)")))
    groups, seen = [], set()
    for target in targets:
        found = looked_up.get(target, [target])
        if isinstance(found, list):
            found = [each for each in found if each.file or _first_time(each, seen, reporter,
                                                                        target in looked_up)]
        groups.append(found)
    fetched = iter(fetch_all([each for group in groups if isinstance(group, list)
                              for each in group], reader, settings, reporter, sharers))
    results = []
    for group in groups:
        results += [next(fetched) for _ in group] if isinstance(group, list) else [group]
    return results


def choose_result(results, reporter):
    """The newest good chain (latest leaf notBefore, the first given on a tie);
    with several sources the other failures are warned about. When every
    source failed, the worst error is raised and the others are printed."""
    good = [r for r in results if r.error is None]
    if not good:
        worst = max((r.error for r in results), key=lambda error: error.exit_code)
        for result in results:
            if result.error is not worst:
                reporter.error(result.error)
        raise worst
    for result in results:
        if result.error is not None:
            reporter.warn("%s (skipped)" % result.error)
    return max(good, key=lambda r: r.leaf.not_before)


# ---------------------------------------------------------------------------
# Install: output files, written whole or not at all.
# ---------------------------------------------------------------------------

def check_gate(result, keys, now):
    """The install gate: the key (matched while fetching: refetch_for_key), the
    name and the dates; raises RefusedError."""
    leaf, target = result.leaf, result.target
    if keys and result.key is None:
        raise key_mismatch(target, leaf, keys)
    if not leaf.covers(target.verify_name):
        raise RefusedError("%s: the leaf does not cover %s; it covers: %s" % (
            target, target.verify_name, leaf.covered_names))
    if now < leaf.not_before:
        raise RefusedError("%s: the leaf is not valid before %s" % (
            target, format_time(leaf.not_before)), hint="check this machine's clock (date -u)")
    if now >= leaf.not_after:
        raise RefusedError("%s: the leaf expired at %s" % (target, format_time(leaf.not_after)),
                           hint="the server has not renewed, or this machine's clock is "
                                "wrong (date -u)")


def key_mismatch(target, leaf, keys):
    """The refusal of a leaf for none of the keys: which leaf, the likely cause, the fix."""
    return RefusedError(
        "%s: refused the leaf serial %s issued %s: its key (SPKI sha256 %s) is not %s" % (
            target, leaf.serial_hex, format_time(leaf.not_before), leaf.spki_sha256, " nor ".join(
                "--key-path %s (%s)" % (key.path, "SPKI sha256 %s" % key.spki_sha256
                                        if key.spki else "encrypted or unusual key")
                for key in keys)),
        hint="the renewing machine likely made a new key: renew there with --reuse-key "
             "(certbot, lego), or copy its new key here and add it as another --key-path "
             "(README: key rollover)")


def apply_gate(results, keys, reporter):
    """The gate for every fetched chain; a refusal becomes that source's error
    (with -v, what was refused: see refusal_details)."""
    now = time.time()
    for result in results:
        if result.error is None:
            try:
                check_gate(result, keys, now)
            except RefusedError as exc:
                result.error = exc
                for line in refusal_details(result):
                    reporter.info(line)


def refusal_details(result):
    """-v on a refused chain: its protocol, the leaf, and the chain, a line each."""
    leaf = result.leaf
    return ["%s: refused: %s" % (result.target, " ".join(
                filter(None, (result.tls_version, result.cipher))) or "a local file"),
            "%s: refused: leaf serial %s, issued %s, expires %s" % (
                result.target, leaf.serial_hex, format_time(leaf.not_before),
                format_time(leaf.not_after)),
            "%s: refused: chain, leaf first: %s" % (result.target, "; ".join(
                '"%s"' % cert.name for cert in result.issuing))]


def plan_outputs(out_dir, paths, key_paths, privkey=False):
    """(path, kind) for every file asked for, checked before any network I/O:
    --out-dir's files (and privkey.pem with --privkey), then paths, a dict of
    kind ("cert", "chain", "fullchain", "combined") to the file named by its
    --KIND-path (or None). Only privkey.pem may be a --key-path file itself:
    it then gets the key the new leaf matches, in the same set."""
    plan = []
    if out_dir:
        plan += [(os.path.join(out_dir, name), name[:-4]) for name in OUT_DIR_FILES]
    if out_dir and privkey:
        plan.append((os.path.join(out_dir, PRIVKEY_FILE), "privkey"))
    for kind in ("cert", "chain", "fullchain", "combined"):
        if paths[kind]:
            plan.append((paths[kind], kind))
    absolute = [os.path.realpath(path) for path, _ in plan]
    if len(set(absolute)) != len(absolute):
        raise UsageError("two outputs name the same file")
    for key_path in key_paths:
        if any(path == os.path.realpath(key_path) and kind != "privkey"
               for path, (_, kind) in zip(absolute, plan)):
            raise UsageError("an output would overwrite the --key-path file %s" % key_path)
    for path, _ in plan:
        check_target(path)
    return tuple(plan)


def check_target(path):
    """An output and its nearest existing parent can be what they must (the rest: later)."""
    if _kind_of(path, path) == "directory":
        raise WriteError("cannot write %s: it is a directory" % path)
    parent = os.path.dirname(os.path.abspath(path))
    while _kind_of(parent, path) is None:
        parent = os.path.dirname(parent)
    if _kind_of(parent, path) != "directory":
        raise WriteError("cannot write %s: %s is not a directory" % (path, parent))


def _kind_of(path, output):
    """"directory", "other" or None (missing); an error to stat it is said as it is."""
    try:
        return "directory" if stat.S_ISDIR(os.stat(path).st_mode) else "other"
    except (FileNotFoundError, NotADirectoryError):    # look further up
        return None
    except OSError as exc:
        raise WriteError("cannot write %s: cannot look at %s: %s" % (
            output, path, exc.strerror or exc))


def render_outputs(plan, chain, key):
    """(path, bytes, holds_key) for each planned file; key is the --key-path the
    leaf matched, copied only into privkey.pem and the combined file."""
    outputs = []
    for path, kind in plan:
        certs = {"cert": chain[:1], "chain": chain[1:], "privkey": []}.get(kind, chain)
        data = "".join(der_to_pem(cert.der) for cert in certs).encode("ascii")
        data += key.pem if kind in ("combined", "privkey") else b""
        outputs.append((path, data, kind in ("combined", "privkey")))
    return outputs


def read_existing(path):
    try:
        with open(path, "rb") as existing:
            return existing.read(1 << 20)
    except OSError:
        return None


def installed_leaf(plan):
    """What the outputs hold: (newest leaf or None, [(path, why) of damaged outputs]).

    Every cert, fullchain and combined output counts, so a damaged file cannot
    hide a newer leaf in another. An output that exists but cannot be read as
    certificates is damaged, never "nothing installed".
    """
    newest, damaged = None, []
    for path, kind in plan:
        if kind in ("chain", "privkey"):        # no leaf in these
            continue
        try:
            leaf = read_leaf(path)
        except (OSError, ParseError) as exc:
            damaged.append((path, getattr(exc, "strerror", None) or str(exc)))
            continue
        if leaf is not None and (newest is None or leaf.not_before > newest.not_before):
            newest = leaf
    return newest, damaged


def read_leaf(path):
    """The first certificate of an existing output, None when there is no such file.

    Raises OSError when the file cannot be read and ParseError when it is not
    whole PEM certificates (garbage, cut short, bad base64, bad DER, empty).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE)
    except FileNotFoundError:
        return None
    ders = pem_to_ders(data.decode("ascii", "replace"))
    if not ders:
        raise ParseError("no PEM certificate in it")
    return [parse_certificate(der) for der in ders][0]     # every one must be whole


def check_not_older(best, installed, force, reporter):
    """No downgrade: the offered leaf must be the installed one or issued later.

    installed is installed_leaf's answer. A damaged output refuses any offer
    (unless --force): what it held is unknown.
    """
    leaf, (newest, damaged) = best.leaf, installed
    problems = []
    if newest is not None and newest.der != leaf.der and \
            not leaf.not_before > newest.not_before:
        problems.append("%s offers a leaf (%s) that is not newer than the installed one (%s)"
                        % (best.target, leaf.describe(), newest.describe()))
    if damaged:
        problems.append("cannot tell which leaf is installed: " + "; ".join(
            "%s is not a readable certificate file (%s)" % (path, printable(why))
            for path, why in damaged))
    if not problems:
        return
    message = "; ".join(problems)
    if not force:
        raise RefusedError(message, hint="check the damaged file; --force replaces it"
                           if damaged else "the source is behind this machine: it has not "
                           "yet installed the newest certificate; fix the source, not this "
                           "machine")
    reporter.warn(message + "; installing it because of --force")


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
    """Closing releases each lock; a directory opened read-only has nothing to lose."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_stale_temps(plan):
    """Temporary files a killed run left beside the outputs (we hold the lock).

    One that stays could hold a private key (.combined temp files do), so a
    failure here stops the run before anything is written.
    """
    for directory, prefixes in temp_prefixes(plan).items():
        try:
            names = os.listdir(directory)
        except OSError as exc:
            raise WriteError("cannot list %s for leftover temporary files: %s" % (
                directory, exc.strerror or exc), hint="the previous files are unchanged")
        for name in names:
            if name.startswith(prefixes):
                stale = os.path.join(directory, name)
                if not discard_temp(stale):
                    raise WriteError("cannot remove the leftover temporary file %s" % stale,
                                     hint="the previous files are unchanged")


def temp_prefixes(plan):
    """{directory: (".NAME" + TEMP_MARK, ...)} for the outputs in each directory."""
    prefixes = {}
    for path, _ in plan:
        directory = os.path.dirname(os.path.abspath(path))
        prefixes[directory] = prefixes.get(directory, ()) + (
            "." + os.path.basename(path) + TEMP_MARK,)
    return prefixes


def install_files(outputs, settings, mark_pending, reporter):
    """Write each output that differs from the disk; return the paths written.

    Every new version is staged as a temporary file beside its target and
    fsynced before the first rename, so a failure before the renames leaves
    the old files alone, and one during them leaves a set the next run
    completes. With a deploy hook the new files are dated HOOK_PENDING_MTIME
    until it ran.
    """
    changed = changed_outputs(outputs)
    staged, renamed, path = [], [], None
    try:
        for path, data, holds_key in changed:
            staged.append((stage_file(path, data, holds_key, settings, mark_pending), path))
        for temp, path in staged:
            os.replace(temp, path)
            renamed.append(path)
    except OSError as exc:
        left = [temp for temp, target in staged if target not in renamed]
        kept = [temp for temp in left if not discard_temp(temp)]
        raise WriteError(*write_failure(path, exc, renamed, kept, mark_pending))
    for directory in set(os.path.dirname(os.path.abspath(p)) for p, _, _ in changed):
        sync_directory(directory, reporter)
    return renamed


def write_failure(path, exc, renamed, kept, mark_pending):
    """(message, hint) of a failed install_files, true to what is on disk now."""
    message = "cannot write %s: %s" % (path, exc.strerror or exc)
    if kept:
        message += "; could not remove %s" % " ".join(kept)
    if not renamed:
        return message, "the previous files are unchanged"
    return message + "; already new: %s" % " ".join(renamed), \
        "the next run completes the set%s" % (" and runs the deploy hook" if mark_pending
                                              else "")


def changed_outputs(outputs):
    """The outputs whose file does not hold exactly their bytes yet."""
    return [output for output in outputs if read_existing(output[0]) != output[1]]


def stage_file(path, data, holds_key, settings, mark_pending):
    """A fsynced temporary copy of data beside path, with the mode and owner it needs."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    if old is not None:
        mode = old.st_mode & 0o7777
    else:
        mode = 0o600 if holds_key else NEW_FILE_MODE if settings.mode is None else settings.mode
    # A certificate is never executable, set-id or writable by others; the key never public.
    mode &= 0o640 if holds_key else 0o644
    owner = (old.st_uid, old.st_gid) if old else (settings.uid, settings.gid)
    pending = mark_pending or old is not None and int(old.st_mtime) == HOOK_PENDING_MTIME
    return write_temp_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path),
                           data, mode, owner if os.geteuid() == 0 or not old else None,
                           HOOK_PENDING_MTIME if pending else None)


def write_temp_file(directory, name, data, mode=0o600, owner=None, mtime=None):
    """A new file "." + name + TEMP_MARK + random in directory, written and fsynced.

    On any failure the file is emptied and removed: it may hold a private key.
    """
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
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    except OSError:
        close_emptied(fd)
        discard_temp(temp)
        raise
    try:
        os.close(fd)
    except OSError:
        discard_temp(temp)
        raise
    return temp


def close_emptied(fd):
    """Close a temporary file of ours after emptying it (it may hold a private key)."""
    for step in (lambda: os.ftruncate(fd, 0), lambda: os.close(fd)):
        try:
            step()
        except OSError:
            pass


def discard_temp(path):
    """Remove a temporary file of ours; if it cannot go, at least empty it. True if gone."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    return False


def remove_quietly(path):
    """Remove a scratch file that holds nothing secret (key_matches' public
    certificate, an old metrics file's temp); a failure changes nothing."""
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_directory(directory, reporter):
    """Make the renames durable; say so when the filesystem refuses (-v)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        reporter.info("cannot fsync directory %s (%s): the new files are in place, but a "
                      "power failure now could bring back old ones" % (
                          directory, exc.strerror or exc))


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
    """Date the files now: their hook ran. Those that keep the mark get the hook again."""
    failed = None
    for path in paths:
        try:
            os.utime(path, None)
        except OSError as exc:
            failed = failed or (path, exc)
    if failed:
        raise HookError("the deploy hook ran, but cannot clear the hook-pending date of %s: "
                        "%s" % (failed[0], failed[1].strerror or failed[1]),
                        hint="the next run runs the hook again")


def run_deploy_hook(settings, plan, best, leaf=None):
    """--deploy-hook through /bin/sh, context only in the environment (certbot's names).
    leaf: the leaf the files hold, when it is not best's (after a roll back)."""
    import subprocess
    leaf = leaf or best.leaf
    lineage = settings.out_dir or os.path.dirname(os.path.abspath(plan[0][0]))
    env = dict(os.environ)
    names = [n for n in leaf.dns_names if set(n) <= HOST_CHARS] or leaf.ip_addresses
    env.update(RENEWED_LINEAGE=os.path.realpath(lineage), CERTGRAB_SOURCE=best.target.source,
               RENEWED_DOMAINS=" ".join(names),     # an IP-address certificate: its IPs
               CERTGRAB_FILES=" ".join(os.path.abspath(path) for path, _ in plan),
               CERTGRAB_SHA256=leaf.sha256)
    try:
        hook = subprocess.Popen(["/bin/sh", "-c", settings.deploy_hook], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise HookError("cannot run --deploy-hook: %s" % (exc.strerror or exc))
    try:
        status = hook.wait(timeout=settings.hook_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(hook.pid, 9)
        hook.wait()
        raise HookError("--deploy-hook was killed after --hook-timeout %g s; the next run "
                        "retries it" % settings.hook_timeout)
    if status != 0:
        raise HookError("--deploy-hook failed (%s); the next run retries it" % (
            "exit status %d" % status if status > 0 else "signal %d" % -status))


# Rollouts: --min-age holds a new leaf back for a while; --confirm checks after the hook
# that the service serves the new leaf, and puts the previous files back (and refuses that
# leaf from then on) when the hook left the service completing no TLS handshake at all.

def held_until(leaf, installed, min_age, now):
    """--min-age: (until, why). until is the time before which leaf waits, or None
    when it is installed now; why is "young", "installed" (the leaf already
    installed is never held back), "first" (nothing installed: nothing to keep
    serving, so a first install is not held back) or "old enough"."""
    if installed is not None and installed.der == leaf.der:
        return None, "installed"
    until = leaf.not_before + min_age
    if until <= now:
        return None, "old enough"
    return (None, "first") if installed is None else (until, "young")


def duration_text(seconds):
    """A duration as --min-age and --warn take it: "2d", "36h", "90m" or "600s"."""
    for unit in ("d", "h", "m"):
        if seconds % DURATION_UNITS[unit] == 0:
            return "%d%s" % (seconds // DURATION_UNITS[unit], unit)
    return "%gs" % seconds


def hold_back(best, named, min_age, reporter):
    """--min-age: True when the new leaf is held back (said, with the time it goes);
    files and hook are then left alone."""
    installed, damaged = installed_leaf(named)
    if min_age is None or damaged:              # damaged: the gate refuses every leaf
        return False
    until, why = held_until(best.leaf, installed, min_age, time.time())
    if why == "first":
        reporter.say("%s: the leaf (%s) is younger than --min-age %s, but nothing is installed "
                     "yet: a first install is not held back" % (
                         best.target, best.leaf.describe(), duration_text(min_age)))
    if until is None:
        return False
    reporter.say("%s serves a new leaf (%s): held back until %s (--min-age %s); the installed "
                 "leaf (%s) stays" % (best.target, best.leaf.describe(), format_time(until),
                                      duration_text(min_age), installed.describe()))
    reporter.outcome("held back sha256:%s from %s until %s" % (best.leaf.sha256, best.target,
                                                               format_time(until)))
    return True


def read_kept(path):
    """A file certgrab keeps beside the outputs (PREVIOUS_MARK, ROLLED_BACK_MARK); None
    when there is none. Never through a link, never blocking (a FIFO), at most MAX_FILE
    bytes; only a regular file of this user that no one else may write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WriteError("cannot read %s: %s" % (path, exc.strerror or exc))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                or info.st_mode & 0o022:
            raise WriteError("%s is not a file certgrab wrote (a regular file of this user, "
                             "writable by no one else)" % path, hint="remove it")
        chunks, size = [], 0
        while size <= MAX_FILE:
            chunk = os.read(fd, MAX_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_FILE:
        raise WriteError("%s: larger than %d bytes" % (path, MAX_FILE), hint="remove it")
    return b"".join(chunks)


def write_kept(path, name, data, hint):
    """Replace path (beside an output) with data, 0600: a temporary file created
    exclusively ("." + name + TEMP_MARK, removed by the next run if this one dies),
    fsynced, then renamed. hint: what a failure leaves, for its message."""
    temp = None
    try:
        temp = write_temp_file(os.path.dirname(path), name, data, 0o600)
        os.replace(temp, path)
    except OSError as exc:
        if temp is not None:
            discard_temp(temp)
        raise WriteError("cannot write %s: %s" % (path, exc.strerror or exc), hint=hint)


def previous_path(path):
    """Where keep_previous keeps an output's version from before an unconfirmed install."""
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + PREVIOUS_MARK)


def keep_previous(outputs):
    """--confirm, before the install: keep each existing output that is about to change
    (previous_path), until the service is confirmed to serve the new files. One kept
    already (an install not yet confirmed) stays: it is what the service last served."""
    for path, _, _ in changed_outputs(outputs):
        current, kept = read_existing(path), previous_path(path)
        if current is not None and read_kept(kept) is None:
            write_kept(kept, os.path.basename(path), current,
                       "the previous files are unchanged")


def discard_previous(plan):
    """The kept versions are no longer needed: the hook ran (and --confirm confirmed)."""
    for path, _ in plan:
        discard_temp(previous_path(path))       # emptied if it cannot go: it may hold a key


def restore_previous(plan, settings, reporter):
    """Put back each output's kept version, hook-pending, with the mode and owner of the
    file it replaces (stage_file), by a rename; the paths restored."""
    restored = []
    for path, kind in plan:
        kept = previous_path(path)
        data, temp = read_kept(kept), None
        if not data:                            # none kept (or an emptied one: never put back)
            continue
        try:
            temp = stage_file(path, data, kind in ("combined", "privkey"), settings, True)
            os.replace(temp, path)
        except OSError as exc:
            if temp is not None:
                discard_temp(temp)
            raise WriteError("cannot restore %s from %s: %s" % (path, kept, exc.strerror or exc),
                             hint="%s still holds the version to restore" % kept)
        discard_temp(kept)
        restored.append(path)
    for directory in set(os.path.dirname(path) for path in restored):
        sync_directory(directory, reporter)
    return restored


def rolled_back_path(plan):
    """The record of the leaf that was rolled back: beside the first output."""
    first = plan[0][0]
    return os.path.join(os.path.dirname(first), "." + os.path.basename(first) + ROLLED_BACK_MARK)


def rolled_back_sha256(plan):
    """The sha256 of the leaf recorded as rolled back; None when there is none (or the
    record is no certificate)."""
    data = read_kept(rolled_back_path(plan))
    try:
        ders = pem_to_ders(data.decode("ascii", "replace")) if data else []
    except ParseError:
        ders = []
    return hashlib.sha256(ders[0]).hexdigest() if ders else None


def rolled_back_refusal(best, plan, force, reporter):
    """The ConfirmError refusing best's leaf when it is the one rolled back at an earlier
    run; None for any other leaf (a newer one goes), or with --force (said)."""
    if rolled_back_sha256(plan) != best.leaf.sha256:
        return None
    if force:
        reporter.warn("installing the leaf (%s) that was rolled back at an earlier run, "
                      "because of --force" % best.leaf.describe())
        return None
    return ConfirmError(
        "%s serves the leaf %s, which left a --confirm service completing no TLS handshake "
        "after the deploy hook at an earlier run; it was rolled back (%s) and is not "
        "installed again until a newer leaf appears" % (
            best.target, best.leaf.describe(), rolled_back_path(plan)), "restored",
        hint="find what broke the service with that leaf (its error log; nginx -t), fix it, "
             "then run once with --force to install the leaf again")


def refuse_rolled_back(best, named, plan, settings, reporter):
    """Raise rolled_back_refusal's error, once a hook still pending for the installed
    (restored) files has run: files and service stay as they are."""
    refusal = rolled_back_refusal(best, plan, settings.force, reporter)
    if refusal is None:
        return
    pending = pending_files(plan)
    if pending and settings.deploy_hook:
        reporter.notice("retrying the deploy hook, which did not complete for %s" %
                        " ".join(pending))
        run_deploy_hook(settings, named, best, installed_leaf(named)[0])
        clear_pending(pending)
    raise refusal


def confirm_targets(settings, best):
    """A Target per --confirm HOST[:PORT], with the SNI and name of best's source."""
    return [Target(text, host, port, best.target.servername)
            for text, host, port in settings.confirm]


def fetch_service(target, reader, settings, leaf):
    """One try of a --confirm service: its FetchResult, whose served list is empty when
    no TLS handshake completed. A dual-certificate service that sent the other key
    type's leaf is asked again for leaf's (as refetch_for_key does)."""
    result = _fetch_once(target, reader, settings)
    kind = leaf.key_type.split()[0]
    if result.served and result.served[0].der != leaf.der and \
            result.served[0].key_type.split()[0] != kind and kind in reader.by_key_kind:
        retry = _fetch_once(target, reader.by_key_kind[kind], settings)
        if retry.served:
            return retry
    return result


def serves(result, leaf):
    return result is not None and bool(result.served) and result.served[0].der == leaf.der


def await_leaf(targets, leaf, reader, settings):
    """Try each target every CONFIRM_INTERVAL until all serve leaf or --confirm-timeout
    has passed (each try within --timeout): the last FetchResult of each."""
    deadline = time.monotonic() + settings.confirm_timeout
    last = [None] * len(targets)
    while True:
        for index, target in enumerate(targets):
            if not serves(last[index], leaf):
                last[index] = fetch_service(target, reader, settings, leaf)
        left = deadline - time.monotonic()
        if left <= 0 or all(serves(result, leaf) for result in last):
            return last
        time.sleep(min(CONFIRM_INTERVAL, left))


def before_install(outputs, plan, best, reader, settings):
    """--confirm, when the hook is going to run: each service as it is now (a
    FetchResult), and the outputs about to change kept (keep_previous). [] otherwise."""
    if not settings.confirm or not (changed_outputs(outputs) or pending_files(plan)):
        return []
    services = [fetch_service(target, reader, settings, best.leaf)
                for target in confirm_targets(settings, best)]
    keep_previous(outputs)
    return services


def confirmation(before, after, leaf):
    """ "confirmed" when every service serves leaf; "restored" when one that completed
    a TLS handshake before the install completes none now; else "not_confirmed"."""
    if all(serves(result, leaf) for result in after):
        return "confirmed"
    if any(then.served and not now.served for then, now in zip(before, after)):
        return "restored"
    return "not_confirmed"


def service_state(result):
    """What a --confirm service served, for messages."""
    if not result.served:
        return "completes no TLS handshake (%s)" % result.error
    return "serves the leaf %s" % result.served[0].describe()


def not_confirmed_error(before, after, leaf, settings):
    unconfirmed = [(then, now) for then, now in zip(before, after) if not serves(now, leaf)]
    return ConfirmError(
        "the deploy hook ran, but after %g s (--confirm-timeout) %s, not the leaf just "
        "installed (%s); the hook stays pending: the next run runs it again" % (
            settings.confirm_timeout, "; ".join(
                "%s %s%s" % (now.target, service_state(now), "" if now.served or then.served
                             else ", as before the install") for then, now in unconfirmed),
            leaf.describe()), "not_confirmed",
        hint="does the deploy hook reload the service that --confirm dials (e.g. "
             "systemctl reload nginx)?")


def roll_back(best, named, plan, pending, before, after, reader, settings, reporter):
    """A service stopped completing TLS handshakes after the hook: record the leaf
    (rolled_back_refusal), put the previous files back, run the hook again and see
    what the services serve. Returns the ConfirmError that says all of it."""
    write_kept(rolled_back_path(plan), os.path.basename(plan[0][0]),
               der_to_pem(best.leaf.der).encode("ascii"),
               "nothing was rolled back yet: the new files stay, their hook pending")
    restored = restore_previous(plan, settings, reporter)
    broken = ["%s completes no TLS handshake %g s after the deploy hook (before the install "
              "it served the leaf %s)" % (now.target, settings.confirm_timeout,
                                          then.served[0].describe())
              for then, now in zip(before, after) if then.served and not now.served]
    message = "%s: %s" % ("; ".join(broken), "restored the previous %s" % " ".join(restored)
                          if restored else "no previous files to restore")
    previous = installed_leaf(named)[0]
    try:
        run_deploy_hook(settings, named, best, previous)
    except HookError as exc:
        return ConfirmError("%s; the deploy hook, run again, failed: %s" % (message, exc),
                            "restored")
    clear_pending(pending)
    now = await_leaf([result.target for result in after], previous, reader, settings) \
        if restored else after
    return ConfirmError(
        "%s; ran the deploy hook again; now %s; the leaf %s is not installed again until "
        "a newer leaf appears" % (message, "; ".join("%s %s" % (result.target, service_state(
            result)) for result in now), best.leaf.describe()), "restored",
        hint="the service's error log says why it failed with the new files (nginx -t); "
             "%s records the leaf" % rolled_back_path(plan))


def confirm_install(best, named, plan, pending, before, reader, settings, reporter):
    """--confirm after the hook ran: True once every service serves the new leaf
    (said); ConfirmError otherwise, after roll_back when the hook broke a service."""
    started = time.monotonic()
    after = await_leaf([result.target for result in before], best.leaf, reader, settings)
    outcome = confirmation(before, after, best.leaf)
    if outcome == "not_confirmed":
        raise not_confirmed_error(before, after, best.leaf, settings)
    if outcome == "restored":
        raise roll_back(best, named, plan, pending, before, after, reader, settings, reporter)
    discard_temp(rolled_back_path(plan))        # a newer (or --force) leaf took
    reporter.say("confirmed: %s serve%s the leaf just installed (serial %s) after %.1f s" % (
        ", ".join(str(result.target) for result in after), "" if len(after) > 1 else "s",
        best.leaf.serial_hex, time.monotonic() - started))
    return True


def confirm_time(settings):
    """Seconds a run may hold the locks beyond its hook for --confirm: the services
    tried before the install, after it, and after a roll back, plus the hook again."""
    if not settings.confirm:
        return 0.0
    return 2 * settings.confirm_timeout + settings.hook_timeout + \
        3 * len(settings.confirm) * settings.timeout


def install_chain(chain, best, settings, reporter, reader=None):
    """Under the directory locks: no downgrade, write what changed, run the hook (and
    with --confirm, check that the service took the new leaf). Returns "installed"
    (files written or a pending hook ran), "confirmed" (that, and --confirm's services
    serve the leaf), "unchanged", or "held_back" (--min-age); None for a dry run."""
    named = settings.plan
    plan = [(os.path.realpath(path), kind) for path, kind in named]  # write through links
    if hold_back(best, named, settings.min_age, reporter):
        return None if settings.dry_run else "held_back"
    outputs = render_outputs(plan, chain, best.key)
    if settings.dry_run:
        return dry_run(plan, outputs, best, settings, reporter, installed_leaf(named))
    directories = sorted(set(os.path.dirname(os.path.abspath(path)) for path, _ in plan))
    locks = lock_directories(directories, settings.hook_timeout + settings.timeout + LOCK_SLACK
                             + confirm_time(settings))
    try:
        remove_stale_temps(plan)
        check_not_older(best, installed_leaf(named), settings.force, reporter)  # as named
        refuse_rolled_back(best, named, plan, settings, reporter)
        services = before_install(outputs, plan, best, reader, settings)
        mark, confirmed = bool(settings.deploy_hook), False
        changed = install_files(outputs, settings, mark, reporter)
        if changed and not settings.keys:
            reporter.warn("no --key-path: the leaf was not checked against the private key")
        if changed:
            reporter.say("installed the chain from %s (%s; %s): %s" % (
                best.target, best.leaf.describe(), when_expires(best.leaf, time.time()),
                " ".join(changed)))
        pending = sorted(set(pending_files(plan)) | set(changed if mark else ()))
        if pending and settings.deploy_hook:
            retried = [path for path in pending if path not in changed]
            if retried:
                reporter.notice("retrying the deploy hook, which did not complete after an "
                                "earlier run installed %s" % " ".join(retried))
            run_deploy_hook(settings, named, best)
            confirmed = bool(settings.confirm) and confirm_install(
                best, named, plan, pending, services, reader, settings, reporter)
            clear_pending(pending)
            discard_previous(plan)
        elif pending:
            reporter.warn("a deploy hook is still pending for %s (dated %s); a run with "
                          "--deploy-hook retries it" % (" ".join(pending),
                                                        format_time(HOOK_PENDING_MTIME)))
        if not changed and not pending:
            reporter.info("files are up to date; nothing written, no hook run")
        return "confirmed" if confirmed else "installed" if changed or pending and \
            settings.deploy_hook else "unchanged"
    finally:
        unlock_directories(locks)


def dry_run(plan, outputs, best, settings, reporter, installed):
    """--dry-run: the same checks and the same comparison with the disk; no writes."""
    check_not_older(best, installed, settings.force, reporter)
    refusal = rolled_back_refusal(best, plan, settings.force, reporter)
    if refusal is not None:
        raise refusal
    changed = [path for path, _, _ in changed_outputs(outputs)]
    for path in changed:
        directory = os.path.dirname(path)
        while not os.path.exists(directory):
            directory = os.path.dirname(directory)
        if not os.access(directory, os.W_OK):
            raise WriteError("dry run: cannot write %s: %s is not writable" % (path, directory))
    hook = settings.deploy_hook and (changed or pending_files(plan))
    reporter.outcome("dry run: %s" % ("would install sha256:%s from %s" % (
        best.leaf.sha256, best.target) if changed else "unchanged"))
    reporter.say("dry run: %s%s%s" % ("would write " + " ".join(changed) if changed else
                                      "files are up to date", "; would run the deploy hook"
                                      if hook else "", " and confirm on " + ", ".join(
                                          text for text, _, _ in settings.confirm)
                                      if hook and settings.confirm else ""))


# ---------------------------------------------------------------------------
# Reports: stderr lines for people, stdout for the chain.
# ---------------------------------------------------------------------------

def report_fetch(results, best, reader, settings, reporter):
    """Chain problems of the winner; with -v, how each source went."""
    for problem in best.problems:
        reporter.warn("%s: %s%s" % (best.target, problem, " (files get the complete "
                                    "issuing path: leaf, intermediates, no root)"
                                    if settings.plan else ""))
    for result in results if reporter.verbose else ():
        if result.error is None:
            reporter.info("%s (%s): %s %s, %d certificate(s) read with %s, %s, %.0f ms" % (
                result.target, result.address, result.tls_version, result.cipher,
                len(result.served), reader.method,
                "NOT verified (--insecure)" if settings.insecure else "verified",
                result.elapsed * 1000))
            if result.note:
                reporter.info("  " + result.note)
            for index, cert in enumerate(result.served):
                reporter.info("  %d %s (issuer %s) %s to %s (%s)" % (
                    index, cert.name, printable(cert.issuer), format_time(cert.not_before),
                    format_time(cert.not_after), when_expires(cert, time.time())))
    if len(results) > 1:        # with files, the install message names the source
        (reporter.info if settings.plan else reporter.say)(
            "using the chain from %s (newest valid leaf, issued %s)"
            % (best.target, format_time(best.leaf.not_before)))


def wrap_items(items, width):
    """Items joined by ", " in lines of at most width characters; an item longer
    than a line is cut into lines of its own."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 2 + len(item) > width:
            lines[-1] += ","
            lines.append("")
        while len(item) > width:
            if lines[-1]:
                lines[-1] += ","
                lines.append("")
            lines[-1], item = item[:width], item[width:]
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


def report(results, settings, reporter):
    """--text, --json or --check over every result; returns the exit code. Each
    source's error is in its own part of the report (and, but for --check, on
    stderr too): one bad source never hides the others."""
    now = time.time()
    if settings.report == "check":
        return check_report(results, settings, now)
    for result in results:
        if result.error is not None:
            reporter.error(result.error)
    if settings.report == "json":
        write_stdout(json_text([source_json(r, settings, now) for r in results]) + "\n")
    else:
        write_stdout("\n".join(text_lines(r, settings, now) for r in results))
    failures = [r.error for r in results if r.error is not None]
    return max(error.exit_code for error in failures) if failures else 0


def verdict(result, settings):
    if result.target.file:
        return "not verified (a local file)"
    if settings.insecure:
        return "NOT verified (--insecure)"
    return "FAILED: " + result.verify_error if result.verify_error else "OK"


def format_span(seconds):
    """A span for people: "8435 days"; under HOURS_BELOW "2 days 5 hours", "14 hours",
    "35 minutes" (whole units, rounded down)."""
    seconds = int(abs(seconds))
    days, hours = seconds // DAY, seconds % DAY // HOUR
    if days and (seconds >= HOURS_BELOW or not hours):
        return _count(days, "day")
    if days:
        return "%s %s" % (_count(days, "day"), _count(hours, "hour"))
    return _count(hours, "hour") if hours else _count(seconds // MINUTE, "minute")


def _count(number, unit):
    return "%d %s%s" % (number, unit, "" if number == 1 else "s")


def when_expires(cert, now):
    """ "expires in 2 days 5 hours" or "EXPIRED 3 hours ago"."""
    left = cert.not_after - now
    return "EXPIRED %s ago" % format_span(left) if left < 0 else \
        "expires in %s" % format_span(left)


def when_issued(cert, now):
    """ "issued 3 hours ago" or "not valid for another 2 hours"."""
    age = now - cert.not_before
    return "issued %s ago" % format_span(age) if age >= 0 else \
        "not valid for another %s" % format_span(age)


def text_lines(result, settings, now):
    """One source for people: 80 columns, certificate text escaped."""
    target = result.target
    lines = ["%s%s" % (target, " (%s)" % result.address if result.address else "")]
    if not target.file:
        lines.append("  servername:   %s" % (target.servername or "(none: IP address)"))
    if result.error is not None and not result.served:
        return "\n".join(lines + ["  error:        %s" % result.error]) + "\n"
    if result.tls_version:
        lines.append("  protocol:     %s %s%s" % (result.tls_version, result.cipher,
                                                 " after STARTTLS " + settings.starttls
                                                 if settings.starttls else ""))
    lines.append("  verification: %s" % verdict(result, settings))
    lines += ["  warning:      %s" % problem for problem in result.problems]
    for index, cert in enumerate(result.served):
        lines += certificate_lines(index, cert, now)
    return "\n".join(lines) + "\n"


def certificate_lines(index, cert, now):
    rows = []
    subject = printable(cert.subject).split(", ") if cert.subject else ["(empty: see SANs)"]
    for label, items in (("subject", subject),
                         ("issuer", printable(cert.issuer).split(", ")),
                         ("serial", [cert.serial_hex]),
                         ("SANs", [printable(name) for name in cert.sans] or ["(none)"])):
        rows += [(label if number == 0 else "", line)
                 for number, line in enumerate(wrap_items(items, TEXT_WIDTH))]
    rows += [("key", "%s%s" % (cert.key_type, " (%d bits)" % cert.key_bits
                               if cert.key_bits else "")),
             ("sig alg", cert.signature_algorithm),
             ("from", "%s (%s)" % (format_time(cert.not_before), when_issued(cert, now))),
             ("until", "%s (%s)" % (format_time(cert.not_after), when_expires(cert, now))),
             ("sha256", cert.sha256), ("spki pin", spki_pin(cert)),
             ("CA", "yes" if cert.is_ca else "no")]
    return ["  [%d] %-8s %s" % (index, rows[0][0], rows[0][1])] + \
        ["      %-8s %s" % row for row in rows[1:]]


def spki_pin(cert):
    """The HPKP-style pin: base64 of the SHA-256 of the SubjectPublicKeyInfo."""
    import hashlib
    return binascii.b2a_base64(hashlib.sha256(cert.spki).digest()).decode("ascii").strip()


def source_json(result, settings, now):
    target = result.target
    return [
        ("source", target.source), ("address", result.address),
        ("servername", target.servername), ("error", None if result.error is None
                                              else str(result.error)),
        ("tls_version", result.tls_version), ("cipher", result.cipher),
        ("verified", None if target.file or settings.insecure or not result.served else
         result.error is None and result.verify_error is None),
        ("verify_error", result.verify_error), ("problems", result.problems),
        ("chain", [certificate_json(cert, now) for cert in result.served]),
    ]


def certificate_json(cert, now):
    return [("subject", cert.subject), ("issuer", cert.issuer), ("serial", cert.serial_hex),
            ("sans", cert.sans), ("key", cert.key_type), ("key_bits", cert.key_bits),
            ("signature_algorithm", cert.signature_algorithm),
            ("not_before", format_time(cert.not_before)),
            ("not_after", format_time(cert.not_after)), ("sha256", cert.sha256),
            ("spki_sha256", cert.spki_sha256), ("spki_pin", spki_pin(cert)),
            ("is_ca", cert.is_ca), ("lifetime_seconds", cert.lifetime),
            ("seconds_left", int(cert.not_after - now))]


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


def check_report(results, settings, now):
    """Nagios plugin output: a summary line with perfdata, then one line per source.
    A source's line is its worst finding: expiry, served chain, --same."""
    lines = [check_source(result, settings, now) for result in results]
    if settings.chain_warning:
        lines = [max(line, chain_status(result), key=lambda s: s[0])
                 for line, result in zip(lines, results)]
    if settings.same:
        lines = [max(line, same, key=lambda s: s[0])
                 for line, same in zip(lines, same_chain_statuses(results))]
    worst = max(status for status, _ in lines)
    counts = ", ".join("%d %s" % (sum(s == n for s, _ in lines), NAGIOS[n])
                       for n in range(4) if any(s == n for s, _ in lines))
    labels = [r.target.source.replace("'", "").replace("=", "") for r in results]
    seen, repeated = set(), set()       # labels given twice get "#n": linear in sources
    for label in labels:
        (repeated if label in seen else seen).add(label)
    perfdata = " ".join(check_perfdata(
        "%s #%d" % (label, index + 1) if label in repeated else label,
        result, settings, now)
        for index, (label, result) in enumerate(zip(labels, results)) if result.issuing)
    first_problem = next(("; first: " + text for status, text in lines if status == worst
                          and worst), "")   # notifications often show the first line only
    write_stdout("CERTGRAB %s - %d source(s): %s%s%s\n" % (
        NAGIOS[worst], len(results), counts, first_problem, " | " + perfdata if perfdata else "")
        + "".join("%s - %s\n" % (NAGIOS[s], text) for s, text in lines))
    return worst


def check_perfdata(label, result, settings, now):
    """'expires_in LABEL'=SECONDSs;WARN:;CRIT: for the certificate the status line
    names (Nagios ranges: "W:" alerts below W), and 'age LABEL' of the leaf."""
    cert = most_urgent(result.issuing, settings, now)
    return "'expires_in %s'=%ds;%d:;%d: 'age %s'=%ds" % (
        label, cert.not_after - now, threshold_seconds(settings.warn, cert),
        threshold_seconds(settings.crit, cert), label, now - result.issuing[0].not_before)


def threshold_seconds(threshold, cert):
    """--warn/--crit for this certificate: (amount, is_share) -> seconds left."""
    amount, is_share = threshold
    return amount * cert.lifetime if is_share else amount


def expiry_status(cert, settings, now):
    """0 OK, 1 WARNING, 2 CRITICAL: seconds left against cert's own thresholds."""
    left = cert.not_after - now
    return 2 if left < threshold_seconds(settings.crit, cert) else \
        1 if left < threshold_seconds(settings.warn, cert) else 0


def most_urgent(certs, settings, now):
    """The certificate of the worst status; of those, the one that expires first."""
    return max(certs, key=lambda cert: (expiry_status(cert, settings, now), -cert.not_after))


def check_source(result, settings, now):
    """(status, text) for one source."""
    target = result.target
    if result.verify_error or result.error is not None and not result.served:
        return 2, "%s" % result.error       # unreachable, malformed, or not verified
    leaf = result.issuing[0]
    difference = settings.expected is not None and expect_difference(result, settings)
    if difference:
        return 2, difference
    soonest = most_urgent(result.issuing, settings, now)
    what = "the leaf" if soonest is leaf else "intermediate %s" % soonest.name
    text = "%s: %s %s (%s), chain of %d %s, the leaf %s" % (
        target, what, when_expires(soonest, now), format_time(soonest.not_after),
        len(result.issuing), "verified" if not (target.file or settings.insecure)
        else "not verified", when_issued(leaf, now))
    return expiry_status(soonest, settings, now), text


def leaf_summary(leaf):
    return "sha256 %s... issued %s" % (leaf.sha256[:16], format_time(leaf.not_before))


def chain_status(result):
    """--check: WARNING for a served chain that lacks intermediates or is out of
    order (--no-chain-warning turns this off): clients that lack them fail."""
    if not result.issuing or result.error is not None:
        return 0, ""
    for problem in result.problems:
        if problem == OUT_OF_ORDER or result.missing and problem.startswith(
                "the server sent only"):
            return 1, "%s: %s" % (result.target, problem)
    return 0, ""


def served_path(result):
    """The issuing path as the server sent it (without intermediates found locally)."""
    return result.issuing[:len(result.issuing) - result.missing]


def chain_age(result):
    """--same's order: the leaf's notBefore, then its intermediates' (the leaf's issuer
    first)."""
    path = served_path(result)
    return path[0].not_before, [cert.not_before for cert in path[1:]]


def same_chain_statuses(results):
    """--same: CRITICAL for each source whose served chain (leaf and intermediates)
    is not the newest valid one among the sources (chain_age; the first given on a
    tie). Linear in the number of sources: the newest is found once."""
    good = [r for r in results if r.error is None and r.issuing]
    if not good:
        return [(0, "")] * len(results)
    newest = max(good, key=chain_age)
    want = served_path(newest)
    statuses = []
    for result in results:
        difference = result.error is None and result.issuing and \
            first_difference(served_path(result), want)
        statuses.append((2, "%s: not the newest chain: serves %s; the newest (%s) serves %s" % (
            result.target, difference[0], newest.target, difference[1]))
                        if difference else (0, ""))
    return statuses


def expect_difference(result, settings):
    """--expect-file: how the served chain differs from the file's ("" if it does
    not). A file with one certificate (cert.pem) is compared with the leaf only."""
    served = served_path(result)
    expected = settings.expected
    difference = first_difference(served[:1] if len(expected) == 1 else served, expected)
    if not difference:
        return ""
    return "%s: serves %s; %s has %s (a service not reloaded?)" % (
        result.target, difference[0], settings.expect_file, difference[1])


def first_difference(chain, other):
    """(what chain has, what other has) at the first position where they differ,
    described for people; None when both hold the same certificates in order."""
    for index in range(max(len(chain), len(other))):
        mine = chain[index] if index < len(chain) else None
        theirs = other[index] if index < len(other) else None
        if mine is None or theirs is None or mine.der != theirs.der:
            return cert_summary(mine, index), cert_summary(theirs, index)
    return None


def cert_summary(cert, index):
    """The leaf or intermediate N of a chain, by subject, sha256 and notBefore."""
    if cert is None:
        return "no intermediate %d" % index
    what = "the leaf" if index == 0 else 'intermediate %d "%s"' % (index, cert.name)
    return "%s (%s)" % (what, leaf_summary(cert))


# Metrics for Prometheus: node_exporter's textfile collector reads --prometheus FILE.
# Every series has run="FILE's name without .prom", so that two certgrab runs writing
# two files into one collector directory never export the same series twice.

INSTALL_OUTCOMES = ("installed", "unchanged", "held_back", "refused", "hook_failed",
                    "not_confirmed", "restored", "failed")
LAST_SYNC = "certgrab_last_sync_timestamp_seconds"
LAST_CONFIRM = "certgrab_last_confirm_timestamp_seconds"


def metrics_text(results, settings, clock, outcome):
    """The exposition text: (name, help, [(labels, value)]) per metric, in order."""
    run = [("run", printable(os.path.basename(settings.prometheus).rsplit(".prom", 1)[0]))]
    now = time.time()
    metrics = [("certgrab_run_timestamp_seconds", "When this run started.", [(run, clock[0])]),
               ("certgrab_run_duration_seconds", "How long this run took.",
                [(run, time.monotonic() - clock[1])])]
    metrics += source_metrics(results, settings, run)
    leaves = set(r.leaf.sha256 for r in results if r.issuing)
    metrics.append(("certgrab_distinct_leaves", "Different leaves served across the sources "
                    "(1: the fleet has converged).", [(run, len(leaves))]))
    if outcome is not None:
        installed = "installed" if outcome == "confirmed" else outcome
        metrics.append(("certgrab_install_outcome", "This run's install: 1 for its outcome.",
                        [(run + [("outcome", name)], int(name == installed))
                         for name in INSTALL_OUTCOMES]))
        last = now if installed in ("installed", "unchanged", "held_back") else \
            previous_value(settings.prometheus, LAST_SYNC)
        if last is not None:
            metrics.append((LAST_SYNC, "When a run last installed or confirmed the files.",
                            [(run, last)]))
        metrics += confirm_metrics(results, settings, run, outcome, now)
    return "".join("# HELP %s %s\n# TYPE %s gauge\n%s" % (name, text, name, "".join(
        "%s%s %s\n" % (name, metric_labels(labels), metric_value(value))
        for labels, value in series)) for name, text, series in metrics if series)


def previous_confirm(path, run):
    """LAST_CONFIRM's series in the metrics file a previous run wrote: [] or one."""
    import re
    pattern = (r'%s\{run="(?:[^"\\]|\\.)*",serial="(-?[0-9a-f]+)",sha256="([0-9a-f]{64})"\} '
               r'([0-9]+(?:\.[0-9]+)?)$' % LAST_CONFIRM)
    for line in (read_existing(path) or b"").decode("utf-8", "replace").splitlines():
        match = re.match(pattern, line)
        if match:
            return [(run + [("serial", match.group(1)), ("sha256", match.group(2))],
                     float(match.group(3)))]
    return []


def confirm_metrics(results, settings, run, outcome, now):
    """--confirm: when a run last confirmed that the services serve the installed leaf,
    that leaf's serial and sha256 as labels. A run that confirmed nothing carries the
    series over from the FILE the previous run wrote (previous_confirm)."""
    if not settings.confirm:
        return []
    if outcome == "confirmed":
        leaf = max((r for r in results if r.error is None), key=lambda r: r.leaf.not_before).leaf
        series = [(run + [("serial", leaf.serial_hex), ("sha256", leaf.sha256)], now)]
    else:
        series = previous_confirm(settings.prometheus, run)
    return [(LAST_CONFIRM, "When --confirm last saw the services serve the installed leaf "
             "(its serial and sha256 in labels).", series)]


def source_metrics(results, settings, run):
    """Per source: fetch and verification; per certificate of the issuing path
    (position 0 is the leaf): its dates; the chain's earliest notAfter."""
    fetched, verified, before, after, chain = [], [], [], [], []
    for result in results:
        target = result.target
        labels = run + [("source", printable(target.source)),
                        ("servername", target.servername or "")]
        fetched.append((labels, int(bool(result.served))))
        if not (target.file or settings.insecure):
            verified.append((labels, int(bool(result.served) and not result.verify_error
                                         and not isinstance(result.error, VerifyError))))
        for position, cert in enumerate(result.issuing):
            named = labels + [("position", str(position)), ("sha256", cert.sha256),
                              ("name", cert.name)]
            before.append((named, cert.not_before))
            after.append((named, cert.not_after))
        if result.issuing:
            chain.append((labels, min(cert.not_after for cert in result.issuing)))
    return [
        ("certgrab_source_fetch_success", "1 if the source's chain was read.", fetched),
        ("certgrab_source_verify_success", "1 if the source's chain verified.", verified),
        ("certgrab_certificate_not_before_timestamp_seconds",
         "notBefore of each certificate of the issuing path.", before),
        ("certgrab_certificate_not_after_timestamp_seconds",
         "notAfter of each certificate of the issuing path.", after),
        ("certgrab_chain_not_after_timestamp_seconds",
         "The earliest notAfter of the source's issuing path.", chain)]


def metric_labels(pairs):
    """{a="x",b="y"}, the values (made terminal-safe by printable() where they come from
    a certificate or the command line) escaped as the exposition format says."""
    return "{%s}" % ",".join('%s="%s"' % (key, value.replace("\\", "\\\\")
                                            .replace('"', '\\"').replace("\n", "\\n"))
                             for key, value in pairs)


def metric_value(value):
    return "%d" % value if isinstance(value, int) else "%.3f" % value


def previous_value(path, name):
    """name's value in the metrics file a previous run wrote; None if unknown."""
    data = read_existing(path) or b""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def write_metrics(path, text, reporter):
    """Replace path atomically: a temp file beside it, fsynced, renamed over it. The
    temp's name does not end in .prom, so the textfile collector never reads it."""
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        for stale in os.listdir(directory):
            if stale.startswith("." + name + TEMP_MARK) and \
                    time.time() - os.stat(os.path.join(directory, stale)).st_mtime > \
                    METRICS_TEMP_STALE:
                remove_quietly(os.path.join(directory, stale))
        temp = write_temp_file(directory, name, text.encode("utf-8"), NEW_FILE_MODE)
        try:
            os.replace(temp, path)
        except OSError:
            remove_quietly(temp)
            raise
    except OSError as exc:
        raise WriteError("cannot write --prometheus %s: %s" % (path, exc.strerror or exc))
    sync_directory(directory, reporter)


def record_run(settings, results, clock, outcome, code, reporter):
    """--prometheus: write the run's metrics; returns the run's exit code. A failed
    write is an error line; it makes a run that otherwise succeeded exit 5, but
    leaves --check's status alone (the status line is already out)."""
    if not settings.prometheus:
        return code
    try:
        write_metrics(settings.prometheus, metrics_text(results, settings, clock, outcome),
                      reporter)
    except WriteError as exc:
        reporter.error(exc)
        return code or (0 if settings.report == "check" else exc.exit_code)
    return code


def install_outcome(exc, settings):
    """The outcome of an install that raised exc; None when the run installs nothing."""
    if not settings.plan or settings.dry_run:
        return None
    return exc.outcome if isinstance(exc, ConfirmError) else \
        "refused" if isinstance(exc, RefusedError) else \
        "hook_failed" if isinstance(exc, HookError) else "failed"


# ---------------------------------------------------------------------------
# Command line: argparse, validated once into read-only Settings, then main().
# ---------------------------------------------------------------------------

USAGE = "certgrab.py SOURCE [SOURCE ...] [-n NAME] [options]"
DESCRIPTION = """\
Fetch the certificate chain a TLS server presents, verify it, write it.

SOURCE is host, host:port, IPv4, [IPv6]:port or IPv6 (default port 443).
With several SOURCEs, all are fetched at once and the newest valid chain wins.
Verification is on by default, against the system CA store.
With no output option the chain is printed as PEM exactly as served."""
EXAMPLES = """\
examples:
  certgrab.py 203.0.113.7 -n www.example.com > fullchain.pem
  certgrab.py [2001:db8::7]:8443 -n www.example.com --out-dir /etc/ssl/example
  certgrab.py 10.0.0.5 10.0.0.6 -n www.example.com --cafile ca.pem --out-dir x
  certgrab.py --config /etc/certgrab/certgrab.conf --dry-run"""
CHECK_FLAGS = ("--check", "--same", "--expect-file")     # a plugin's run: UNKNOWN on errors
# Options of the run itself, never keys of a --config file: every other long option is one.
COMMAND_LINE_ONLY = ("--help", "--version", "--config", "--section", "--syslog")
OUTPUT_OPTIONS = ("out_dir", "cert_path", "chain_path", "fullchain_path", "combined_path")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        raise UsageError(message or "argparse wanted to exit with status %d" % status)


# Every option: (group, ((flags, value, help), ...)) in --help's order, as README's
# usage table groups them. value is the metavar, SWITCH for a flag without one, and
# "NAME..." for an option that may be given more than once. --config reads its keys
# from the same definitions (file_options).
SWITCH = None
OPTIONS = (
    ("connecting", (
        (("-n", "--servername"), "NAME", "SNI and the name verified (default: SOURCE's host)"),
        (("-p", "--port"), "PORT", "port for a SOURCE without one (default %d)" % DEFAULT_PORT),
        (("--timeout",), "SECONDS",
         "deadline per source: DNS, connect, handshake (default %g)" % DEFAULT_TIMEOUT),
        (("-4", "--ipv4"), SWITCH, "IPv4 only"),
        (("-6", "--ipv6"), SWITCH, "IPv6 only"),
        (("--all-addresses",), SWITCH,
         "fetch every address of a SOURCE host name, each as a source of its own"),
        (("--parallel",), "N", "fetch N sources at a time (default %d), fewer if ulimit -n "
         "is low" % DEFAULT_PARALLEL),
        (("--tls-min",), "VERSION", "offer no TLS version below VERSION (1.0 to 1.3)"),
        (("--tls-max",), "VERSION", "offer no TLS version above VERSION, e.g. 1.2"),
    )),
    ("STARTTLS", (
        (("--starttls",), "PROTOCOL", "talk PROTOCOL before TLS (list below)"),
        (("--ehlo",), "NAME", "EHLO/LHLO name for smtp, lmtp (default: this host)"),
        (("--alpn",), "LIST", "ALPN protocols to offer, comma-separated"),
    )),
    ("trust", (
        (("--cafile",), "FILE", "trust only the CA certificates in FILE"),
        (("--capath",), "DIR", "trust only the hashed CA directory DIR"),
        (("--insecure",), SWITCH, "do not verify chain or name (says so on stderr)"),
    )),
    ("output (default: the chain as served, on stdout)", (
        (("--out-dir",), "DIR", "write cert.pem, chain.pem, fullchain.pem in DIR"),
        (("--cert-path",), "FILE", "write the leaf to FILE"),
        (("--chain-path",), "FILE", "write the intermediates to FILE"),
        (("--fullchain-path",), "FILE", "write the leaf and intermediates to FILE"),
        (("--combined-path",), "FILE", "write chain and private key to FILE (0600)"),
        (("--verified-chain",), SWITCH, "output the path verification built, with its root"),
    )),
    ("install gate", (
        (("--key-path",), "FILE...",
         "a private key the leaf must match; twice: current and next key"),
        (("--privkey",), SWITCH, "with --out-dir, install the matching key as privkey.pem (0600)"),
        (("--key-password-file",), "FILE", "password of an encrypted key"),
        (("--force",), SWITCH,
         "install even a leaf not newer than the installed one, or one rolled back"),
        (("--dry-run",), SWITCH, "check and say what would change; write nothing"),
        (("--min-age",), "DURATION",
         "install a new leaf only once issued DURATION ago (90m, 36h, 2d)"),
    )),
    ("files", (
        (("--owner",), "USER", "owner of new files (existing ones keep theirs)"),
        (("--group",), "GROUP", "group of new files"),
        (("--mode",), "MODE", "octal mode of new certificate files (default %04o)" % NEW_FILE_MODE),
    )),
    ("hook", (
        (("--deploy-hook",), "CMD", "run CMD with /bin/sh after files changed"),
        (("--hook-timeout",), "SECONDS", "kill the hook after SECONDS (default %g)" % HOOK_TIMEOUT),
        (("--confirm",), "HOST...",
         "after the hook, HOST[:PORT] must serve the new leaf (else exit 7); repeatable"),
        (("--confirm-timeout",), "SECONDS",
         "how long --confirm tries (default %g)" % CONFIRM_TIMEOUT),
    )),
    ("reports", (
        (("--text",), SWITCH, "describe each chain for people instead of PEM"),
        (("--json",), SWITCH, "describe each source as JSON"),
        (("--check",), SWITCH, "monitoring plugin: Nagios status lines and exit codes"),
        (("--warn",), "WHEN",
         "--check: WARNING under WHEN left: a duration (36h, 2d, 90m) or a share of each "
         "certificate's lifetime (default %g%%%%)" % (WARN_SHARE * 100)),
        (("--crit",), "WHEN",
         "--check: CRITICAL under WHEN left (default %g%%%%)" % (CRIT_SHARE * 100)),
        (("--warn-days",), "N", "--check: --warn in days"),
        (("--crit-days",), "N", "--check: --crit in days"),
        (("--same",), SWITCH,
         "--check: CRITICAL for sources not serving the newest chain among them"),
        (("--expect-file",), "FILE", "--check: CRITICAL unless the served chain is FILE's"),
        (("--no-chain-warning",), SWITCH,
         "--check: no WARNING for a served chain lacking intermediates or out of order"),
        (("--prometheus",), "FILE",
         "also write the run's metrics to FILE (node_exporter's textfile format), in any mode"),
    )),
    ("config file: several certificates, one section each", (
        (("--config",), "FILE",
         "run every section of the INI FILE (keys: long options, and source)"),
        (("--section",), "NAME", "--config: run section NAME only"),
    )),
    ("messages", (
        (("-q", "--quiet"), SWITCH, "print errors only"),
        (("--syslog",), SWITCH, "also log one line per run and per section to syslog"),
        (("-v", "--verbose"), SWITCH, "how each source went: TLS version, method, time"),
        (("-h", "--help"), SWITCH, "show this help and exit"),
        (("--version",), SWITCH, "show the version and exit"),
    )),
)


def build_parser():
    """argparse for OPTIONS. Values stay strings here: validate_settings converts
    them, with messages of its own."""
    parser = ArgumentParser(prog="certgrab.py", usage=USAGE, description=DESCRIPTION,
                            epilog=epilog(), add_help=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, options in OPTIONS:
        group = parser.add_argument_group(title)
        for flags, value, text in options:
            if value is SWITCH:
                group.add_argument(*flags, action="store_true", help=text)
            elif value.endswith("..."):
                group.add_argument(*flags, metavar=value[:-3], action="append", help=text)
            else:
                group.add_argument(*flags, metavar=value, help=text)
    return parser


def epilog():
    """--starttls protocols, examples and the exit codes of the docstring."""
    protocols = wrap_items(["%s %d" % (name, STARTTLS[name][1]) for name in sorted(STARTTLS)],
                           76)
    doc = __doc__ or "\nExit codes\n    (see README.md: python -OO dropped them)\n"
    exit_codes = doc.split("\nExit codes\n", 1)[1].replace("    ", "  ")
    return "--starttls protocols (default port):\n%s\n\n%s\n\nexit codes:\n%s" % (
        "\n".join("  " + line for line in protocols), EXAMPLES, exit_codes.rstrip("\n"))


def parse_command_line(parser, argv):
    """argparse's namespace, and the SOURCEs: anywhere among the options, and
    every word after "--". Long options are spelt in full: an abbreviation that
    works today would change meaning when a longer option is added."""
    words, sources = list(argv), []
    if "--" in words:
        words, sources = words[:words.index("--")], words[words.index("--") + 1:]
    known = parser._option_string_actions
    for word in words:
        flag = word.split("=", 1)[0]
        if word.startswith("--") and flag not in known:
            longer = sorted(option for option in known if option.startswith(flag))
            raise UsageError("unknown option %s%s" % (flag, "; long options are spelt in "
                             "full: %s" % ", ".join(longer) if longer else ""))
    args, extra = parser.parse_known_args(words)
    unknown = [word for word in extra if word.startswith("-") and word != "-"]
    if unknown:
        raise UsageError("unknown option %s" % unknown[0])
    return args, extra + sources


class Settings(object):
    """The command line, validated and converted once by validate_settings:
    numbers are numbers, the key is read, paths and names are checked.
    Read-only afterwards, so that no step can change what a later one sees."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError("Settings are read-only: cannot set %s" % name)

    def __delattr__(self, name):
        raise AttributeError("Settings are read-only: cannot delete %s" % name)


def validate_settings(args, sources, reporter):
    """Settings from argparse's namespace; UsageError on the first rule broken."""
    if args.section is not None:
        raise UsageError("--section needs --config")
    if not sources:
        raise UsageError("no SOURCE given")
    for first, second in (("--ipv4", "--ipv6"), ("--quiet", "--verbose"),
                          ("--insecure", "--cafile"), ("--insecure", "--capath"),
                          ("--insecure", "--verified-chain")):
        if _given(args, first) and _given(args, second):
            raise UsageError("%s and %s exclude each other" % (first, second))
    values = dict(sources=tuple(sources), quiet=args.quiet, verbose=args.verbose,
                  insecure=args.insecure, cafile=args.cafile, capath=args.capath,
                  verified_chain=args.verified_chain)
    values.update(_connecting_settings(args, len(sources)))
    values.update(_tls_version_settings(args))
    values.update(_report_settings(args))
    values.update(_install_settings(args, values["report"], reporter))
    default_port = parse_port(args.port, "-p/--port") if args.port is not None else \
        STARTTLS[args.starttls][1] if args.starttls else DEFAULT_PORT
    values.update(_rollout_settings(args, default_port))
    values["targets"] = parse_targets(sources, parse_servername(args.servername),
                                      default_port, files_allowed=bool(values["report"]))
    values["trust"] = " and ".join("%s %s" % (flag, path) for flag, path in (
        ("--cafile", args.cafile), ("--capath", args.capath)) if path) or "the system store"
    values["plan"] = plan_outputs(args.out_dir, dict(
        (kind, getattr(args, kind + "_path")) for kind in ("cert", "chain", "fullchain",
                                                          "combined")), args.key_path or (),
        args.privkey)
    values["prometheus"] = _prometheus_path(args.prometheus, values["plan"], args.key_path or ())
    return Settings(**values)


def _prometheus_path(path, plan, key_paths):
    """--prometheus FILE: never one of the outputs or a key; its directory must exist."""
    if path is None:
        return None
    if os.path.realpath(path) in [os.path.realpath(p) for p in
                                  [p for p, _ in plan] + list(key_paths)]:
        raise UsageError("--prometheus %s names a certificate output or the key" % path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError("--prometheus %s: the directory %s does not exist" % (
            path, os.path.dirname(os.path.abspath(path))))
    if os.path.isdir(path):
        raise UsageError("--prometheus %s is a directory; name a file in it, such as "
                         "%s" % (path, os.path.join(path, "certgrab.prom")))
    return path


def _given(args, flag):
    return getattr(args, flag.lstrip("-").replace("-", "_")) not in (None, False)


def _connecting_settings(args, source_count):
    """-4/-6, --timeout, --parallel, --starttls, --ehlo, --alpn."""
    timeout = _number(args.timeout, DEFAULT_TIMEOUT, float)
    if timeout is None or not 0 < timeout < 86400:
        raise UsageError("--timeout must be a number of seconds above 0")
    parallel = _number(args.parallel, 0, int)       # 0: fetch_width chooses
    if parallel is None:
        raise UsageError("--parallel takes a number")
    if args.parallel is not None and not 1 <= parallel <= PARALLEL_LIMIT:
        raise UsageError("--parallel must be from 1 to %d" % PARALLEL_LIMIT)
    if args.starttls is not None and args.starttls not in STARTTLS:
        raise UsageError("--starttls %s: unknown protocol; known: %s"
                         % (args.starttls, ", ".join(sorted(STARTTLS))))
    alpn = [protocol for protocol in (args.alpn or "").split(",") if protocol]
    if args.starttls == "postgres-direct" and not alpn:
        alpn = ["postgresql"]                   # PostgreSQL 17's direct TLS requires it
    family = socket.AF_INET if args.ipv4 else socket.AF_INET6 if args.ipv6 else \
        socket.AF_UNSPEC
    return dict(timeout=timeout, parallel=parallel, starttls=args.starttls,
                ehlo=parse_ehlo(args.ehlo), alpn=alpn or None, family=family)


def _tls_version_settings(args):
    """--tls-min and --tls-max: one of TLS_VERSIONS each, the minimum not above the maximum."""
    for flag, value in (("--tls-min", args.tls_min), ("--tls-max", args.tls_max)):
        if value is not None and value not in TLS_VERSIONS:
            raise UsageError("%s %s: not a TLS version; known: %s" % (
                flag, value, ", ".join(TLS_VERSIONS)))
    if args.tls_min and args.tls_max and args.tls_min > args.tls_max:
        raise UsageError("--tls-min %s is above --tls-max %s" % (args.tls_min, args.tls_max))
    return dict(tls_min=args.tls_min, tls_max=args.tls_max)


def _number(text, default, kind):
    """text as kind (int or float), default when absent, None when not a number."""
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        return None


def _report_settings(args):
    """--text, --json, --check (with --same, --expect-file, --warn-days, --crit-days)."""
    check = args.check or args.same or args.expect_file is not None
    modes = [mode for mode, given in (("text", args.text), ("json", args.json),
                                      ("check", check)) if given]
    if len(modes) > 1:
        raise UsageError("--%s and --%s exclude each other" % tuple(modes[:2]))
    report = modes[0] if modes else None
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    if report and (writes or args.key_path or args.verified_chain):
        raise UsageError("--%s only reports; it cannot go with output files, --key-path or "
                         "--verified-chain" % report)
    warn = _threshold(args.warn, args.warn_days, "--warn", WARN_SHARE)
    crit = _threshold(args.crit, args.crit_days, "--crit", CRIT_SHARE)
    expected = None                 # --expect-file: its issuing path (root aside)
    if args.expect_file is not None:
        ders = pem_to_ders(read_small_file(args.expect_file, "--expect-file")
                           .decode("ascii", "replace"))
        if not ders:
            raise UsageError("--expect-file %s: no PEM certificate in it" % args.expect_file)
        expected = clean_path(parse_chain(ders[:MAX_CHAIN], args.expect_file))[0]
    return dict(report=report, same=args.same, expect_file=args.expect_file,
                expected=expected, warn=warn, crit=crit, writes=writes,
                chain_warning=not args.no_chain_warning)


def _threshold(text, days, flag, default_share):
    """--warn/--crit (or their --*-days form) as (amount, is_share): "36h", "2d",
    "90m", "600s" -> (seconds, False); "25%" -> (0.25, True); absent: the default."""
    if text is not None and days is not None:
        raise UsageError("%s and %s-days exclude each other" % (flag, flag))
    if days is not None:
        number = _number(days, None, float)
        if number is None or not 0 <= number < float("inf"):
            raise UsageError("%s-days %s: give a number of days, such as 14" % (flag, days))
        return number * DAY, False
    if text is None:
        return default_share, True
    unit = text[-1:].lower()
    scale = DURATION_UNITS.get(unit) or (0.01 if unit == "%" else None)
    number = _number(text[:-1], None, float) if scale else None
    if number is None or not 0 <= number < float("inf") or unit == "%" and number > 100:
        raise UsageError("%s %s: give a duration such as 36h, 2d or 90m, or a share of the "
                         "certificate's lifetime such as 25%%" % (flag, text))
    return number * scale, unit == "%"


def _duration(text, flag):
    """A duration as --warn takes one, 90m, 36h, 2d or 600s, in seconds."""
    scale = DURATION_UNITS.get(text[-1:].lower())
    number = _number(text[:-1], None, float) if scale else None
    if number is None or not 0 <= number < float("inf"):
        raise UsageError("%s %s: give a duration such as 90m, 36h or 2d" % (flag, text))
    return number * scale


def _rollout_settings(args, default_port):
    """--all-addresses, --min-age, --confirm HOST[:PORT] (each as (HOST[:PORT], host,
    port)) and --confirm-timeout. --confirm needs --deploy-hook: the hook makes the
    service take the new files, and is what stays pending when it did not."""
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    for flag in ("--min-age", "--confirm"):
        if _given(args, flag) and not writes:
            raise UsageError("%s needs an output file (--out-dir or a --*-path)" % flag)
    if args.confirm and not args.deploy_hook:
        raise UsageError("--confirm needs --deploy-hook (the command that reloads the service "
                         "--confirm dials)")
    if args.confirm_timeout is not None and not args.confirm:
        raise UsageError("--confirm-timeout needs --confirm")
    timeout = _number(args.confirm_timeout, CONFIRM_TIMEOUT, float)
    if timeout is None or not 0 < timeout < DAY:
        raise UsageError("--confirm-timeout must be a number of seconds above 0")
    confirm = tuple((text,) + parse_source(text, default_port) for text in args.confirm or ())
    min_age = None if args.min_age is None else _duration(args.min_age, "--min-age")
    return dict(all_addresses=args.all_addresses, min_age=min_age, confirm=confirm,
                confirm_timeout=timeout)


def _install_settings(args, report, reporter):
    """Files, key, hook: the options of runs that write files or check a key."""
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    for flag in ("--deploy-hook", "--owner", "--group", "--mode", "--force", "--dry-run"):
        if _given(args, flag) and not writes:
            raise UsageError("%s needs an output file (--out-dir or a --*-path)" % flag)
    keys = _key_settings(args, writes, reporter)
    hook_timeout = _number(args.hook_timeout, HOOK_TIMEOUT, float)
    mode = _number(args.mode, None, lambda text: int(text, 8))
    if hook_timeout is None or args.mode is not None and mode is None:
        raise UsageError("--hook-timeout takes seconds and --mode an octal number like 0644")
    if not hook_timeout > 0:
        raise UsageError("--hook-timeout must be above 0")
    if mode is not None and mode & ~0o644:
        raise UsageError("--mode allows at most 0644: certificate files are never "
                         "executable or writable by others")
    return dict(out_dir=args.out_dir, cert_path=args.cert_path, chain_path=args.chain_path,
                fullchain_path=args.fullchain_path, combined_path=args.combined_path,
                key_paths=tuple(args.key_path or ()), keys=keys, privkey=args.privkey,
                force=args.force, dry_run=args.dry_run,
                deploy_hook=args.deploy_hook, hook_timeout=hook_timeout, mode=mode,
                uid=lookup_id(args.owner, "--owner"), gid=lookup_id(args.group, "--group"))


def _key_settings(args, writes, reporter):
    """--key-path (once, or twice for a rollover), read; --privkey's and the
    key's companions checked. Returns the keys, a tuple in the order given."""
    for flag in ("--combined-path", "--key-password-file", "--privkey"):
        if _given(args, flag) and not args.key_path:
            raise UsageError("%s needs --key-path" % flag)
    if args.privkey and not args.out_dir:
        raise UsageError("--privkey writes privkey.pem in --out-dir; give --out-dir")
    if len(args.key_path or ()) > 1 and writes and not (args.privkey or args.combined_path):
        raise UsageError("several --key-path need --privkey (or --combined-path) to install",
                         hint="the service must get the key that matches the new "
                              "certificate, in the same set: README, key rollover")
    keys = tuple(read_private_key(path, args.key_password_file)
                 for path in args.key_path or ())
    for flag in ("--combined-path", "--privkey"):
        if _given(args, flag) and any(key.encrypted for key in keys):
            reporter.warn("%s gets the key encrypted, as it is in --key-path" % flag)
    return keys


def lookup_id(name, flag):
    """--owner USER or --group GROUP: a name or number to its number; -1 when not given."""
    if name is None or name.isdigit():
        return -1 if name is None else int(name)
    what = "user" if flag == "--owner" else "group"
    try:
        if what == "user":
            import pwd
            return pwd.getpwnam(name).pw_uid
        import grp
        return grp.getgrnam(name).gr_gid
    except (KeyError, ImportError):
        raise UsageError("%s %s: no such %s on this host" % (flag, name, what))


def make_reader(settings):
    """The run's context; with --key-path, one more per key type for dual-cert servers.
    None when every source is a local file: they need no trust store."""
    if all(target.file for target in settings.targets):
        return None
    kinds = ("RSA", "EC") if settings.keys else ()
    readers = dict((kind, new_chain_reader(make_context(settings, kind), settings.trust))
                   for kind in kinds)
    reader = new_chain_reader(make_context(settings), settings.trust, readers)
    for each in [reader] + list(readers.values()):
        each.starttls = settings.starttls
    return reader


# ---------------------------------------------------------------------------
# Config file: one section per certificate, keys named like the long options.
# ---------------------------------------------------------------------------

def run_config(parser, args, sources, reporter):
    """--config: every section (or the one --section names), all validated before
    any connection, then run concurrently where their sources differ. One failing
    section does not stop the others; returns the worst exit code."""
    reporter.checking("config %s" % args.config)
    sections = config_sections(parser, args, sources, reporter)  # 1. every section, checked
    codes = run_sections(sections, reporter)        # 2. fetch, gate, install each
    return summarize_sections(sections, codes, reporter)  # 3. which failed, the worst code


class Section(object):
    """One section of --config, ready to run: its name, Settings, reader and reporter."""

    def __init__(self, name, settings, reader, reporter):
        self.name, self.settings, self.reader, self.reporter = name, settings, reader, reporter


def config_sections(parser, args, sources, reporter):
    """[Section] of the sections to run, in file order. Options given on
    the command line replace that key in every section. UsageError names the file,
    the section and the key."""
    path = args.config
    if sources:
        raise UsageError("--config %s: SOURCEs come from each section's source key, not from "
                         "the command line (%s)" % (path, sources[0]))
    config = read_config(path)
    names = config.sections()
    if args.section is not None and args.section not in names:
        raise UsageError("--section %s: %s has no such section; it has: %s" % (
            args.section, path, ", ".join(names) or "none"))
    if not names:
        raise UsageError("--config %s: no sections: write one [NAME] per certificate" % path)
    overrides = dict((action.dest, getattr(args, action.dest)) for action in parser._actions
                     if action.option_strings and getattr(args, action.dest) != action.default
                     and not set(action.option_strings) & set(COMMAND_LINE_ONLY))
    sections = [section_settings(parser, config, name, path, overrides, reporter.syslog)
                for name in ([args.section] if args.section is not None else names)]
    check_own_files(path, sections)
    return sections


def check_own_files(path, sections):
    """Every section writes files of its own: two writing one file would undo each
    other at every run, and a --prometheus file holds one run's metrics."""
    owners = {}
    for section in sections:
        settings = section.settings
        named = [(os.path.realpath(file), "key prometheus: ") for file in
                 [settings.prometheus] if file] + [(os.path.realpath(file), "")
                                                   for file, _ in settings.plan]
        for file, key in named:
            if owners.setdefault(file, section.name) != section.name:
                raise UsageError("%s, section [%s], %s%s is also written by section [%s]; "
                                 "give each section its own files" % (
                                     path, section.name, key, file, owners[file]))


def read_config(path):
    """FILE through configparser (no interpolation: a hook keeps its % and $)."""
    import configparser
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read_string(read_small_file(path, "--config").decode("utf-8"), path)
    except UnicodeDecodeError:
        raise UsageError("--config %s: not UTF-8 text" % path)
    except configparser.Error as exc:
        raise UsageError("--config %s: %s" % (path, " ".join(str(exc).split())))
    return config


def section_settings(parser, config, name, path, overrides, syslog):
    """The Section of one section, validated like a command line."""
    where = "%s, section [%s]" % (path, name)
    args, sources = section_args(parser, config, name, where)
    writes = any(getattr(args, option) for option in OUTPUT_OPTIONS)
    for dest, value in overrides.items():
        if dest != "dry_run" or writes:     # --dry-run: for the sections that write files
            setattr(args, dest, value)
    if not sources:
        raise UsageError("%s, key source: missing; list the section's SOURCEs there" % where)
    reporter = SectionReporter(name, quiet=args.quiet, verbose=args.verbose, syslog=syslog)
    try:
        settings = validate_settings(args, sources, reporter)
        reader = make_reader(settings)          # --cafile, --capath: read before any run
    except (UsageError, InputError) as exc:     # InputError: a file that cannot be read
        keys = [key for key in config.options(name) if "--" + key in str(exc)]
        raise type(exc)("%s%s: %s" % (where, ", key " + keys[0] if keys else "", exc),
                        exc.hint)
    return Section(name, settings, reader, reporter)


def section_args(parser, config, name, where):
    """argparse's namespace and the SOURCEs of one section ([DEFAULT] included).
    Each key becomes its option's words and is parsed alone first, so that an
    error names the key; the options are the parser's own (file_options)."""
    options, words, sources = file_options(parser), [], []
    for key, value in config.items(name):
        if key == "source":
            sources = value.split()
            continue
        inherited = config.defaults().get(key) == value     # as far as one can tell
        here = "%s%s, key %s" % (where, " (from [DEFAULT])" if inherited else "", key)
        if key not in options:
            raise UsageError("%s: %s" % (here, "an option of the command line only" if "--" +
                                         key in COMMAND_LINE_ONLY else "no such option; keys "
                                         "are source and the long options without --"))
        try:
            key_words = option_words(options[key], "--" + key, value)
            parse_command_line(parser, key_words)
        except UsageError as exc:
            raise UsageError("%s: %s" % (here, exc))
        words.extend(key_words)
    return parse_command_line(parser, words)[0], sources


def file_options(parser):
    """{key: argparse action}: every long option but COMMAND_LINE_ONLY, so that an
    option added to build_parser is a key of the file at once."""
    options = {}
    for action in parser._actions:
        names = [name for name in action.option_strings if name.startswith("--")]
        if names and names[0] not in COMMAND_LINE_ONLY:
            options[names[0][2:]] = action
    return options


def option_words(action, flag, value):
    """A key's value as command-line words: a flag takes yes or no (configparser's
    words), an option given several times takes a list split at white space."""
    if action.nargs == 0:
        import configparser
        state = configparser.ConfigParser.BOOLEAN_STATES.get(value.strip().lower())
        if state is None:
            raise UsageError("takes yes or no, not %r" % value)
        return [flag] if state else []
    if isinstance(action, argparse._AppendAction):
        return ["%s=%s" % (flag, item) for item in value.split()]
    if action.nargs in (None, "?"):
        return ["%s=%s" % (flag, value)]
    return [flag] + value.split()


def run_sections(sections, reporter):
    """Exit codes of every section, in file order. Sections that share a source run
    one after the other; groups of them run at once, SECTIONS_AT_ONCE at most."""
    codes, groups = [None] * len(sections), source_groups(sections)
    at_once = min(SECTIONS_AT_ONCE, len(groups))

    def run_group(group):
        for index in group:
            codes[index] = run_section(sections[index], at_once)

    map_in_threads(run_group, groups, at_once, reporter, "running %d group(s) of sections")
    return codes


def source_groups(sections):
    """Lists of section indexes: sections that share a source (host and port, or
    file) are in one group, so that no source sees two of our runs at once."""
    groups = []                                 # [(sources, [index, ...])]
    for index, section in enumerate(sections):
        keys = set((target.host, target.port, target.file) for target in
                   section.settings.targets)
        merged = (keys, [index])
        for group in [group for group in groups if group[0] & keys]:
            groups.remove(group)
            merged[0].update(group[0])
            merged[1].extend(group[1])
        groups.append(merged)
    return [sorted(indexes) for _, indexes in groups]


def run_section(section, sharers):
    """One section: its exit code; an expected failure is its own error line.
    sharers: how many sections run at once, sharing the open-files limit."""
    settings, reporter = section.settings, section.reporter
    try:
        code, failure = run_one(settings, section.reader, reporter, sharers), None
    except CertgrabError as exc:
        reporter.error(exc)
        code, failure = exc.exit_code, exc
        if settings.report == "check":
            plugin_unknown(exc)
            code = NAGIOS_UNKNOWN
    reporter.log(code, failure)
    return code


def summarize_sections(sections, codes, reporter):
    """The run's last line: which sections failed (always) or that all went well."""
    failed = ["%s (exit %d)" % (section.name, code) for section, code in zip(sections, codes)
              if code]
    if failed:
        text = "%d of %d sections failed: %s" % (len(failed), len(sections), ", ".join(failed))
        reporter.error(CertgrabError(text))
    else:
        text = "%d section%s done" % (len(sections), "" if len(sections) == 1 else "s")
        reporter.say(text)
    reporter.outcome(text)
    reporter.log(max(codes))
    return max(codes)


def main(argv=None):
    """Run certgrab; return the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    reporter = Reporter()
    try:
        parser = build_parser()
        args, sources = parse_command_line(parser, argv)  # 1. the command line
        if args.help:
            write_stdout(parser.format_help())
            return 0
        if args.version:
            write_stdout("certgrab %s\n" % __version__)
            return 0
        reporter = Reporter(quiet=args.quiet, verbose=args.verbose,
                            syslog=open_syslog() if args.syslog else None)
        if args.config is not None:                     # 2a. every section of the file
            return run_config(parser, args, sources, reporter)
        settings = validate_settings(args, sources, reporter)  # 2b. options, SOURCEs, files
        reader = make_reader(settings)                  # 3. trust store, chain access
        code = run_one(settings, reader, reporter)      # 4. fetch, gate, install, metrics
        reporter.log(code)
        return code
    except CertgrabError as exc:
        return report_failure(exc, argv, reporter)


def run_one(settings, reader, reporter, sharers=1):
    """One certificate: fetch every source, then deliver, then --prometheus.
    Returns the exit code; an expected failure raises CertgrabError, after the
    metrics have recorded it. sharers: see fetch_all."""
    clock = (time.time(), time.monotonic())
    reporter.checking("%s from %s" % (settings.targets[0].verify_name,
                                      " ".join(settings.sources)))
    if settings.insecure:
        reporter.warn("--insecure: the chain is NOT verified; anyone on the path could "
                      "have sent it")
    fetch = fetch_every_address if settings.all_addresses else fetch_all
    results = fetch(settings.targets, reader, settings, reporter, sharers)  # 1. fetch
    try:
        code, outcome = deliver(results, settings, reader, reporter)  # 2. to 4. below
    except CertgrabError as exc:
        record_run(settings, results, clock, install_outcome(exc, settings), exc.exit_code,
                   reporter)
        raise
    return record_run(settings, results, clock, outcome, code, reporter)  # 5. metrics


def deliver(results, settings, reader, reporter):
    """Report on the results, or print or install the newest good chain:
    (exit code, install outcome for the metrics or None)."""
    if settings.report:                                 #    or: describe them all
        reporter.outcome("reported (--%s)" % settings.report)
        return report(results, settings, reporter), None
    if settings.plan or settings.keys:
        apply_gate(results, settings.keys, reporter)    # 2. key, name, dates
    best = choose_result(results, reporter)             # 3. the newest good chain
    report_fetch(results, best, reader, settings, reporter)
    chain = best.verified if settings.verified_chain else None
    if not settings.plan:                               # 4a. stdout: exactly as served
        write_stdout("".join(der_to_pem(cert.der) for cert in chain or best.served))
        reporter.outcome("printed sha256:%s from %s" % (best.leaf.sha256, best.target))
        return 0, None
    outcome = install_chain(chain or best.issuing, best, settings, reporter, reader)  # 4b.
    if outcome in ("installed", "confirmed", "unchanged"):  # (dry run, held back: said)
        confirmed = "; confirmed" if outcome == "confirmed" else ""
        reporter.outcome("installed sha256:%s from %s%s" % (best.leaf.sha256, best.target,
                                                           confirmed)
                         if outcome != "unchanged" else outcome)
    return 0, outcome


def report_failure(exc, argv, reporter):
    """An expected failure: its line (and hint) on stderr; the exit code. Under
    --check, --same or --expect-file a plugin's UNKNOWN status line as well."""
    reporter.error(exc)
    if isinstance(exc, UsageError):
        reporter.hint("certgrab.py --help lists the options")
    code = exc.exit_code
    if any(arg.split("=")[0] in CHECK_FLAGS for arg in argv):
        plugin_unknown(exc)
        code = NAGIOS_UNKNOWN
    reporter.log(code, exc)
    return code


def plugin_unknown(exc):
    """A monitoring plugin's status line for a run that could not even check."""
    try:
        write_stdout("CERTGRAB UNKNOWN - %s\n" % exc)
    except WriteError:
        pass                            # stdout is gone: the exit code still says it


if __name__ == "__main__":
    sys.exit(main())
