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
messages, Certificates, Local files, Keys, Sources and connecting, STARTTLS, TLS,
Several sources, Revocation and renewal information, The gate, Install, Reports,
Metrics for Prometheus, Command line, Config file, and last The run: main() and
its steps. Every function is defined above the functions that call it
(tests/test_reading_order.py).

Pipeline
    SOURCE ... --parse--> host, port, name --TCP--> socket --STARTTLS?--> dialogue
    (--all-addresses: a host name --DNS--> a source per address, the name as SNI)
                                                                             |
        one thread per source, one deadline (--timeout) per source           v
    served chain (DER, as sent) <-- read per Python version <-- TLS handshake, SNI=name
        |                            (new_chain_reader)
        +--> every certificate parsed whole: structure, names, dates, keys, SANs
        +--> the chain OpenSSL verified (3.6-3.9: replayed to find it): what files get
        +--> gate: verified, key matches a --key-path, leaf covers the name, in date
        +--> what the CA knows: the CRLs the leaf and intermediates name (checked
        |    by OpenSSL), and with --acme-directory the leaf's renewal window
        |    (ARI); once per URL per run
        +--> newest passing leaf (notBefore) of all sources, not revoked
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
      overrides only these last two checks). Files get exactly the chain OpenSSL
      verified, leaf and intermediates without the root: never a served certificate
      off that chain (a warning names it), never less than a browser needs, even when
      the server left intermediates out. --insecure writes the chain built from names
      alone, unverified, and says so.
    - Nothing is written unless every step before it succeeded; a file is either
      the old version or the new one, never half of each. New certificate files
      get mode 0644 (--mode), the files with the key (--combined-path, and
      privkey.pem with --privkey) 0600; an existing file keeps its mode and owner
      (root's or --owner's); nothing is ever group- or world-writable, executable
      or set-id.
    - Local users other than root (and the user certgrab runs as) are trusted with
      nothing: an output is written only where none of them can change any
      directory or link on its path, never through a link they could have placed,
      and an existing output must be a regular file of root's or --owner's (one
      with the key readable by no one else); see resolve_path. The lock is a
      0600 file only root can open. Running as root, a --config file another
      user could change is refused. Core dumps are off once a key is read.
    - The private key is read only to compare its public half. Never print or
      copy the private key except into the files that ask for it: --combined-path
      and privkey.pem (--privkey), which get the --key-path the leaf matched.
    - The deploy hook gets its context in environment variables, never by
      formatting certificate text into a command line, and runs in /.
    - A chain whose leaf or intermediate its CA revoked (the CRL it names,
      verified by OpenSSL, says so) is never written; when a CRL cannot be had,
      --crl on goes ahead with a warning and --crl require refuses.
    - --confirm keeps the previous version of each output it replaces beside it
      (.NAME.certgrab-previous, 0600, until the service is confirmed to serve
      the new files) and records a rolled-back leaf beside the first output
      (.NAME.certgrab-rolled-back, 0600), in the output's own checked directory;
      both are read only as regular files of this user that no one else may
      write, never through a link.
    - Everything read from the network is bounded in size and time, and every
      certificate is parsed whole by the small DER reader below before it is
      trusted with anything: a malformed one is that source's error. Every number
      and text the reader makes is bounded too (MAX_CERTIFICATE and the others).
    - One source never ends the run: a bug met while it is fetched, read, checked
      or reported is its error ("internal error ... please report it"), the
      traceback only with -v. --check output holds no "|" from a certificate or a
      server: only its own, before its own perfdata.

Exit codes
    0  success: chain verified and written (and the hook run), or up to date,
       or a new leaf held back by --min-age (files and hook left alone)
    1  internal error: a bug in certgrab outside any one source; please report it
    2  usage error: bad option, SOURCE, port; unusable or unreadable --cafile,
       --key-path
    3  cannot fetch: connection refused/timed out, not TLS, TLS failure, a
       malformed certificate, or a bug while handling one source
    4  verification failed: unknown issuer, expired, name mismatch
    5  cannot write: the previous files are unchanged, or (the hint says which)
       some are new and the next run completes the set
    6  refused by a safety check: key mismatch, name, dates, not newer, an
       output that is not a readable certificate file, a revoked leaf or
       intermediate (installed or offered), or a path or --config file another
       local user could change; files untouched
    7  files installed, deploy hook pending: it failed, timed out, or ran but
       could not be recorded (the next run runs it again); with --confirm also:
       the service does not serve the new leaf after the hook (the hook stays
       pending), or it completed no TLS handshake at all: the previous files
       are back, and each run refuses that leaf (7) until a newer one or --force
    With --check, --same or --expect-file, a monitoring plugin's codes instead:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (e.g. a usage error, or a bug).
    With --config, the highest code of its sections (2 for a mistake in the file).
"""

__version__ = "0.3.0"

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

# Words, each with one meaning in this file:
#   source  where a chain comes from: a SOURCE, a server to dial with the name to send
#           (class Source) or a local certificate file; --confirm's services and the
#           CA's web servers are dialled as sources too
#   chain   certificates, leaf first: served (as the server sent them), verified (what
#           OpenSSL built, root included), issuing (what files get: the verified chain
#           without its root, or one built from names). Messages keep X.509's word for
#           the verified one, "the path OpenSSL verified"
#   leaf    the first certificate of a chain, the server's own
#   path    where a file is; a link's target is where a symbolic link points
#   output  a file certgrab writes; its content: cert, chain, fullchain, combined, privkey
#   key     a --key-path private key (PrivateKey); its algorithm: RSA or EC
#   code    what a decision reads: a Problem's code, a CRL or ARI cause, OpenSSL's verify
#           code, an outcome; the text for people is made from it, last
#   refuse  a safety check turns a chain, a path or a file down (RefusedError, exit 6)


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


# 3.10+ can also give the chain OpenSSL verified; 3.6-3.9 find it by replaying
# candidate chains to OpenSSL in memory (find_verified_chain).
HAS_VERIFIED_CHAIN = hasattr(ssl._ssl._SSLSocket, "get_verified_chain")


def _sysconf_file_limit(wanted):
    try:
        soft = os.sysconf("SC_OPEN_MAX")        # the soft RLIMIT_NOFILE; -1: unlimited
    except (ValueError, OSError, AttributeError):
        return ASSUMED_FILE_LIMIT
    return wanted if soft < 0 else soft


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


def disable_core_dumps():
    """Set this process's RLIMIT_CORE to 0 (its hard limit stays): a crash while a private
    key is in memory then writes no core file, and neither does the deploy hook, which
    inherits the limit. The resource module does it where it exists; Debian's
    python3-minimal lacks it, and there nothing is done (docs/limitations.md)."""
    try:
        import resource
    except ImportError:
        return
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


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


def closed_in_handshake(exc):
    """True when exc says the server closed the connection during the handshake. 3.10+
    raise SSLEOFError; 3.8 and 3.9 (with OpenSSL 3) SSLZeroReturnError; 3.6 and 3.7,
    whose table of OpenSSL's reason names predates OpenSSL 3, an SSLError whose reason
    they name after OpenSSL 1.1's number 294, KRB5_S_TKT_NYV: OpenSSL 3's
    UNEXPECTED_EOF_WHILE_READING."""
    return isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or getattr(
        exc, "reason", None) in ("UNEXPECTED_EOF_WHILE_READING", "KRB5_S_TKT_NYV")


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
MINUTE = 60             # seconds
HOUR = 60 * MINUTE      # seconds
DAY = 24 * HOUR         # seconds
WARN_SHARE = 0.2        # --check default: WARNING under a fifth of a certificate's lifetime
CRIT_SHARE = 0.1        # left, CRITICAL under a tenth. ACME clients renew at a third left
                        # (half under 10 days: certbot 4): a fifth left is a renewal overdue
                        # by 12 days of 90 or 43 hours of 6, and a 6-day certificate is
                        # CRITICAL with 14.4 hours left. docs/certificates.md.
DURATION_UNITS = {"s": 1, "m": MINUTE, "h": HOUR, "d": DAY}  # --warn/--crit 90m, 36h, 2d
HOURS_BELOW = 7 * DAY   # seconds; spans shorter than a week are told in days and hours
MAX_NAMES_SHOWN = 3     # SANs that name a certificate with an empty subject in a message
METRICS_TEMP_STALE = HOUR  # seconds; an older temp beside --prometheus FILE is a killed run's
NEW_FILE_MODE = 0o644   # certificates are public; never group- or world-writable
CERT_MODE_MOST = 0o644  # what a certificate file may allow at most: never executable, set-id
                        # or writable by others (--mode, and an existing file's mode)
KEY_MODE_MOST = 0o640   # what a file with the private key may allow at most: its group's read
PRIVATE_MODE = 0o600    # a file only its owner reads: a new file with the key, the lock,
                        # the files certgrab keeps, every temporary file
DIR_MODE = 0o755        # for a missing output directory
UMASK = 0o022           # set by main: what certgrab creates is never group- or world-writable
TEMP_MARK = ".certgrab-tmp-"  # in the names of temporary files beside the outputs
LOCK_FILE = ".certgrab.lock"  # in each output directory, mode 0600: only this user can lock it
LINK_HOPS = 40          # symbolic links followed while resolving one path, as Linux allows
PROC_LOCKS_LIMIT = 1 << 20  # bytes of /proc/locks read to name a lock's holder
CMDLINE_SHOWN = 120     # characters of the lock holder's command line in a message
CMDLINE_READ = 4 * CMDLINE_SHOWN  # bytes of it read: UTF-8 takes at most 4 a character
HOOK_TIMEOUT = 300.0    # seconds a --deploy-hook may run before it is killed
HOOK_PENDING_MTIME = 1  # mtime (1970-01-01T00:00:01Z) of files whose hook has not yet run
CONFIRM_TIMEOUT = 30.0  # seconds --confirm waits for the service to serve the new leaf: a
                        # reload takes a second or two; a restart of a big service longer
CONFIRM_INTERVAL = 1.0  # seconds between two tries of --confirm on one service
PREVIOUS_MARK = ".certgrab-previous"  # ".NAME" + this, beside an output: its version before
                        # an install that --confirm has not yet confirmed (0600)
ROLLED_BACK_MARK = ".certgrab-rolled-back"  # ".NAME" + this, beside the first output: the
                        # leaf that broke the service and was rolled back (PEM, 0600)
LOCK_POLL = 0.05        # seconds between tries for a lock another run holds
LOCK_SLACK = 30.0       # seconds, beyond that run's own timeouts, before giving up on it
MAX_LINE = 8192         # bytes; a STARTTLS reply line longer than this is hostile
MAX_PLAINTEXT = 65536   # bytes a server may send before TLS starts
PLAINTEXT_READ = 4096   # bytes asked of the socket at once before TLS starts
MAX_REPLY_LINES = 200   # lines in one STARTTLS reply (capability lists are a few dozen)
MAX_BUG_TEXT = 200      # characters of an unexpected exception's text in its error line
MAX_QUOTED_REPLY = 300  # characters of a STARTTLS reply quoted in an error line
MAX_PORT = 65535        # the highest TCP port
MAX_DNS_NAME = 253      # characters of a DNS name (RFC 1035)
MAX_DNS_LABEL = 63      # characters of one label of it
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")
LABEL_CHARS = HOST_CHARS - frozenset(".*")   # in one label of a DNS name

FEWER_AT_ONCE = "too many sources at once for this host's limits: raise the open-files " \
    "limit (ulimit -n) or pass a lower --parallel"
OUT_DIR_FILES = ("cert.pem", "chain.pem", "fullchain.pem")  # certbot's names
PRIVKEY_FILE = "privkey.pem"  # certbot's name for the key; in --out-dir with --privkey
CERTIFICATE_SUFFIXES = (".pem", ".crt", ".cer")  # a SOURCE with one of these is a file
NAGIOS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # a monitoring plugin's states, 0 to 3
NAGIOS_UNKNOWN = 3      # a monitoring plugin's exit code for "could not even check"
NAGIOS_RANK = (0, 1, 3, 2)  # how bad each state is: CRITICAL outranks UNKNOWN, so that a
                        # source that could not be checked never hides a failing one
TEXT_WIDTH = 64         # characters of a --text value column: lines stay within 80


# ---------------------------------------------------------------------------
# Errors and messages: library code raises; only main() turns errors into
# exit codes. Every line for people goes through one Reporter.
# ---------------------------------------------------------------------------

class CertgrabError(Exception):
    """An expected failure: printed as one line, exits with exit_code. options: the
    command-line options it is about, such as ("--timeout",), for --config to name the
    key (section_settings)."""
    exit_code = 1

    def __init__(self, message, hint=None, options=()):
        Exception.__init__(self, message)
        self.hint, self.options = hint, options


class UsageError(CertgrabError):
    exit_code = 2


class FetchError(CertgrabError):
    exit_code = 3


class ParseError(FetchError):
    """Malformed data, almost always from the network."""


class InternalError(CertgrabError):
    """A bug in certgrab (see internal_error), outside any one source: the run's
    error, exit 1 as an uncaught exception's would be, without its traceback."""
    exit_code = 1


class SourceInternalError(FetchError, InternalError):
    """A bug met while one source was handled: that source's error like any other
    (a FetchError, exit 3), never the end of the run."""


class VerifyError(CertgrabError):
    exit_code = 4

    def __init__(self, message, hint=None, reason=None, code=None):
        CertgrabError.__init__(self, message, hint)
        self.reason = reason            # OpenSSL's words, for reports
        self.code = code                # OpenSSL's verify code (X509_V_ERR_*), for hints


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


def failure_outcome(exc):
    """The outcome of a run that failed with exc, as a code of INSTALL_OUTCOMES: the one
    table from errors to outcomes, which --syslog and the metrics both render."""
    if isinstance(exc, ConfirmError):
        return exc.outcome
    if isinstance(exc, RefusedError):
        return "refused"
    return "hook_failed" if isinstance(exc, HookError) else "failed"


def printable(text):
    """Text from a certificate, safe for a terminal: control characters (and the
    backslash, so that an escape cannot be faked) written as escapes."""
    return "".join(c if c.isprintable() and c != "\\" else "\\x%02x" % ord(c) if ord(c) < 256
                   else "\\u%04x" % ord(c) for c in text)


def ssl_reason(exc):
    """An SSLError as text people read: no "[SSL: X]" tag, no _ssl.c line."""
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c:", 1)[0]


class Reporter(object):
    """stderr lines for people: errors always, warnings unless quiet, details
    when verbose. A message that cannot be written (stderr closed, or cron's
    output on a full disk) is dropped: it never changes what a run does."""

    def __init__(self, quiet=False, verbose=False, syslog=None):
        self.quiet, self.verbose = quiet, verbose
        self.syslog = syslog                # the syslog module with --syslog, else None
        self.subject, self.result = "", ""  # what was checked, and how it went
        self.installed = False              # files were installed: --syslog's NOTICE
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

    def show_traceback(self, where):
        """-v: the traceback of the exception being handled, a bug, for its report."""
        if self.verbose:
            import traceback
            self._write("certgrab: %sthe internal error happened here:\n%s" % (
                "" if where is None else "%s: " % where, traceback.format_exc()))

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

    def outcome(self, text, installed=False):
        """How it went when it did not fail: "unchanged", "installed sha256:...";
        installed: files were written (or their pending hook ran)."""
        self.result, self.installed = text, installed

    def log(self, code, exc=None):
        """--syslog: the one line of this run or section: what was checked, the
        outcome (or why it failed), its exit code and the time it took."""
        if self.syslog is None:
            return
        if exc is not None:
            outcome = "%s: %s" % (failure_outcome(exc).replace("_", " "), exc)
        else:
            outcome = self.result or "done"
        line = "%s%s; exit %d; %.2f s" % (self.subject + ": " if self.subject else "", outcome,
                                         code, time.monotonic() - self.started)
        priority = self.syslog.LOG_ERR if code else \
            self.syslog.LOG_NOTICE if self.installed else self.syslog.LOG_INFO
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


def internal_error(where, exc, reporter):
    """The error for exc, an exception nothing expected (a bug) while handling where:
    a source (SourceInternalError), or None, the run (InternalError). One line that
    names it and asks for a report; the traceback only under -v. Called where exc is
    being handled."""
    reporter.show_traceback(where)
    text = printable(str(exc)[:MAX_BUG_TEXT])
    hint = None if reporter.verbose else "-v shows where it happened (a traceback): add " \
        "it to the report"
    return (InternalError if where is None else SourceInternalError)(
        "%sinternal error in certgrab %s (%s: %s); please report it" % (
            "" if where is None else "%s: " % where, __version__, type(exc).__name__, text),
        hint)


def as_error(exc, where, reporter):
    """exc if it is certgrab's own error, else the InternalError it is (a bug)."""
    return exc if isinstance(exc, CertgrabError) else internal_error(where, exc, reporter)


def contain_bug(function, result, reporter, *args):
    """function(result, *args) for the one source of result (a FetchResult). A bug in
    it, any exception but certgrab's own errors, becomes that source's error (a
    SourceInternalError) and None is returned: the other sources go on."""
    try:
        return function(result, *args)
    except CertgrabError:
        raise
    except Exception as exc:            # a bug; -v shows its traceback
        result.error = internal_error(result.source, exc, reporter)
        return None


def render_source(render, failed, result, reporter, *args):
    """render(result, *args): one source's part of a report. After a bug in it the
    source is an internal error, and failed(result, *args) renders it: the plain form
    of a source that failed, apart from the code that met the bug."""
    part = contain_bug(render, result, reporter, *args)
    return failed(result, *args) if part is None else part


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
OID_CRL_DP_DER = b"\x06\x03\x55\x1d\x1f"     # 2.5.29.31 cRLDistributionPoints (issue 21)

# Bounds of the DER reader. Every number and text it makes of a certificate is bounded, so
# that no value a server sends costs more than a little time and memory, or meets a limit
# of Python's own (3.11+ refuses to turn an int of more than 4,300 digits into text).
# Beyond a bound the certificate is malformed: a ParseError, that source's error. The
# reader follows X.509's fixed shape and never recurses, so nesting needs no bound.
MAX_CERTIFICATE = 100 * 1024  # bytes of one certificate: OpenSSL takes at most 100 KiB of
                        # certificates from a handshake (SSL_CTX_set_max_cert_list)
MAX_OID_BYTES = 63      # bytes of an object identifier, as pyca/cryptography reads them;
                        # those X.509 uses have under 30
MAX_OID_ARC_BITS = 128  # bits of one arc of it: a UUID arc (2.25.N) has 128, and so
                        # does pyca/cryptography's limit (39 digits at most)
MAX_SERIAL_BITS = 512   # bits of a serial number: RFC 5280 allows 20 octets (160 bits),
                        # a few CAs wrote more; 128 hex digits at most
MAX_VERSION_BITS = 8    # bits of the X.509 version number: v1 to v3 are 0 to 2
MAX_RSA_BITS = 16384    # bits of an RSA modulus: OpenSSL's OPENSSL_RSA_MAX_MODULUS_BITS
MAX_DSA_BITS = 10000    # bits of a DSA prime: OpenSSL's OPENSSL_DSA_MAX_MODULUS_BITS
MAX_EC_FIELD_BITS = 661  # bits of an explicit EC curve's prime and coefficients:
                        # OpenSSL's OPENSSL_ECC_MAX_FIELD_BITS
MAX_NAME_ATTRIBUTES = 100  # attributes in one Name (every RDN's): real names have 1 to 10
MAX_SANS = 1000         # subjectAltNames of one certificate: Let's Encrypt puts at most 100,
                        # other public CAs a few hundred
MAX_EXTENSIONS = 100    # extensions of one certificate: real ones have about 10
MAX_CRL_NAMES = 100     # distribution points, and names in their fullNames, of one CRL
                        # Distribution Points extension: real ones have 1 or 2


def is_ip(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%")[0])
            return True
        except (OSError, ValueError):
            pass
    return False


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


def format_time(epoch):
    """RFC 3339 UTC, the year always in four digits (strftime's %Y is not, below 1000)."""
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % time.gmtime(epoch)[:6]


def _count(number, unit):
    return "%d %s%s" % (number, unit, "" if number == 1 else "s")


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


class Certificate(object):
    """One X.509 certificate, read whole by parse_certificate.

    der, and its parts: subject_der and issuer_der (the names as DER, for chain
    order), ski and aki (key identifiers, bytes or None), subject and issuer as
    RFC 4514 text in the order encoded ("C=US, O=Example, CN=R1"), serial
    (a signed int), signature_algorithm, not_before and not_after (epoch
    seconds, UTC), spki (DER), key_type, key_bits, alt_names (every
    subjectAltName as (type, text)), dns_names and ip_addresses (those of type
    DNS and IP), is_ca, crl_urls (the URIs its CRL Distribution Points
    name, in order), sha256 and spki_sha256 (hex digests of der and spki) and
    name (for messages: the subject, or the SANs when it is empty), these three
    made once by parse_certificate; lifetime (seconds) is derived. The fields
    agree with pyca/cryptography's reading; docs/monitoring.md ("--json") says
    where their formats differ.

    Only parse_certificate assigns to a Certificate: one parsed certificate is
    shared by every source of a run that sent the same bytes (ParsedCertificates),
    so what is true of one source alone belongs on its FetchResult, never here.
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
        self.crl_urls = []              # issue 21: where its CA publishes revocations
        self.sha256 = self.spki_sha256 = self.name = ""

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
        return [text if name_type in ("DNS", "IP") else "%s:%s" % (name_type, text)
                for name_type, text in self.alt_names]

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

    def message_name(self):
        """How messages name the certificate, terminal-safe: its subject, or for an
        empty one (the tlsserver and shortlived profiles) its SANs, or its serial.
        parse_certificate keeps it as name."""
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


def _integer(data, item, most, what):
    """A DER INTEGER (signed, minimally encoded) as an int of at most most bits (its
    sign aside); what it is, for the error."""
    raw = data[item[1]:item[2]]
    if item[0] != DER_INTEGER or not raw or len(raw) > 1 and (
            raw[0] == 0 and raw[1] < 0x80 or raw[0] == 0xFF and raw[1] >= 0x80):
        raise ParseError("malformed certificate: bad INTEGER")
    value = int.from_bytes(raw, "big", signed=True) if len(raw) <= most // 8 + 1 else None
    if value is None or abs(value).bit_length() > most:
        raise ParseError("malformed certificate: %s of more than %d bits" % (what, most))
    return value


def _check_version(der, tbs_item):
    """The TBSCertificate's [0] EXPLICIT version, if present, must be v2 or v3
    (v1, the default, is never written in DER)."""
    first = _children(der, tbs_item, DER_SEQUENCE, 1)[0]
    if first[0] == DER_VERSION:
        inner = _children(der, first, DER_VERSION, 1)
        number = _integer(der, inner[0], MAX_VERSION_BITS, "X.509 version") \
            if len(inner) == 1 else -1
        if number not in (1, 2):
            raise ParseError("malformed certificate: X.509 version %d" % (number + 1))


def _oid(data, item):
    """An OBJECT IDENTIFIER as dotted text, of at most MAX_OID_BYTES, each arc at most
    MAX_OID_ARC_BITS."""
    if item[0] != DER_OID or item[1] == item[2]:
        raise ParseError("malformed certificate: bad object identifier")
    if item[2] - item[1] > MAX_OID_BYTES:
        raise ParseError("malformed certificate: an object identifier of %d bytes, more "
                         "than %d" % (item[2] - item[1], MAX_OID_BYTES))
    arcs, value, start = [], 0, True
    for byte in data[item[1]:item[2]]:
        if start and byte == 0x80:
            raise ParseError("malformed certificate: object identifier not minimally encoded")
        value = (value << 7) | (byte & 0x7F)
        if value.bit_length() > MAX_OID_ARC_BITS:
            raise ParseError("malformed certificate: an object identifier arc of more than "
                             "%d bits" % MAX_OID_ARC_BITS)
        start = not byte & 0x80
        if start:
            arcs.append(value)
            value = 0
    if data[item[2] - 1] & 0x80:
        raise ParseError("malformed certificate: truncated object identifier")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


def _signature_algorithm(data, item):
    """The name of a signature AlgorithmIdentifier; ParseError if its parameters are
    present where the algorithm has none."""
    fields = _children(data, item, DER_SEQUENCE, 1)
    oid = _oid(data, fields[0])
    if len(fields) > 1 and oid in SIGNATURES_WITHOUT_PARAMETERS:
        raise ParseError("malformed certificate: parameters with %s" % OID_SIGNATURES[oid])
    return OID_SIGNATURES.get(oid, oid)


def _element(data, item):
    """The whole encoding of an element, header included."""
    return data[item[3]:item[2]]


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
    prime = _integer(data, field[1], MAX_EC_FIELD_BITS, "EC field prime")
    if any(c[2] - c[1] > (MAX_EC_FIELD_BITS + 7) // 8 for c in coefficients[:2]):
        raise ParseError("malformed certificate: EC curve coefficient of more than %d bits"
                         % MAX_EC_FIELD_BITS)
    a, b = (int.from_bytes(data[c[1]:c[2]], "big") for c in coefficients[:2])
    curve = EC_EXPLICIT_CURVES.get((prime, a, b))
    return OID_CURVES[curve] if curve else ("explicit curve", max(prime.bit_length(), 0))


def _wrapped(data, item, tag):
    """The single element held inside an OCTET STRING or BIT STRING."""
    start = item[1] + (1 if item[0] == DER_BIT_STRING else 0)
    if item[0] != tag or start > item[2]:
        raise ParseError("malformed certificate: unexpected DER tag 0x%02x" % item[0])
    inner = _tlv(data, start, item[2])
    if inner[2] != item[2]:
        raise ParseError("malformed certificate: trailing bytes in DER")
    return inner


def _public_key(cert, data, item):
    cert.spki = _element(data, item)
    algorithm, key = _children(data, item, DER_SEQUENCE, 2)[:2]
    algorithm = _children(data, algorithm, DER_SEQUENCE, 1)
    oid = _oid(data, algorithm[0])
    parameters = algorithm[1] if len(algorithm) > 1 else None
    if oid in (OID_RSA, OID_RSA_PSS):
        modulus = _children(data, _wrapped(data, key, DER_BIT_STRING), DER_SEQUENCE, 2)[0]
        cert.key_type = "RSA" if oid == OID_RSA else "RSA-PSS"
        cert.key_bits = _integer(data, modulus, MAX_RSA_BITS, "RSA modulus").bit_length()
    elif oid == OID_EC:
        name, cert.key_bits = _ec_curve(data, parameters)
        cert.key_type = "EC " + name
    elif oid == OID_DSA:
        if parameters is None:   # "inherited from the issuer": RFC 3279 allows, nobody reads it
            raise ParseError("malformed certificate: DSA key without its parameters")
        prime = _children(data, parameters, DER_SEQUENCE, 3)[0]
        cert.key_type = "DSA"
        cert.key_bits = _integer(data, prime, MAX_DSA_BITS, "DSA prime").bit_length()
    elif oid in OID_EDWARDS:
        cert.key_type, cert.key_bits = OID_EDWARDS[oid]
    else:
        cert.key_type = oid


def _at_most(items, most, what):
    """items, a list read from a certificate, unless it holds more than most."""
    if len(items) > most:
        raise ParseError("malformed certificate: more than %d %s" % (most, what))
    return items


def _boolean(data, item):
    raw = data[item[1]:item[2]]
    if item[0] != DER_BOOLEAN or raw not in (b"\0", DER_TRUE):
        raise ParseError("malformed certificate: bad BOOLEAN")
    return raw == DER_TRUE


def _extensions(der, tbs):
    """(OID as DER, value) of each extension, in order; ParseError for one that
    appears twice (RFC 5280 4.2) or a "critical" FALSE written out (DER omits a
    default)."""
    seen = set()
    for item in tbs[6:]:
        if item[0] != DER_EXTENSIONS:
            continue
        for extension in _at_most(_children(der, _children(der, item, DER_EXTENSIONS, 1)[0],
                                            DER_SEQUENCE), MAX_EXTENSIONS, "extensions"):
            fields = _children(der, extension, DER_SEQUENCE, 2)
            name, oid = _oid(der, fields[0]), _element(der, fields[0])
            if oid in seen or len(fields) > 3 or len(fields) == 3 and not _boolean(der, fields[1]):
                raise ParseError("malformed certificate: bad or repeated extension %s" % name)
            seen.add(oid)
            yield oid, fields[-1]


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
    rdns, count = [], 0
    for rdn in _children(data, item, DER_SEQUENCE):
        members = _children(data, rdn, DER_SET, 1)
        count += len(members)
        if count > MAX_NAME_ATTRIBUTES:
            raise ParseError("malformed certificate: a name of more than %d attributes"
                             % MAX_NAME_ATTRIBUTES)
        attributes = []
        for attribute in members:
            fields = _children(data, attribute, DER_SEQUENCE, 2)
            if len(fields) != 2:
                raise ParseError("malformed certificate: bad name attribute")
            oid = _oid(data, fields[0])
            attributes.append("%s=%s" % (OID_NAMES.get(oid, oid),
                                         _attribute_value(data, fields[1])))
        rdns.append("+".join(attributes))
    return ", ".join(rdns)


def _days_in_month(year, month):
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (no calendar import)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


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
    return _days_from_civil(year, month, day) * DAY + hour * HOUR + minute * MINUTE + second


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
    name_type, raw = SAN_TYPES.get(item[0]), data[item[1]:item[2]]
    if name_type in ("DNS", "email", "URI"):
        return name_type, _ia5_text(raw)
    if name_type == "IP":
        if len(raw) not in (4, 16):
            raise ParseError("malformed certificate: IP address of %d bytes" % len(raw))
        family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
        return name_type, socket.inet_ntop(family, raw)
    if name_type == "RID":
        return name_type, _oid(data, (DER_OID,) + tuple(item[1:]))
    if name_type == "DirName":
        inner = _children(data, item, item[0], 1)
        if len(inner) != 1:
            raise ParseError("malformed certificate: bad directoryName")
        return name_type, _name(data, inner[0])
    if name_type == "othername":
        fields = _children(data, item, item[0], 2)
        value = _children(data, fields[1], 0xA0, 1)
        if len(fields) != 2 or len(value) != 1:
            raise ParseError("malformed certificate: bad otherName")
        return name_type, "%s:%s" % (_oid(data, fields[0]), _hex_element(data, value[0]))
    if name_type:
        return name_type, "#" + binascii.hexlify(raw).decode("ascii")
    raise ParseError("malformed certificate: subjectAltName entry with tag 0x%02x" % item[0])


def _crl_urls(data, value):
    """The URIs in the fullName of each DistributionPoint (RFC 5280 4.2.1.13), in
    order. The other forms (a name relative to the CRL issuer, reasons, cRLIssuer)
    carry no URL. At most MAX_CRL_NAMES points, and names in all of their fullNames."""
    points = _at_most(_children(data, _wrapped(data, value, DER_OCTET_STRING), DER_SEQUENCE,
                                1), MAX_CRL_NAMES, "CRL distribution points")
    names = []
    for point in points:
        for field in _children(data, point, DER_SEQUENCE):
            if field[0] != 0xA0:                  # [0] distributionPoint
                continue
            name = _children(data, field, 0xA0, 1)[0]
            if name[0] == 0xA0:                   # [0] fullName: GeneralNames
                names += _children(data, name, 0xA0, 1)
        _at_most(names, MAX_CRL_NAMES, "names in CRL distribution points")
    return [text for name_type, text in (_general_name(data, name) for name in names)
            if name_type == "URI"]


def _extension(cert, data, oid, value):
    if oid == OID_SAN_DER:
        names = _at_most(_children(data, _wrapped(data, value, DER_OCTET_STRING),
                                   DER_SEQUENCE, 1), MAX_SANS, "subjectAltNames")
        for name_type, text in (_general_name(data, name) for name in names):
            cert.alt_names.append((name_type, text))
            if name_type == "DNS":
                cert.dns_names.append(text)
            elif name_type == "IP":
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
    elif oid == OID_CRL_DP_DER:                   # issue 21
        cert.crl_urls = _crl_urls(data, value)


def parse_certificate(der):
    """Read one DER certificate whole; ParseError if any part is malformed or beyond
    the reader's bounds (MAX_CERTIFICATE and the others)."""
    cert = Certificate(bytes(der))
    der = cert.der
    if len(der) > MAX_CERTIFICATE:
        raise ParseError("malformed certificate: %d bytes, more than %d" % (
            len(der), MAX_CERTIFICATE))
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
    cert.serial = _integer(der, tbs[0], MAX_SERIAL_BITS, "serial number")
    cert.signature_algorithm = _signature_algorithm(der, outer[1])
    _signature_algorithm(der, tbs[1])
    cert.issuer_der, cert.subject_der = _element(der, tbs[2]), _element(der, tbs[4])
    cert.issuer, cert.subject = _name(der, tbs[2]), _name(der, tbs[4])
    times = _children(der, tbs[3], DER_SEQUENCE, 2)
    cert.not_before, cert.not_after = _time(der, times[0]), _time(der, times[1])
    _public_key(cert, der, tbs[5])
    for oid, value in _extensions(der, tbs):
        _extension(cert, der, oid, value)
    cert.sha256 = hashlib.sha256(der).hexdigest()     # once: reports show them for every
    cert.spki_sha256 = hashlib.sha256(cert.spki).hexdigest()    # source that sent it
    cert.name = cert.message_name()
    return cert


class ParsedCertificates(object):
    """The certificates a run has read, by their DER bytes: each distinct one is
    parsed once per run, however many sources send it (a fleet of 10,000 that
    serves two chains reads about four), and those sources share the one
    Certificate, which nothing changes after parse_certificate. Every fetching
    thread uses it at once: the lock makes each certificate parsed exactly once.
    A malformed certificate is not kept; each source that sends it fails alike.
    The chains of a fleet repeat too: shared() keeps one list for each."""

    def __init__(self):
        self._by_der, self._lock = {}, threading.Lock()
        self._chains = {}                 # tuple of certificates -> the one list of them

    def parse(self, der):
        """parse_certificate(der), or the Certificate already read from these bytes."""
        der = bytes(der)
        cert = self._by_der.get(der)      # one dict read is atomic: a hit needs no lock
        if cert is None:
            with self._lock:
                cert = self._by_der.get(der)    # another thread may have just parsed it
                if cert is None:
                    cert = self._by_der[der] = parse_certificate(der)
        return cert

    def shared(self, chain):
        """chain (a list of certificates this run parsed), or the equal list given
        before: one list, the same object, for every source with these certificates
        in this order. Nothing changes a chain once a result holds it."""
        return self._chains.setdefault(tuple(chain), chain)   # one atomic dict step


def parse_chain(ders, where, parsed=None):
    """Every certificate of a chain; a malformed one is named by where and position.
    parsed: the run's ParsedCertificates, which read each certificate once."""
    parse = parsed.parse if parsed is not None else parse_certificate
    certs = []
    for index, der in enumerate(ders):
        try:
            certs.append(parse(der))
        except ParseError as exc:
            raise ParseError("%s: certificate %d of %d: %s" % (where, index + 1, len(ders),
                                                                exc))
    return certs


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


# Codes of chain problems: how the served chain differed from the chain files get. Decisions
# (--check's WARNING: CHECK_WARNS) read the code; the text is for people and may change.
PROBLEM_ORDER = "order"            # the chain's certificates were sent out of order
PROBLEM_ROOT = "root"              # the root was sent too, byte for byte the trust anchor
PROBLEM_OFF_CHAIN = "off_chain"    # sent, not on the chain OpenSSL verified: never written
PROBLEM_DUPLICATE = "duplicate"    # a certificate was sent more than once
PROBLEM_INCOMPLETE = "incomplete"  # intermediates the server left out, found in the trust store
PROBLEM_UNRELATED = "unrelated"    # nothing verified: sent, not on the chain built from names
PROBLEM_TRUNCATED = "truncated"    # a local file held more than MAX_LOCAL_CERTS
CHECK_WARNS = (PROBLEM_ORDER, PROBLEM_OFF_CHAIN, PROBLEM_INCOMPLETE)  # clients may fail
OUT_OF_ORDER = "the chain was served out of order"


class Problem(object):
    """One chain problem: code (a PROBLEM_* constant), text for people."""

    def __init__(self, code, text):
        self.code, self.text = code, text


def names_and_digests(certs):
    """Certificates for a message, each by its name and the start of its sha256: a
    look-alike has the name of the certificate it imitates."""
    return "; ".join("%s (sha256 %s...)" % (cert.name, cert.sha256[:16]) for cert in certs)


def chain_from_names(certs):
    """The issuing chain built from names and key identifiers alone: (chain, problems).

    The chain runs leaf, then the first served certificate whose subject (and key
    id) names the issuer of the one before, and stops before a self-issued root.
    No signature is checked: this is what unverified runs (--insecure, local
    files, a failed verification's message) go by; verified runs get the chain
    OpenSSL built instead (keep_verified_chain). The problems say how the served
    list differed from that: order, root, extras.
    """
    chain, rest, problems = [certs[0]], list(certs[1:]), []
    while not chain[-1].self_issued:
        issuer = next((c for c in rest if c.issued(chain[-1])), None)
        if issuer is None:
            break
        rest.remove(issuer)
        chain.append(issuer)
    if [c.der for c in chain] != [c.der for c in certs[:len(chain)]]:
        problems.append(Problem(PROBLEM_ORDER, OUT_OF_ORDER))
    if len(chain) > 1 and chain[-1].self_issued:
        problems.append(Problem(PROBLEM_ROOT, "the root certificate (%s) was included"
                                % chain[-1].name))
        chain.pop()
    if rest:
        problems.append(Problem(PROBLEM_UNRELATED, "%d unrelated or duplicate certificate(s) "
                                "were included: %s" % (len(rest), names_and_digests(rest))))
    return chain, problems


# ---------------------------------------------------------------------------
# Local files: paths other local users can reach, the one bounded reader of
# files, and temporary files written whole. Keys and --config are read here; the
# outputs are checked here before any connection, and written by Install.
# ---------------------------------------------------------------------------

# Paths other local users can reach. As OpenSSH's StrictModes and logrotate do, certgrab
# writes only where no other user can change what it writes: every directory from / to
# the file belongs to root or to the user certgrab runs as, and is not writable by group
# or others, except a sticky directory such as /tmp for the entries in it that root or
# that user own (systemd's CHASE_SAFE rule). No other user can then rename, replace or
# add anything along the path, so what was checked is what gets written: the check and
# the write are no race. A symbolic link is followed only when root or that user owns it
# and no other user could have put it there.

KEY_CONTENTS = ("combined", "privkey")     # the outputs that hold the private key


def trusted_users(owner=-1):
    """The uids whose files and directories certgrab trusts: root and the user it runs
    as, and for an existing output file also --owner's (owner, -1 when not given)."""
    return frozenset(uid for uid in (0, os.geteuid(), owner) if uid != -1)


def user_name(uid):
    """uid's login name for messages, or its number where no name is known."""
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _exposed(entry):
    """True when users other than its owner may change entry (an lstat or fstat
    result): write a file, add and remove entries in a directory."""
    return bool(entry.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _safe_entry(parent, entry, trusted):
    """True when no user outside trusted can replace entry (an lstat result; None: it is
    missing, and certgrab would make it) in the directory parent."""
    if parent.st_uid not in trusted:
        return False
    if not _exposed(parent):
        return True
    return bool(parent.st_mode & stat.S_ISVTX) and (entry is None or entry.st_uid in trusted)


def _unsafe_entry(doing, directory, parent, entry, here):
    """The RefusedError for an entry that _safe_entry found another user could replace."""
    if parent.st_uid not in trusted_users():
        return RefusedError("%s: the directory %s belongs to %s, who could change what is in "
                            "it" % (doing, directory, user_name(parent.st_uid)),
                            hint="chown root %s, or choose a directory only root can "
                                 "change" % directory)
    if not parent.st_mode & stat.S_ISVTX:
        return RefusedError("%s: the directory %s is writable by group or others (mode %04o)"
                            % (doing, directory, stat.S_IMODE(parent.st_mode)),
                            hint="chmod go-w %s" % directory)
    return RefusedError("%s: %s, in the sticky directory %s, belongs to %s" % (
        doing, here, directory, user_name(entry.st_uid)),
        hint="choose a path outside %s, or remove %s" % (directory, here))


def _lstat(path, doing):
    """os.lstat(path), None when missing; WriteError when it cannot be looked at."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WriteError("%s: cannot look at %s: %s" % (doing, path, exc.strerror or exc))


def _names(path):
    """The names in path, without the empty ones and "."."""
    return [name for name in path.split("/") if name not in ("", ".")]


def _link_target(doing, link, entry, safe, hops):
    """Where the symbolic link points, if resolve_path may follow it."""
    if entry.st_uid not in trusted_users():
        raise RefusedError("%s: the symbolic link %s belongs to %s" % (
            doing, link, user_name(entry.st_uid)), hint="remove it, or chown -h root %s "
                                                         "if root made it" % link)
    if not safe:
        raise RefusedError("%s: the symbolic link %s is in a directory other users can "
                           "change" % (doing, link), hint="name the path it points to")
    if hops > LINK_HOPS:
        raise WriteError("%s: more than %d symbolic links" % (doing, LINK_HOPS))
    try:
        return os.readlink(link)
    except OSError as exc:
        raise WriteError("%s: cannot read the link %s: %s" % (doing, link, exc.strerror or exc))


def resolve_path(path, doing, strict=True):
    """path resolved one name at a time from /, as the kernel would: (real path, lstat of
    its last entry or None when missing, whether other users may add entries beside it).
    A missing name ends the walk (certgrab would make the rest, in a directory of its
    own where more names follow). A symbolic link is
    followed only when root or this user owns it and no other user could have put it
    there; with strict, every entry on the way must be safe (_safe_entry). Otherwise
    RefusedError, doing saying what was refused ("cannot write FILE")."""
    trusted, hops = trusted_users(), 0
    names = _names(path if path.startswith("/") else os.path.join(os.getcwd(), path))
    real, parent = "/", _lstat("/", doing)
    while names:
        name = names.pop(0)
        if name == "..":            # real holds no link: its parent is its dirname
            real = os.path.dirname(real)
            parent = _lstat(real, doing)
            continue
        here = os.path.join(real, name)
        entry = _lstat(here, doing)
        safe = _safe_entry(parent, entry, trusted)
        if strict and not safe:
            raise _unsafe_entry(doing, real, parent, entry, here)
        if entry is None:                       # certgrab would make the rest
            if ".." in names:
                raise WriteError("%s: %s does not exist" % (doing, here))
            return os.path.join(here, *names), None, not names and _exposed(parent)
        if stat.S_ISLNK(entry.st_mode):
            hops += 1
            link_target = _link_target(doing, here, entry, safe, hops)
            names = _names(link_target) + names
            if link_target.startswith("/"):
                real, parent = "/", _lstat("/", doing)
        elif names and not stat.S_ISDIR(entry.st_mode):
            raise WriteError("%s: %s is not a directory" % (doing, here))
        elif names:
            real, parent = here, entry
        else:
            return here, entry, _exposed(parent)
    return real, parent, False


def _file_type(entry):
    mode = entry.st_mode
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a device"


def resolve_output(path, content, owner):
    """(real path, lstat or None) of an output, resolved strictly (resolve_path), and
    more: its directory is no place others may add files to, not even a sticky one (one
    could take the file's name, or its lock's, first); an existing file is a regular file
    owned by root, this user or --owner (owner: its uid or -1), and one that holds the
    private key is not open to others: such a file is refused, never reused."""
    doing = "cannot write %s" % path
    real, entry, exposed = resolve_path(path, doing)
    if exposed:
        raise RefusedError("%s: other users may create files in %s; one could take the "
                           "name of the file, or of its lock, first" % (
                               doing, os.path.dirname(real)),
                           hint="write into a directory that only root can write")
    if entry is None:
        return real, None
    it = "it" if real == os.path.abspath(path) else "its target %s" % real
    if stat.S_ISDIR(entry.st_mode):
        raise WriteError("%s: %s is a directory" % (doing, it))
    if not stat.S_ISREG(entry.st_mode):
        raise RefusedError("%s: %s is %s, not a regular file" % (doing, it, _file_type(entry)),
                           hint="remove it: certgrab replaces regular files only")
    if entry.st_uid not in trusted_users(owner):
        raise RefusedError("%s: %s belongs to %s; an existing file keeps its owner only when "
                           "that is root, the user certgrab runs as or --owner" % (
                               doing, it, user_name(entry.st_uid)),
                           hint="chown root %s, or remove it" % real)
    if content in KEY_CONTENTS and entry.st_mode & stat.S_IRWXO:
        raise RefusedError("%s: %s holds the private key, and other users may read it (mode "
                           "%04o)" % (doing, it, stat.S_IMODE(entry.st_mode)),
                           hint="chmod 600 %s, and count the key as exposed" % real)
    return real, entry


def resolve_outputs(plan, owner):
    """[(path as named, real path, content)] of the planned outputs, each checked."""
    return [(path, resolve_output(path, content, owner)[0], content) for path, content in plan]


def plan_outputs(out_dir, paths, key_paths, privkey=False, owner=-1):
    """(path, content) for every file asked for, checked before any network I/O:
    --out-dir's files (and privkey.pem with --privkey), then paths, a dict of
    content ("cert", "chain", "fullchain", "combined") to the file named by its
    --KIND-path (or None). Only privkey.pem may be a --key-path file itself:
    it then gets the key the new leaf matches, in the same set. Every output
    must be safe from other users (resolve_output; owner: --owner's uid or -1)."""
    plan = []
    if out_dir:
        plan += [(os.path.join(out_dir, name), name[:-4]) for name in OUT_DIR_FILES]
    if out_dir and privkey:
        plan.append((os.path.join(out_dir, PRIVKEY_FILE), "privkey"))
    for content in ("cert", "chain", "fullchain", "combined"):
        if paths[content]:
            plan.append((paths[content], content))
    absolute = [os.path.realpath(path) for path, _ in plan]
    if len(set(absolute)) != len(absolute):
        raise UsageError("two outputs name the same file")
    for key_path in key_paths:
        if any(path == os.path.realpath(key_path) and content != "privkey"
               for path, (_, content) in zip(absolute, plan)):
            raise UsageError("an output would overwrite the --key-path file %s" % key_path,
                             options=("--key-path",))
    resolve_outputs(plan, owner)
    return tuple(plan)


def make_directory(directory):
    try:
        os.makedirs(directory, DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise WriteError("cannot create directory %s: %s" % (directory, exc.strerror or exc))


def read_file(path, limit, output=False, kept=False):
    """The one bounded reader of local files: at most limit + 1 bytes of path, so that
    the caller can tell a file larger than limit. OSError when it cannot be read.

    Two rules, since the files are of two kinds. An input, named by the user who runs
    certgrab (a key, --config, a SOURCE, /proc), is opened as named: through links
    (certbot's live/ holds links), and a pipe (--key-password-file <(...)) is read
    too. An output (output), or a file certgrab keeps beside the outputs or in
    --cache-dir (kept), lies where certgrab writes: it is opened without following a
    link or waiting on a FIFO and checked with fstat (OSError when it is a link or not
    a regular file; None when it is missing), and a kept one is refused (RefusedError)
    unless it is this user's and no one else may write it."""
    if not (output or kept):
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if kept and (found.st_uid != os.geteuid() or _exposed(found)):
            raise RefusedError("%s is not a file certgrab wrote: it %s" % (
                path, "belongs to %s" % user_name(found.st_uid) if found.st_uid != os.geteuid()
                else "is writable by group or others (mode %04o)" % stat.S_IMODE(found.st_mode)))
        return handle.read(limit + 1)


def read_input(path, option):
    """The file named by option (--key-path, --config...), of at most MAX_FILE bytes."""
    try:
        data = read_file(path, MAX_FILE)
    except OSError as exc:
        raise InputError("cannot read %s %s: %s" % (option, path, exc.strerror or exc),
                         options=(option,))
    if len(data) > MAX_FILE:
        raise UsageError("%s %s: larger than %d bytes" % (option, path, MAX_FILE),
                         options=(option,))
    return data


def read_existing(path):
    """An output's bytes (read_file); None when it is missing or unreadable (it is then
    rewritten)."""
    try:
        return read_file(path, MAX_FILE, output=True)
    except OSError:
        return None


def close_emptied(fd):
    """Close a temporary file of ours after emptying it (it may hold a private key)."""
    for step in (lambda: os.ftruncate(fd, 0), lambda: os.close(fd)):
        try:
            step()
        except OSError:
            pass


def discard_temp(path, dir_fd=None):
    """Remove a temporary file of ours; if it cannot go, at least empty it (but not a
    metrics temp, in dir_fd: it holds nothing secret). True if gone."""
    try:
        os.unlink(path, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    if dir_fd is None:
        try:
            os.truncate(path, 0)
        except OSError:
            pass
    return False


def write_temp_file(directory, name, data, mode=PRIVATE_MODE, owner=None, mtime=None,
                    dir_fd=None):
    """A new file "." + name + TEMP_MARK + random in directory, written and fsynced;
    with dir_fd, in the directory open there (the name returned is then relative to it).
    Created exclusively: a link or file planted at its name is never used.

    On any failure the file is emptied and removed: it may hold a private key.
    """
    temp = "." + name + TEMP_MARK + binascii.hexlify(os.urandom(6)).decode("ascii")
    if dir_fd is None:
        temp = os.path.join(directory, temp)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE,
                 dir_fd=dir_fd)
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
        discard_temp(temp, dir_fd)
        raise
    try:
        os.close(fd)
    except OSError:
        discard_temp(temp, dir_fd)
        raise
    return temp


def remove_quietly(path, dir_fd=None):
    """Remove a scratch file that holds nothing secret (key_matches' public
    certificate, an old metrics file's temp); a failure changes nothing."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


def sync_directory(directory, reporter, dir_fd=None):
    """Make the renames durable (dir_fd: the directory, open); say so when the
    filesystem refuses (-v)."""
    try:
        fd = os.open(directory, os.O_RDONLY) if dir_fd is None else dir_fd
        try:
            os.fsync(fd)
        finally:
            if dir_fd is None:
                os.close(fd)
    except OSError as exc:
        reporter.info("cannot fsync directory %s (%s): the new files are in place, but a "
                      "power failure now could bring back old ones" % (
                          directory, exc.strerror or exc))


def previous_path(path):
    """Where keep_previous keeps an output's version from before an unconfirmed install."""
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + PREVIOUS_MARK)


def rolled_back_path(plan):
    """The record of the leaf that was rolled back: beside the first output."""
    first = plan[0][1]
    return os.path.join(os.path.dirname(first), "." + os.path.basename(first) + ROLLED_BACK_MARK)


def read_kept(path, hint):
    """A file certgrab keeps beside the outputs (PREVIOUS_MARK, ROLLED_BACK_MARK); None
    when there is none. Read as outputs are (read_file), and only when it is a
    regular file of this user's that no one else may write: anything else is refused.
    hint: what a failure leaves, for its message."""
    try:
        return read_file(path, MAX_FILE, kept=True)
    except RefusedError as exc:
        raise RefusedError(str(exc), hint="remove it; %s" % hint)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EINVAL):    # O_NOFOLLOW met a link; not regular
            raise RefusedError("%s is not a file certgrab wrote: it is %s" % (
                path, "a symbolic link" if exc.errno == errno.ELOOP else "not a regular file"),
                hint="remove it; %s" % hint)
        raise WriteError("cannot read %s: %s" % (path, exc.strerror or exc), hint=hint)


def replace_file(path, name, data):
    """Replace path with data, 0600, as install_files writes: a temporary file created
    exclusively beside it ("." + name + TEMP_MARK, which the next run removes if this
    one dies), fsynced, renamed; removed again when the rename fails. OSError."""
    temp = write_temp_file(os.path.dirname(path), name, data, PRIVATE_MODE)
    try:
        os.replace(temp, path)
    except OSError:
        discard_temp(temp)
        raise


def write_kept(path, name, data, hint, reporter):
    """Replace path (beside an output) with data (replace_file), the directory synced.
    hint: what a failure leaves, for its message."""
    try:
        replace_file(path, name, data)
    except OSError as exc:
        raise WriteError("cannot write %s: %s" % (path, exc.strerror or exc), hint=hint)
    sync_directory(os.path.dirname(path), reporter)


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
        self.algorithm, self.spki = None, None     # "RSA" or "EC"; SPKI DER
        self.encrypted = False

    @property
    def spki_sha256(self):
        return hashlib.sha256(self.spki).hexdigest() if self.spki else None


def _der(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")   # rsaEncryption, NULL


def _rsa_spki(der, item):
    fields = _children(der, item, DER_SEQUENCE, 3)              # version, n, e, ...
    public = _der(DER_SEQUENCE, _element(der, fields[1]) + _element(der, fields[2]))
    return _der(DER_SEQUENCE, RSA_ALGORITHM + _der(DER_BIT_STRING, b"\0" + public))


EC_ALGORITHM_OID = bytes.fromhex("06072a8648ce3d0201")            # id-ecPublicKey


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


def _key_public_info(label, der):
    """(algorithm, SubjectPublicKeyInfo DER) of an unencrypted key; (None, None) if
    unknown."""
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


def read_private_key(path, password_path):
    """Read --key-path (and --key-password-file); never prompts for a password. Core
    dumps are off from here on: the key is in memory."""
    disable_core_dumps()
    pem = read_input(path, "--key-path")
    password = None
    if password_path:
        password = read_input(password_path, "--key-password-file").splitlines()[:1]
        password = password[0] if password else b""
    key = PrivateKey(path, pem, password)
    lines = pem.decode("ascii", "replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("-----BEGIN ")
                  and line.endswith("PRIVATE KEY-----")), None)
    if start is None:
        raise UsageError("--key-path %s: no PEM private key in it" % path,
                         options=("--key-path",))
    label, body = lines[start][11:-5], []
    for line in lines[start + 1:]:
        if line.startswith("-----END"):
            break
        body.append(line)
    if "ENCRYPTED" in label or any(line.startswith("Proc-Type:") for line in body):
        if password is None:
            raise UsageError("--key-path %s is encrypted" % path,
                             hint="pass --key-password-file FILE (certgrab never prompts)",
                             options=("--key-path",))
        key.encrypted = True
        return key
    try:
        der = binascii.a2b_base64("".join(line for line in body if ":" not in line))
        key.algorithm, key.spki = _key_public_info(label, der)
    except (ParseError, binascii.Error, ValueError):
        raise UsageError("--key-path %s: malformed private key" % path,
                         options=("--key-path",))
    return key


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

class Source(object):
    """One SOURCE: where to dial, and the name to send (SNI) and verify. A run
    keeps one for each of its sources, 10,240 in a large fleet: its fields are
    declared (__slots__), not kept in a dict each."""

    __slots__ = ("text", "host", "port", "servername", "verify_name", "file")

    def __init__(self, text, host, port, servername, path=None):
        self.text, self.host, self.port = text, host, port
        self.servername = servername          # None: an IP with no -n: no SNI
        self.verify_name = servername or (host or "").split("%")[0]
        self.file = path                      # a local certificate file (reports only)

    # ASCII bytes for getaddrinfo and the handshake, made where they are used: given
    # a str, Python imports the idna codec (with stringprep and unicodedata), 3 ms a run.
    @property
    def host_bytes(self):
        return ascii_host(self.host or "").encode("ascii")

    @property
    def name_bytes(self):
        return ascii_host(self.verify_name).encode("ascii")

    def __str__(self):
        return self.text


def parse_port(text, what, options=()):
    if not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise UsageError("%s: port must be a number from 1 to 65535, not %r" % (what, text),
                         options=options)
    return int(text)


def check_dns_name(name, what, options=()):
    ascii_name = ascii_host(name)
    if not ascii_name or len(ascii_name) > MAX_DNS_NAME \
            or not set(ascii_name) <= HOST_CHARS - {"*"} \
            or any(not label or len(label) > MAX_DNS_LABEL or label[0] == "-" or label[-1] == "-"
                   for label in ascii_name.split(".")):
        raise UsageError("%s: not a host name or IP address" % what, options=options)


def split_source(text, default_port):
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


def parse_servername(text):
    """-n/--servername: a DNS name (trailing dot removed) or an IP address; None if absent."""
    if text is None:
        return None
    servername = text.rstrip(".")
    if not is_ip(servername):
        check_dns_name(servername, "bad --servername %r" % text, ("--servername",))
    return servername


def looks_like_file(text):
    """A SOURCE with a / or a certificate suffix names a local PEM file."""
    return "/" in text or text.endswith(CERTIFICATE_SUFFIXES)


def parse_sources(texts, servername, default_port, files_allowed):
    """A Source for each SOURCE; local files only where files_allowed (reports)."""
    sources = []
    for text in texts:
        if looks_like_file(text) and os.path.isfile(text):
            if not files_allowed:
                raise UsageError("SOURCE %s is a file: local files go with --text, --json or "
                                 "--check" % text)
            sources.append(Source(text, None, None, servername, path=text))
            continue
        if files_allowed and looks_like_file(text):
            raise UsageError("SOURCE %s: no such file" % text)
        host, port = split_source(text, default_port)
        name = servername or (None if is_ip(host) else host)
        sources.append(Source(text, host, port, name))
    return tuple(sources)


def timed_out(source, doing):
    return FetchError("%s: timed out %s" % (source, doing),
                      hint="the server is slow or silent; raise --timeout if it is just slow")


def remaining(deadline, source, doing):
    """Seconds left before the deadline; a FetchError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out(source, doing)
    return left


def resolve(source, family, deadline):
    """Addresses for the source; DNS gets the deadline too (it ignores socket timeouts)."""
    if is_ip(source.host):
        return socket.getaddrinfo(source.host_bytes, source.port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)
    answer = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(source.host_bytes, source.port, family,
                                             socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    try:
        thread.start()
    except RuntimeError:            # "can't start new thread": out of threads or memory
        raise FetchError("%s: cannot resolve %s: no thread free for the lookup" % (
            source, source.host), hint=FEWER_AT_ONCE)
    thread.join(remaining(deadline, source, "resolving %s" % source.host))
    if not answer:
        raise timed_out(source, "resolving %s" % source.host)
    if isinstance(answer[0], OSError):
        raise FetchError("%s: cannot resolve %s: %s" % (source, source.host, answer[0].args[-1]))
    return answer[0]


def new_socket(family, socktype, proto, source, deadline):
    """A socket; while the process (or the system) has no descriptor free, wait
    for another source to close one, until the deadline."""
    while True:
        try:
            return socket.socket(family, socktype, proto)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise FetchError("%s: cannot open a socket: %s" % (source, exc.strerror or exc))
            if deadline - time.monotonic() <= NO_FILE_WAIT:
                raise FetchError("%s: cannot open a socket: %s" % (source, exc.strerror),
                                 hint=FEWER_AT_ONCE)
        time.sleep(NO_FILE_WAIT)


def open_connection(source, family, deadline):
    """A TCP socket connected to the first address that answers."""
    try:
        addresses = resolve(source, family, deadline)
    except socket.gaierror as exc:
        raise FetchError("%s: cannot use address %s: %s" % (source, source.host, exc.args[-1]))
    failure = None
    for family, socktype, proto, _, address in addresses:
        sock = new_socket(family, socktype, proto, source, deadline)
        try:
            sock.settimeout(remaining(deadline, source, "connecting"))
            sock.connect(address)
            return sock
        except socket.timeout:
            sock.close()
            raise timed_out(source, "connecting to %s port %d" % (address[0], address[1]))
        except OSError as exc:
            sock.close()
            failure = exc
    raise FetchError("%s: cannot connect to port %d: %s" % (
        source, source.port, failure.strerror or failure))


def read_local_chain(result):
    """A local file as a source: its certificates in file order, from PEM blocks
    (see pem_to_ders) or a single DER certificate. A bundle is read up to
    MAX_LOCAL_CERTS (not MAX_CHAIN, a bound for what a server sends), and a
    larger one says so in the warnings."""
    path = result.source.file
    try:
        data = read_file(path, MAX_LOCAL_FILE)
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
    result.issuing, result.problems = chain_from_names(result.served)
    if len(ders) > MAX_LOCAL_CERTS:
        result.problems.append(Problem(PROBLEM_TRUNCATED, "only the first %d of the %d "
                                       "certificates in %s were read" % (
                                           MAX_LOCAL_CERTS, len(ders), path)))


# ---------------------------------------------------------------------------
# STARTTLS: the plaintext dialogue before the handshake, one function per
# protocol, each bounded by MAX_LINE, MAX_REPLY_LINES and MAX_PLAINTEXT.
# ---------------------------------------------------------------------------

MYSQL_CLIENT_SSL = 0x0800
MYSQL_MAX_PACKET = 1 << 24  # bytes: the largest packet the client says it accepts
MYSQL_UTF8 = 0x21       # the client's character set: utf8_general_ci
MYSQL_FILLER = 23       # zero bytes that end the SSLRequest (HandshakeResponse41's reserve)
MYSQL_CLIENT_FLAGS = 0x0800 | 0x0200 | 0x8000 | 0x0001   # SSL, PROTOCOL_41, SECURE, LONG_PW
POSTGRES_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
LDAP_STARTTLS = bytes.fromhex("301d02010177188016") + b"1.3.6.1.4.1.1466.20037"
LDAP_CODE_BYTES = 4     # bytes of an LDAP resultCode, an ENUMERATED (RFC 4511's are small)
LDAP_EXTENDED_RESPONSE = 0x78   # [APPLICATION 24], the answer to the StartTLS request
XMPP_STREAM = ("<?xml version='1.0'?><stream:stream xmlns='jabber:%s' "
               "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>")


def parse_ehlo(text):
    """--ehlo: a host name or an address literal ([192.0.2.1], [IPv6:2001:db8::1])."""
    if text is not None and not (text.startswith("[") and text.endswith("]")
                                 and is_ip(text[1:-1].replace("IPv6:", ""))):
        check_dns_name(text, "bad --ehlo %r" % text, ("--ehlo",))
    return text


class Plaintext(object):
    """The plaintext part of a connection: every read bounded in size and time."""

    def __init__(self, sock, source, protocol, deadline, ehlo=None):
        self.sock, self.source, self.protocol, self.deadline = sock, source, protocol, deadline
        self.ehlo = ehlo                # --ehlo, for smtp and lmtp
        self.buffer, self.received = b"", 0

    def fail(self, message, reply=None):
        """A FetchError quoting the start of reply (text, or a list of lines), escaped:
        line breaks show as \\x0a, which the server's own text cannot forge."""
        if reply is not None:
            reply = reply if isinstance(reply, str) else "\n".join(reply)
            message += " (reply: %s)" % printable(reply[:MAX_QUOTED_REPLY])
        return FetchError("%s: %s: %s" % (self.source, self.protocol, message))

    def not_offered(self, reply):
        return self.fail("the server does not offer STARTTLS", reply)

    def declined(self, reply):
        """The server offered STARTTLS but answered the command with an error."""
        return self.fail("the server refused to start TLS", reply)

    def send(self, data):
        try:
            self.sock.settimeout(remaining(self.deadline, self.source, "sending to the server"))
            self.sock.sendall(data)
        except socket.timeout:
            raise timed_out(self.source, "sending to the %s server" % self.protocol)
        except OSError as exc:
            raise self.fail("cannot send: %s" % (exc.strerror or exc))

    def _fill(self):
        try:
            self.sock.settimeout(remaining(self.deadline, self.source,
                                           "waiting for the %s server" % self.protocol))
            chunk = self.sock.recv(PLAINTEXT_READ)
        except socket.timeout:
            raise timed_out(self.source, "waiting for the %s server" % self.protocol)
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

    def reply(self, last):
        """The lines of one reply, up to the first for which last(line) is true, at most
        MAX_REPLY_LINES: every line-based dialogue reads its replies here, as smtplib's
        getreply serves every command."""
        lines = []
        while len(lines) < MAX_REPLY_LINES:
            lines.append(self.line())
            if last(lines[-1]):
                return lines
        raise self.fail("a reply of more than %d lines" % MAX_REPLY_LINES)

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


def _last_coded_line(line):
    """True for the last line of an SMTP, LMTP or FTP reply: "250 text", not "250-text"."""
    return len(line) >= 3 and line[:3].isdigit() and line[3:4] in ("", " ")


def coded_reply(talk, expected, what):
    """A reply of SMTP, LMTP or FTP: all its lines; the code must be one of expected."""
    lines = talk.reply(_last_coded_line)
    if int(lines[-1][:3]) not in expected:
        raise what(lines)
    return lines


def dot_list(talk):
    """The lines of a POP3 or NNTP multi-line reply before its "." line."""
    return talk.reply(lambda line: line == ".")[:-1]


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
        raise talk.not_offered(lines)
    talk.send(b"STARTTLS\r\n")
    coded_reply(talk, (220,), talk.declined)


def starttls_lmtp(talk):
    starttls_smtp(talk, hello=b"LHLO")


def starttls_ftp(talk):
    while coded_reply(talk, (120, 220), _greeting_failed(talk))[-1][:3] == "120":
        pass                            # "ready in a minute" comes before the 220 (RFC 959)
    talk.send(b"AUTH TLS\r\n")
    coded_reply(talk, (234,), talk.declined)


def starttls_pop3(talk):
    greeting = talk.line()
    if not greeting.startswith("+OK"):
        raise talk.fail("unexpected greeting", greeting)
    talk.send(b"CAPA\r\n")
    answer = talk.line()
    capabilities = dot_list(talk) if answer.startswith("+OK") else []
    if answer.startswith("+OK") and "STLS" not in [c.split()[0].upper() for c in capabilities
                                                   if c.split()]:
        raise talk.not_offered([answer] + capabilities)
    talk.send(b"STLS\r\n")
    answer = talk.line()
    if not answer.startswith("+OK"):
        raise talk.declined(answer)


def _imap_command(talk, tag, command):
    """Send an IMAP command: the lines of its reply, up to the one that bears its tag."""
    talk.send(tag + b" " + command + b"\r\n")
    return talk.reply(lambda line: line.startswith(tag.decode() + " "))


def starttls_imap(talk):
    greeting = talk.line()
    if not greeting.upper().startswith("* OK"):
        raise talk.fail("unexpected greeting", greeting)
    lines = _imap_command(talk, b"c1", b"CAPABILITY")
    if "STARTTLS" not in " ".join(lines[:-1]).upper().split():
        raise talk.not_offered(lines)
    lines = _imap_command(talk, b"c2", b"STARTTLS")
    if not lines[-1].upper().startswith("C2 OK"):
        raise talk.declined(lines)


def starttls_sieve(talk):
    lines = talk.reply(lambda line: line.upper().startswith(("OK", "NO", "BYE")))
    if not lines[-1].upper().startswith("OK") or '"STARTTLS"' not in [
            line.strip().upper() for line in lines]:
        raise talk.not_offered(lines)
    talk.send(b"STARTTLS\r\n")
    answer = talk.line()
    if not answer.upper().startswith("OK"):
        raise talk.declined(answer)


def starttls_nntp(talk):
    greeting = talk.line()
    if greeting[:3] not in ("200", "201"):
        raise talk.fail("unexpected greeting", greeting)
    talk.send(b"CAPABILITIES\r\n")
    answer = talk.line()
    capabilities = dot_list(talk) if answer[:3] == "101" else []
    if "STARTTLS" not in [c.strip().upper() for c in capabilities]:
        raise talk.not_offered([answer] + capabilities)
    talk.send(b"STARTTLS\r\n")
    answer = talk.line()
    if answer[:3] != "382":
        raise talk.declined(answer)


def starttls_xmpp(talk, namespace="client"):
    domain = talk.source.verify_name
    talk.send((XMPP_STREAM % (namespace, domain)).encode("utf-8"))
    features = talk.until(b"</stream:features>", b"<stream:features/>", b"</stream:error>",
                          b"</stream:stream>")
    if b"urn:ietf:params:xml:ns:xmpp-tls" not in features or b"<starttls" not in features:
        start = max(features.find(b"<stream:features"), features.find(b"<stream:error"), 0)
        raise talk.not_offered(features[start:].decode("utf-8", "replace"))  # the useful part
    talk.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    answer = talk.until(b"<proceed", b"<failure", b"</stream:stream>")
    if not answer.endswith(b"<proceed"):
        raise talk.declined(answer.decode("utf-8", "replace"))
    talk.until(b">")


def starttls_xmpp_server(talk):
    starttls_xmpp(talk, namespace="server")


def _irc_words(line):
    """An IRC line's command (upper case) and its parameters, without the prefix."""
    words = line.split()[1:] if line.startswith(":") else line.split()
    return (words[0].upper() if words else ""), words[1:]


def _irc_answer(command):
    """True for a command that answers STARTTLS: 670 (go on), 691 (no), an ERROR, or any
    error numeric (4xx, 5xx)."""
    return command in ("670", "691", "ERROR") or command.isdigit() and \
        command.startswith(("4", "5"))


def starttls_irc(talk):
    def answered(line):     # the server waits for a PONG to a PING on the way
        command, parameters = _irc_words(line)
        if command == "PING":
            talk.send(b"PONG " + " ".join(parameters).encode("utf-8") + b"\r\n")
        return _irc_answer(command)

    talk.send(b"STARTTLS\r\n")
    line = talk.reply(answered)[-1]
    command = _irc_words(line)[0]
    if command == "691":
        raise talk.declined(line)
    if command != "670":
        raise talk.not_offered(line)


def starttls_postgres(talk):
    talk.send(POSTGRES_SSL_REQUEST)
    answer = talk.exactly(1)
    if answer == b"N":
        raise talk.not_offered("N: TLS is off")
    if answer == b"E":                  # an ErrorResponse: a server too old for SSLRequest
        answer += talk.buffer[:MAX_QUOTED_REPLY]
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
        raise talk.not_offered("server %s without CLIENT_SSL" % payload[1:end].decode("latin-1"))
    request = MYSQL_CLIENT_FLAGS.to_bytes(4, "little") + MYSQL_MAX_PACKET.to_bytes(4, "little") \
        + bytes([MYSQL_UTF8]) + bytes(MYSQL_FILLER)
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
        result = _children(message, fields[1], LDAP_EXTENDED_RESPONSE, 3)
        if result[0][2] - result[0][1] > LDAP_CODE_BYTES:
            raise ParseError("resultCode too long")
        code = int.from_bytes(message[result[0][1]:result[0][2]], "big")
        text = message[result[2][1]:result[2][2]].decode("utf-8", "replace")
    except ParseError:
        raise talk.fail("malformed LDAP response", as_text(message[:60]))
    if code != 0:
        raise talk.declined("resultCode %d %s" % (code, text))


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


def starttls_dialogue(sock, source, protocol, ehlo, deadline):
    """Talk the protocol up to the point where the TLS handshake starts."""
    talk = Plaintext(sock, source, protocol, deadline, ehlo)
    STARTTLS[protocol][0](talk)
    talk.finish()


# ---------------------------------------------------------------------------
# TLS: trust store, handshake, and the chain the server sent.
# ---------------------------------------------------------------------------

class Trust(object):
    """What verification trusts: --cafile and --capath, or neither (system: the
    system's store). Decisions read the fields; str() is how messages name it."""

    def __init__(self, cafile=None, capath=None):
        self.cafile, self.capath = cafile, capath
        self.system = not (cafile or capath)

    def __str__(self):
        return " and ".join("%s %s" % (flag, path) for flag, path in (
            ("--cafile", self.cafile), ("--capath", self.capath)) if path) or "the system store"


def is_hashed_dir(path):
    """True if path holds OpenSSL's hash links (like 4a6481c9.0)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(len(n) == 10 and n[8] == "." and n[9].isdigit() for n in names)


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


def make_context(settings, algorithm=None, verify_only=False):
    """A client context: verifying (the default) or --insecure.

    With algorithm ("RSA" or "EC") it offers only TLS 1.2 cipher suites signed
    by that key type: the way to ask a dual-certificate server for the other
    certificate, since Python cannot restrict TLS 1.3 signature algorithms.
    verify_only: the run's trust store and verification and nothing else: not
    the handshake's shape (ALPN, --tls-min, --tls-max), and verifying even under
    --insecure, which is about the sources. It serves the replays (replay_verdict:
    the verified chain on Python 3.6-3.9, the CRL checks) and the CA's https://.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.alpn and not verify_only:
        ctx.set_alpn_protocols(settings.alpn)
    if (settings.tls_min or settings.tls_max) and not verify_only:
        limit_tls_versions(ctx, settings.tls_min, settings.tls_max)
    if algorithm:
        ctx.set_ciphers("aECDSA" if algorithm == "EC" else "aRSA")
        limit_to_tls12(ctx)
    if settings.insecure and not verify_only:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    trust = settings.trust
    if not trust.system:
        if trust.capath and not os.path.isdir(trust.capath):
            raise UsageError("--capath %s: not a directory" % trust.capath,
                             options=("--capath",))
        try:
            ctx.load_verify_locations(cafile=trust.cafile, capath=trust.capath)
        except ssl.SSLError as exc:
            raise UsageError("cannot load --cafile %s: %s" % (trust.cafile, ssl_reason(exc)),
                             options=("--cafile",))
        except OSError as exc:
            raise InputError("cannot load --cafile %s: %s" % (trust.cafile,
                                                               exc.strerror or exc),
                             options=("--cafile",))
        return ctx
    load_system_store(ctx)
    return ctx


# OpenSSL's verify codes (X509_V_ERR_*, x509_vfy.h; the same in 1.1.1 and 3.x) that the
# hints of a failed verification tell apart (explain_verify_failure); any other code gets
# the hint of a chain that leads to no trusted root.
X509_V_ERR_HOSTNAME_MISMATCH = 62
VERIFY_NAME = (62, 63, 64)      # HOSTNAME, EMAIL and IP_ADDRESS_MISMATCH: not the leaf's name
VERIFY_DATES = (9, 10)          # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
VERIFY_ISSUER = (2, 18, 19, 20)     # UNABLE_TO_GET_ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT,
#                                     SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY
# OpenSSL's reason codes (SSLError.reason) of a handshake that failed because the server
# does not speak TLS, and the prefixes of those of an alert the server sent.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                   "BAD_PACKET_LENGTH", "UNKNOWN_PROTOCOL", "HTTP_REQUEST")
ALERT_REASONS = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


class ChainReader(object):
    """The context for every handshake of a run, and the way to read chains.
    Python 3.6 to 3.9 use ChainReaderBefore310 instead (see new_chain_reader)."""

    def __init__(self, ctx, trust, by_algorithm=None):
        self.ctx, self.trust, self.method = ctx, trust, chain_method()
        self.by_algorithm = by_algorithm or {}    # key algorithm -> ChainReader asking for it
        self.parsed = ParsedCertificates()  # make_reader shares one among a run's readers

    def served_ders(self, tls):
        """The certificates as the server sent them: list of DER."""
        if self.method == "get_unverified_chain":
            return tls.get_unverified_chain()
        chain = tls._sslobj.get_unverified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]

    def verified_ders(self, tls):
        """The chain OpenSSL verified, root included, as DER."""
        chain = tls._sslobj.get_verified_chain() or []
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]


TLS_HANDSHAKE = 22      # TLS content type of handshake records
TLS_CERTIFICATE = 11    # handshake message type of Certificate
TLS13_VERSION = 0x0304


def _uint(data, pos, size):
    if pos + size > len(data):
        raise ParseError("malformed Certificate message: truncated")
    return int.from_bytes(data[pos:pos + size], "big")


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

    def verify_result(self, tls):
        """(OpenSSL's verify code, its message) of tls, an SSLSocket or an SSLObject."""
        code = self.lib.SSL_get_verify_result(self._ssl_pointer(tls))
        return code, self.lib.X509_verify_cert_error_string(code).decode("ascii", "replace")


class ChainReaderBefore310(ChainReader):
    """No get_verified_chain: the served chain from the Certificate message
    (3.8, 3.9) or from OpenSSL's own structures (3.6, 3.7); the verified chain
    by replays on replay_ctx (find_verified_chain), a context of its own, so
    that no replay reaches _record."""

    def __init__(self, ctx, trust, by_algorithm=None, replay_ctx=None):
        ChainReader.__init__(self, ctx, trust, by_algorithm)
        self.replay_ctx = replay_ctx
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
        return None             # find_verified_chain finds the chain instead

    def store_certificates(self):
        """The loaded trust store, parsed; a CA certificate certgrab cannot read
        is left out (no candidate chain then goes through it). A --cafile store
        is listed once per run; a hashed directory loads lazily (the handshake
        has loaded what it looked up), so it is listed again for each source.
        Each certificate is parsed once per run all the same (self.parsed)."""
        if self._store is not None:
            return self._store
        certs = []
        for der in self.ctx.get_ca_certs(binary_form=True):
            try:
                certs.append(self.parsed.parse(der))
            except ParseError:
                pass
        if self.trust.cafile and not self.trust.capath:
            self._store = certs
        return certs


def new_chain_reader(ctx, trust, by_algorithm=None, replay_ctx=None):
    """The chain reader for this Python: ChainReader on 3.10+, where the ssl
    module gives both chains; ChainReaderBefore310 (msg_callback or ctypes,
    see chain_method; replay_ctx for the verified chain) on 3.6 to 3.9."""
    if HAS_VERIFIED_CHAIN:
        return ChainReader(ctx, trust, by_algorithm)
    return ChainReaderBefore310(ctx, trust, by_algorithm, replay_ctx)


def make_reader(settings):
    """The run's context; with --key-path, one more per key type for dual-cert servers;
    on Python 3.6-3.9 one more, shared, to replay candidate paths (verifying runs).
    None when every source is a local file: they need no trust store."""
    if all(source.file for source in settings.sources):
        return None
    algorithms = ("RSA", "EC") if settings.keys else ()
    replay = None if HAS_VERIFIED_CHAIN or settings.insecure else \
        make_context(settings, verify_only=True)
    readers = dict((algorithm, new_chain_reader(make_context(settings, algorithm), settings.trust,
                                           replay_ctx=replay)) for algorithm in algorithms)
    reader = new_chain_reader(make_context(settings), settings.trust, readers, replay)
    for each in readers.values():
        each.parsed = reader.parsed     # one ParsedCertificates for the whole run
    return reader


# The ssl module verifies a chain only in a handshake, so certgrab asks OpenSSL about a
# chain by replaying one (replay_verdict): a client object of a verify_only context
# starts a handshake in memory; its ClientHello is answered with a TLS 1.2 ServerHello
# and a Certificate message holding exactly that chain. OpenSSL either verifies it, and
# then waits for the next message, or fails it. No key is involved and nothing leaves
# the process. Two things ask: Python 3.6-3.9, which cannot ask OpenSSL which chain it
# verified, replay candidate chains (find_verified_chain) in the order OpenSSL's search
# prefers them (the store's certificates first, then the served ones within their
# dates, in the order sent), so the first that verifies is the chain OpenSSL builds;
# and every Python checks CRLs so (revocation_verdict), with a context that holds the
# CRL and requires one.
MAX_REPLAYS = 16        # candidate chains replayed per source: a real one verifies at the
#                         first, and each look-alike a server sends costs one more
MAX_CANDIDATES = 256    # partial chains the candidate search looks at: names that repeat
#                         (a hostile chain) make them multiply
TLS_CLIENT_HELLO = 1    # handshake message types
TLS_SERVER_HELLO = 2
TLS12 = b"\x03\x03"     # the protocol version TLS 1.2 writes on the wire
MAX_RECORD = 16384      # bytes of plaintext in one TLS record (RFC 5246 6.2.1)
REPLAY_SUITES = {"EC": b"\xc0\x2b",     # ECDHE-ECDSA-AES128-GCM-SHA256 (EC and EdDSA keys)
                 "RSA": b"\xc0\x2f"}    # ECDHE-RSA-AES128-GCM-SHA256 (RSA, RSA-PSS keys)
RENEGOTIATION_INFO = b"\xff\x01\x00\x01\x00"  # an empty one: OpenSSL 3 insists on it
REPLAY_RANDOM = bytes(32)   # the ServerHello's random: any value but TLS 1.3's downgrade mark


def server_hostname(source):
    """The name handed to OpenSSL for SNI and the name check."""
    return source.name_bytes.decode() if NAME_AS_STR else source.name_bytes


def without_root(chain):
    """A chain as files get it: a self-issued root at its end stays in the store."""
    return chain[:-1] if len(chain) > 1 and chain[-1].self_issued else list(chain)


def issuers_by_name(served, store, now):
    """subject DER -> [(certificate, from the store)]: each certificate once (the
    store's copy of one also served), the store's before the served (OpenSSL
    looks there first), those within their dates first."""
    found, seen = {}, set()
    for cert, trusted in [(c, True) for c in store] + [(c, False) for c in served]:
        if cert.der not in seen:
            seen.add(cert.der)
            found.setdefault(cert.subject_der, []).append((cert, trusted))
    for options in found.values():
        options.sort(key=lambda option: (not option[1], not (
            option[0].not_before <= now < option[0].not_after)))
    return found


def candidate_chains(served, store, now):
    """Paths from the leaf (served[0]) to a self-issued root of the store (or the
    leaf alone, if self-issued), by names and key identifiers, through served and
    store certificates, in the order OpenSSL's own search prefers them: depth
    first, at each step the issuers in issuers_by_name's order. The first is the
    chain OpenSSL builds; the others follow where it skipped a look-alike that
    names alone cannot tell apart. At most MAX_CANDIDATES chains are looked at."""
    issuers, stack, looked = issuers_by_name(served[1:], store, now), [served[:1]], 0
    while stack and looked < MAX_CANDIDATES:
        chain, looked = stack.pop(), looked + 1
        if chain[-1].self_issued:
            yield chain
        elif len(chain) <= MAX_CHAIN:
            stack.extend(chain + [issuer] for issuer, trusted in reversed(
                issuers.get(chain[-1].issuer_der, ()))
                if issuer.issued(chain[-1]) and issuer not in chain
                and (trusted or not issuer.self_issued))


def _vector(data, size):
    """TLS's variable-length vector: its length in size bytes, then data."""
    return len(data).to_bytes(size, "big") + data


def replay_error(source, why):
    """A replay that went otherwise than OpenSSL's client goes: a bug, said as such.
    (The CRL checks say it as an unknown status: revocation_verdict.)"""
    return FetchError("%s: cannot replay the chain to OpenSSL: %s" % (source, why),
                      hint="please report it; Python 3.10 and newer read the verified path "
                           "from OpenSSL without a replay")


def client_hello_offer(hello, source):
    """(session id, [cipher suite]) of the ClientHello that replay_ctx wrote: one
    TLS record of handshake header 4 bytes, version 2, random 32, session id <1>,
    cipher suites <2>. certgrab's own bytes, read within their bounds all the same."""
    record = hello[5:5 + int.from_bytes(hello[3:5], "big")] if len(hello) > 5 else b""
    at = 4 + 2 + 32
    if len(record) <= at or hello[0] != TLS_HANDSHAKE or record[0] != TLS_CLIENT_HELLO:
        raise replay_error(source, "no ClientHello to answer")
    suites_at = at + 1 + record[at]
    end = suites_at + 2 + int.from_bytes(record[suites_at:suites_at + 2], "big")
    if end > len(record):
        raise replay_error(source, "the ClientHello is cut short")
    return record[at + 1:suites_at], [record[i:i + 2] for i in range(suites_at + 2, end - 1, 2)]


def server_flight(session_id, suite, ders):
    """TLS 1.2 records holding a ServerHello (the client's session id echoed, suite,
    renegotiation_info) and a Certificate message with exactly ders."""
    hello = TLS12 + REPLAY_RANDOM + _vector(session_id, 1) + suite + b"\x00" + \
        _vector(RENEGOTIATION_INFO, 2)
    certificates = _vector(b"".join(_vector(der, 3) for der in ders), 3)
    body = bytes([TLS_SERVER_HELLO]) + _vector(hello, 3) + \
        bytes([TLS_CERTIFICATE]) + _vector(certificates, 3)
    return b"".join(bytes([TLS_HANDSHAKE]) + TLS12 + _vector(body[at:at + MAX_RECORD], 2)
                    for at in range(0, len(body), MAX_RECORD))


def verify_failure_of(exc, tls, ctx):
    """(OpenSSL's verify code, its message) of a verification that failed with exc on
    tls, a connection of ctx. Python 3.7+ put both on the exception (an
    SSLCertVerificationError). 3.6 checks names in Python code and raises a
    CertificateError without a code for a name the leaf does not cover (that is
    X509_V_ERR_HOSTNAME_MISMATCH), and for anything else says only "certificate verify
    failed": code and message are then read from OpenSSL through ctypes (OpenSSLPeek).
    Without ctypes the code is None."""
    code = getattr(exc, "verify_code", None)
    if code is not None:
        return code, exc.verify_message
    if isinstance(exc, ssl.CertificateError):
        return X509_V_ERR_HOSTNAME_MISMATCH, str(exc)
    try:
        return OpenSSLPeek(ctx).verify_result(tls)
    except FetchError:
        return None, ssl_reason(exc)


def _replay_step(tls, ctx, source):
    """One step of a replayed handshake: None when it waits for the server, else
    (code, message) of the verification OpenSSL failed (verify_failure_of); any other
    outcome is a FetchError."""
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:         # 3.7+: SSLCertVerificationError is one
        if exc.reason == VERIFY_FAILED_REASON:
            return verify_failure_of(exc, tls, ctx)
        raise replay_error(source, "the replayed handshake failed: %s" % ssl_reason(exc))
    raise replay_error(source, "the replayed handshake went on without the server")


def replay_suite(cert):
    """The TLS 1.2 suite of REPLAY_SUITES for cert's key (after verifying, OpenSSL checks
    that they agree); None for a key no such suite serves (DSA, say)."""
    algorithm = cert.key_type.split()[0]
    return REPLAY_SUITES.get("EC" if algorithm.startswith("Ed") else algorithm.split("-")[0])


def replay_verdict(ctx, ders, suite, server_name, source):
    """OpenSSL's verdict on exactly ders (DER, first the certificate a server would be
    verified as) with ctx, a verify_only context: None when it verifies, else (verify
    code, message) as verify_failure_of gives them. server_name (None: no name check)
    is checked too, except by Python 3.6, which checks names in Python code once a
    handshake completes, and a replay never completes. suite: replay_suite's for
    ders[0]. A replay that goes otherwise is source's FetchError (replay_error)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if _replay_step(tls, ctx, source) is not None:
        raise replay_error(source, "the replayed handshake failed before the server spoke")
    session_id, suites = client_hello_offer(outgoing.read(5 + MAX_RECORD), source)
    if suite not in suites:
        raise replay_error(source, "the replayed ClientHello lacks the TLS 1.2 suite for "
                                   "the certificate's key")
    incoming.write(server_flight(session_id, suite, ders))   # split into records
    return _replay_step(tls, ctx, source)   # None: verified, waiting for ServerKeyExchange


def find_verified_chain(result, reader):
    """Python 3.6-3.9: the chain OpenSSL verified, root included: the first of
    candidate_chains that OpenSSL verifies when replayed alone, within MAX_REPLAYS.
    When none does, this source fails (a VerifyError): never a guess."""
    suite = replay_suite(result.served[0])
    if suite is None:
        raise replay_error(result.source, "no TLS 1.2 suite to replay a %s leaf"
                           % result.served[0].key_type)
    tried, failure = set(), None        # tried: the DER lists replayed
    for chain in candidate_chains(result.served, reader.store_certificates(), time.time()):
        ders = tuple(cert.der for cert in without_root(chain))
        if ders in tried:
            continue
        if len(tried) == MAX_REPLAYS:
            break
        tried.add(ders)
        failure = replay_verdict(reader.replay_ctx, ders, suite,
                                 server_hostname(result.source), result.source)
        if failure is None:
            return chain
    reason = failure[1] if failure else None
    result.verify_error = "cannot tell which path OpenSSL verified"
    raise VerifyError("%s: %s: %s; nothing is written" % (
        result.source, result.verify_error, "none of the %d path(s) tried verified alone "
        "(the last: %s)" % (len(tried), reason) if tried else "no path leads from the leaf "
        "to a root of %s by names and key identifiers" % reader.trust),
        hint="the server may send certificates that look like its intermediates but are "
             "not: serve the chain as issued (fullchain.pem); Python 3.10 and newer read "
             "the verified path from OpenSSL", reason=result.verify_error)


class FetchResult(object):
    """What one source gave, or its error. served: the certificates as sent, in
    their order; verified: the chain OpenSSL verified, root included (for
    --verified-chain); issuing: what files get, the verified chain without its
    root (keep_verified_chain), or where nothing was verified the chain built from
    names (chain_from_names); problems: how served differed from issuing (Problem).
    The certificates, and the lists of them, are shared with every source that
    sent the same (ParsedCertificates); nothing of the connection is kept
    (detached). A run keeps one for each of its sources: its fields are declared
    (__slots__), not kept in a dict each."""

    __slots__ = ("source", "error", "address", "served", "issuing", "problems", "verified",
                 "tls_version", "cipher", "verify_error", "note", "elapsed", "key", "missing",
                 "revocation", "renewal")

    def __init__(self, source):
        self.source, self.error, self.address = source, None, None
        self.served, self.issuing, self.problems, self.verified = [], [], [], []
        self.tls_version = self.cipher = self.verify_error = self.note = None
        self.elapsed = 0.0
        self.key = None         # the --key-path the leaf matched (refetch_for_key)
        self.missing = 0        # intermediates the server left out (served_problems)
        self.revocation = self.renewal = None   # issue 21: what the CA knows (consult_ca)

    @property
    def leaf(self):
        return self.issuing[0] if self.issuing else None


def tls_hint(exc, starttls):
    """The likely cause of a failed handshake, by exc's class and OpenSSL's reason code."""
    reason_code = getattr(exc, "reason", None) or ""     # OpenSSL's, e.g. HTTP_REQUEST
    if starttls == "postgres-direct":
        return "PostgreSQL before 17 has no direct TLS: try --starttls postgres"
    if reason_code in NOT_TLS_REASONS:
        return "the server did not answer with TLS: is this port plain text (HTTP, or a " \
               "protocol that needs STARTTLS)?"
    if reason_code.startswith(ALERT_REASONS):
        return "the server refused the handshake; check -n/--servername (the name it serves)"
    if closed_in_handshake(exc):
        return "the server closed the connection during the handshake"
    return None


def handshake_failure(exc, tls, reader, source, starttls):
    """Why the handshake failed: a VerifyError returned (with OpenSSL's verify code:
    explain_verify_failure gives its hint), anything else raised."""
    if isinstance(exc, ssl.CertificateError) or \
            getattr(exc, "reason", None) == VERIFY_FAILED_REASON:   # 3.7+: one class
        code, message = verify_failure_of(exc, tls, reader.ctx)
        return VerifyError("%s: certificate verification failed: %s" % (source, message),
                           reason=message, code=code)
    reason = ssl_reason(exc) if isinstance(exc, ssl.SSLError) else \
        exc.strerror or str(exc) or exc.__class__.__name__
    raise FetchError("%s: TLS handshake failed: %s" % (source, reason),
                     hint=tls_hint(exc, starttls))


def _handshake(tls, reader, source, deadline, starttls):
    """Complete the handshake. A failed verification is returned, not raised,
    so that the chain can still be read from the connection. starttls: the
    --starttls protocol, for the hint of a handshake that failed."""
    try:
        tls.settimeout(remaining(deadline, source, "before the TLS handshake"))
        tls.do_handshake()
    except socket.timeout:
        raise timed_out(source, "during the TLS handshake")
    except (ssl.CertificateError, OSError) as exc:      # an SSLError is an OSError
        return handshake_failure(exc, tls, reader, source, starttls)
    return None


def untrusted_hint(trust):
    """The hint for a chain OpenSSL refused for another reason than its names, dates or
    a missing issuer."""
    if trust.system:
        return "the chain does not lead to a root this host trusts: pass --cafile ROOT.pem " \
               "(or install ca-certificates); --insecure skips verification"
    return "the chain does not lead to a root in %s: is it the right root? --insecure " \
           "skips verification" % trust


def unknown_root_hint(last, trust, installing):
    """Name the root the chain leads to; --insecure only when not installing."""
    root = printable(last.subject if last.self_issued else last.issuer)
    if trust.system:
        hint = "the chain leads to the root \"%s\", which this host does not trust: pass " \
               "--cafile ROOT.pem with that root (or install ca-certificates)" % root
    else:
        hint = "the chain leads to the root \"%s\", which %s does not hold: if your CA " \
               "changed its root, add the new one" % (root, trust)
    return hint if installing else hint + "; --insecure skips verification"


def explain_verify_failure(failure, result, trust, installing):
    """A verification failure (a VerifyError with OpenSSL's verify code), told with what
    the server sent: a leaf alone, the root the chain leads to, the names the leaf
    covers. While installing, no hint suggests --insecure for a date or a root."""
    reason, code, leaf = failure.reason, failure.code, result.issuing[0]
    if code in VERIFY_NAME:
        hint = "the leaf covers %s; pass -n/--servername with one of those names" % (
            leaf.covered_names)
    elif code in VERIFY_DATES:
        hint = "check this machine's clock (date -u); if it is right, the server serves a " \
               "stale certificate%s" % ("" if installing else ". --insecure fetches it anyway")
    elif code not in VERIFY_ISSUER:
        hint = untrusted_hint(trust)
    elif len(result.issuing) == 1 and not leaf.self_issued and not leaf.is_ca:
        return VerifyError("%s: certificate verification failed: %s: the server sent only its "
                           "leaf (issued by \"%s\"); point it at fullchain.pem" % (
                               result.source, reason, printable(leaf.issuer)),
                           hint="certbot's fullchain.pem holds the leaf and its "
                                "intermediates, cert.pem only the leaf", reason=reason,
                           code=code)
    else:
        hint = unknown_root_hint(result.issuing[-1], trust, installing)
    return VerifyError(str(failure), hint=hint, reason=reason, code=code)


def _sort_served(served, chain, anchor):
    """The served certificates by their place: (on the chain, in the order sent;
    the root, when sent; [(position, certificate)] off the chain; sent again)."""
    on_chain, seen = set(cert.der for cert in chain), set()
    sent, root, off_chain, again = [], None, [], []
    for position, cert in enumerate(served):
        if cert.der in seen:
            again.append(cert)
        elif cert.der in on_chain:
            sent.append(cert)
        elif anchor is not None and cert.der == anchor.der:
            root = cert
        else:
            off_chain.append((position, cert))
        seen.add(cert.der)
    return sent, root, off_chain, again


def sent_only(sent, complete):
    """How much of its chain an incomplete server sent (the root aside)."""
    if sent == 1:
        return "the server sent only its leaf"
    return "the server sent only %d of the %d certificates of its chain" % (sent, complete)


def served_problems(result, trust):
    """How the served chain differed from the verified chain: (a tuple of Problems,
    the number of intermediates the trust store added). No problem is (), one
    object, however many sources have none."""
    chain, verified = result.issuing, result.verified
    anchor = verified[-1] if len(verified) > len(chain) else None
    sent, root, off_chain, again = _sort_served(result.served, chain, anchor)
    problems, missing = [], len(chain) - len(sent)
    sent_ders = set(cert.der for cert in sent)
    if [cert.der for cert in sent] != [cert.der for cert in chain if cert.der in sent_ders]:
        problems.append(Problem(PROBLEM_ORDER, OUT_OF_ORDER))
    if root is not None:
        problems.append(Problem(PROBLEM_ROOT, "the root certificate (%s) was included"
                                % root.name))
    if off_chain:
        problems.append(Problem(PROBLEM_OFF_CHAIN, "%d served certificate(s) not on the path "
                                "OpenSSL verified, never written: %s" % (len(off_chain), "; ".join(
                                    "[%d] %s" % (position, names_and_digests([cert]))
                                    for position, cert in off_chain))))
    if again:
        problems.append(Problem(PROBLEM_DUPLICATE, "%d certificate(s) were sent more than "
                                "once: %s" % (len(again), names_and_digests(again))))
    if missing:
        problems.append(Problem(PROBLEM_INCOMPLETE, "%s, without the %d intermediate "
                                "certificate(s) that verification found in %s: the server is "
                                "misconfigured (point it at fullchain.pem); clients that lack "
                                "them fail" % (sent_only(len(sent), len(chain)), missing, trust)))
    return tuple(problems), missing


def verified_certificates(result, ders, parsed):
    """The verified chain as certificates: those the server sent are reused as
    already parsed; what the trust store added (intermediates, the root) is
    read here, once per run (parsed: the run's ParsedCertificates)."""
    served = dict((cert.der, cert) for cert in result.served)
    added = parse_chain([der for der in ders if der not in served],
                        "%s: the verified path" % result.source, parsed)[::-1]
    return [served[der] if der in served else added.pop() for der in ders]


def keep_verified_chain(result, reader, verified_ders):
    """Files get exactly the chain OpenSSL verified, leaf and intermediates (the
    root stays in the store): on 3.10+ OpenSSL's own (verified_ders), on 3.6-3.9
    the one replays find (find_verified_chain). A served certificate off that
    path is never written, only named; intermediates the server left out that
    verification found in the trust store are written: never install less than
    a browser needs (served_problems says both). Both chains are lists shared with
    every source that has the same (ParsedCertificates.shared)."""
    if verified_ders is not None:
        verified = verified_certificates(result, verified_ders, reader.parsed)
    else:
        verified = find_verified_chain(result, reader)
    result.verified = reader.parsed.shared(verified)
    result.issuing = reader.parsed.shared(without_root(result.verified))
    result.problems, result.missing = served_problems(result, reader.trust)


def _fetch_into(result, reader, settings, deadline):
    source = result.source
    sock = open_connection(source, settings.family, deadline)
    address = sock.getpeername()[0]
    result.address = source.host if address == source.host else address   # by IP: one copy
    if settings.starttls:
        try:
            starttls_dialogue(sock, source, settings.starttls, settings.ehlo, deadline)
        except CertgrabError:
            sock.close()
            raise
    tls = reader.ctx.wrap_socket(sock, server_hostname=server_hostname(source),
                                 do_handshake_on_connect=False)
    try:
        failure = _handshake(tls, reader, source, deadline, settings.starttls)
        served_ders = reader.served_ders(tls)
        verified_ders = reader.verified_ders(tls) if failure is None and not settings.insecure \
            else None
        cipher = tls.cipher()               # set even when verification failed
        if cipher is not None:              # few names: one copy each, shared by the sources
            result.tls_version = sys.intern(tls.version() or cipher[1])
            result.cipher = sys.intern(cipher[0])
    finally:
        tls.close()
    if not served_ders:
        raise FetchError("%s: could not read the chain the server sent (method: %s)"
                         % (source, reader.method))
    if len(served_ders) > MAX_CHAIN:
        raise FetchError("%s: the server sent more than %d certificates" % (source, MAX_CHAIN))
    result.served = reader.parsed.shared(parse_chain(served_ders, source, reader.parsed))
    if failure is not None or settings.insecure:    # nothing verified: the chain by names
        result.issuing, result.problems = chain_from_names(result.served)
    if failure is not None:
        result.verify_error = failure.reason
        raise explain_verify_failure(failure, result, reader.trust, bool(settings.plan))
    if not settings.insecure:
        keep_verified_chain(result, reader, verified_ders)


def detached(exc):
    """exc, to be kept in a result past its fetch: without its traceback and the
    exceptions it was raised while handling, whose frames would keep that fetch's
    socket, TLS connection and raw bytes alive until the run ends. Reports use
    only its text, hint and reason."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def _fetch_once(source, reader, settings):
    """Connect, handshake and read the chain; errors are kept in the result."""
    result, started = FetchResult(source), time.monotonic()
    try:
        if source.file:
            read_local_chain(result)
        else:
            _fetch_into(result, reader, settings, started + settings.timeout)
    except CertgrabError as exc:
        result.error = detached(exc)
    result.elapsed = time.monotonic() - started
    return result


def _other_algorithm(result, keys):
    """The other key type, when no --key-path matches the served leaf and one of
    them is (or, for a key certgrab cannot read, may be) of that type."""
    if not keys or result.error is not None or result.key is not None:
        return None
    served = result.leaf.key_type.split()[0]
    algorithms = [key.algorithm for key in keys if key.algorithm and key.algorithm != served]
    if algorithms:
        return algorithms[0]
    if served in ("RSA", "EC") and any(key.algorithm is None for key in keys):
        return "EC" if served == "RSA" else "RSA"
    return None


def refetch_for_key(result, reader, settings):
    """Match the leaf with the --key-path keys, once (result.key, for the gate).
    When none matches and the server sent the certificate for the other key type
    (a dual-certificate server): ask again, offering only that type's suites."""
    if result.error is None:
        result.key = matching_key(settings.keys, result.leaf)
    wanted = _other_algorithm(result, settings.keys)
    if wanted and wanted in reader.by_algorithm:
        retry = _fetch_once(result.source, reader.by_algorithm[wanted], settings)
        if retry.error is None:
            retry.key = matching_key(settings.keys, retry.leaf)
            retry.note = "asked again for the %s certificate, matching --key-path" % wanted
            return retry
    return result


def fetch_chain(source, reader, settings):
    """Fetch one source; with --key-path, a dual-certificate server may be asked
    again for the certificate of the key's type (refetch_for_key)."""
    result = _fetch_once(source, reader, settings)
    return refetch_for_key(result, reader, settings) if settings.keys else result


# ---------------------------------------------------------------------------
# Several sources: fetched at once, each in its own thread.
# ---------------------------------------------------------------------------

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


def map_in_threads(function, items, width, reporter, doing, waiting=None):
    """[function(item) for item in items], width threads at a time (fewer when the
    host refuses more threads; with none at all, one by one in this thread); each
    thread takes the next item when done. waiting(threads), if given, runs in this
    thread meanwhile. An exception escaping function is raised here, once every
    thread is done: the callers' functions contain their bugs (_fetch_guarded,
    run_section), so it is a whole run's error (an unusable --key-path)."""
    results, lock, taken = [None] * len(items), threading.Lock(), [0]  # taken: items begun

    def worker():
        while True:
            with lock:
                index = taken[0]
                if index == len(items):
                    return
                taken[0] += 1
            try:
                results[index] = function(items[index])
            except BaseException as exc:  # the run's error, or a bug: re-raised below
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


def _fetch_guarded(source, reader, settings, reporter):
    """fetch_chain; running out of memory, or a bug, is this source's error. The
    errors fetch_chain raises itself are the run's (an unusable --key-path)."""
    try:
        return fetch_chain(source, reader, settings)
    except CertgrabError:
        raise
    except MemoryError:
        result = FetchResult(source)
        result.error = FetchError("%s: out of memory" % source, hint=FEWER_AT_ONCE)
        return result
    except Exception as exc:            # a bug: this source's error, the others go on
        result = FetchResult(source)
        result.error = internal_error(source, exc, reporter)
        return result


def fetch_all(sources, reader, settings, reporter, sharers=1):
    """Fetch every source, fetch_width at a time; results in the order given.
    Progress on a terminal for long runs, written by this thread. sharers: how
    many runs (--config's sections) share this process's limits at once."""
    if len(sources) == 1:
        return [_fetch_guarded(sources[0], reader, settings, reporter)]
    done, lock = [0], threading.Lock()

    def fetch(source):
        result = _fetch_guarded(source, reader, settings, reporter)
        with lock:
            done[0] += 1
        return result

    def progress(threads):
        for thread in threads:
            while thread.is_alive():
                reporter.progress("\rcertgrab: %d/%d sources done" % (done[0], len(sources)))
                thread.join(PROGRESS_EVERY)
        reporter.progress("\rcertgrab: %d/%d sources done\n" % (done[0], len(sources)))

    width = fetch_width(settings.parallel, len(sources), reporter, sharers)
    show = len(sources) >= PROGRESS_FROM and not reporter.quiet and sys.stderr.isatty()
    return map_in_threads(fetch, sources, width, reporter, "fetching %d source(s)",
                          progress if show else None)


def address_source(source, sockaddr):
    """The Source of one address of source's host name: dialled at that address, with
    the name's SNI and verified name, named in reports as name[address]:port."""
    address = sockaddr[0]
    if len(sockaddr) > 3 and sockaddr[3] and "%" not in address:
        address += "%%%d" % sockaddr[3]             # an IPv6 link-local address's zone
    label = "%s[%s]:%d" % (source.host, address, source.port)
    return Source(label, address, source.port, source.servername)


def addresses_of(source, family, timeout, reporter):
    """--all-addresses: a Source per A and AAAA address of source's host name, in the
    resolver's order (the lookup within timeout, as resolve() does for any source);
    a FetchResult holding the error when the name resolves to nothing, or when the
    lookup met a bug (that name's error, as _fetch_guarded makes it for a fetch)."""
    result, started = FetchResult(source), time.monotonic()
    try:
        answers = resolve(source, family, started + timeout)
        if not answers:
            raise FetchError("%s: %s resolves to no address" % (source, source.host))
        return [address_source(source, answer[4]) for answer in answers]
    except CertgrabError as exc:
        result.error = exc
    except Exception as exc:            # a bug: this name's error, the others go on
        result.error = internal_error(source, exc, reporter)
    result.elapsed = time.monotonic() - started
    return result


def _address_key(source):
    """What makes two address sources the same: address (as bytes), port and name."""
    address, _, zone = source.host.partition("%")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address), zone, source.port, source.servername


def _first_time(source, seen, reporter, of_a_name):
    """True unless a name's address was met before (a SOURCE given as an address is
    always fetched, and remembered)."""
    key = _address_key(source)
    if key in seen and of_a_name:
        reporter.info("%s: the same address as an earlier source: fetched once" % source)
        return False
    seen.add(key)
    return True


def fetch_every_address(sources, reader, settings, reporter, sharers=1):
    """--all-addresses: fetch_all, after each SOURCE that is a host name became a
    source per address (addresses_of). Results in the order given, each name's
    addresses in the resolver's order; a name that resolves to nothing is that
    source's error. An address met before (a SOURCE given as that address, or
    another name's, with the same port and name) is fetched once."""
    names = [source for source in sources if source.host and not is_ip(source.host)]
    looked_up = {}
    if names:               # a lowered --parallel is said once, by fetch_all below
        width = fetch_width(settings.parallel, len(names), Reporter(quiet=True), sharers)
        looked_up = dict(zip(names, map_in_threads(
            lambda source: addresses_of(source, settings.family, settings.timeout, reporter),
            names, width, reporter, "looking up %d name(s)")))
    groups, seen = [], set()
    for source in sources:
        found = looked_up.get(source, [source])
        if isinstance(found, list):
            found = [each for each in found if each.file or _first_time(each, seen, reporter,
                                                                        source in looked_up)]
        groups.append(found)
    fetched = iter(fetch_all([each for group in groups if isinstance(group, list)
                              for each in group], reader, settings, reporter, sharers))
    results = []
    for group in groups:
        results += [next(fetched) for _ in group] if isinstance(group, list) else [group]
    return results


# ---------------------------------------------------------------------------
# Revocation and renewal information: what the CA knows about each chain (issue 21).
# The CRLs the leaf and its intermediates name, checked by OpenSSL (--crl), and the
# renewal window the leaf's ACME server suggests (ARI, RFC 9773; --acme-directory).
# Both are asked right after the sources' fetch, each source within --timeout
# seconds of its own, over a small bounded HTTP/1.1 client (minimal hosts have no
# http.client or urllib); what one source fetched serves every source of the run,
# and with --cache-dir the next runs too.
#
#   leaf, each intermediate --CRL Distribution Points--> http:// GET --> CRL --+
#   trust store + CRL --> OpenSSL verifies the chain from that certificate
#       (replay_verdict) --> good | revoked (time, reason from the CRL) | unknown
#   --acme-directory --GET--> renewalInfo URL --GET <url>/<certID>--> window
# ---------------------------------------------------------------------------

MAX_CRL = 32 << 20      # bytes of one CRL: Let's Encrypt's shards are well under 1 MiB, the
                        # largest public CRLs a few MiB
MAX_JSON = 64 << 10     # bytes of an ACME directory or ARI answer: real ones are under 2 KiB
MAX_JSON_DEPTH = 16     # nesting of a JSON answer: ARI's and a directory's are 2 deep
MAX_JSON_NUMBER = 40    # characters of one JSON number: a date or a count needs about 20
MAX_URL = 2048          # characters of a URL from a certificate, an answer or a redirect
MAX_HTTP_LINE = 8192    # bytes of an HTTP status, header or chunk-size line
MAX_HTTP_HEADERS = 100  # header (or trailer) lines of one response; servers send about 10
MAX_HTTP_HEAD = MAX_HTTP_HEADERS * MAX_HTTP_LINE   # bytes before the body, at most
MAX_INTERIM = 4         # 1xx responses (103 Early Hints) skipped before the real one
MAX_REDIRECTS = 3       # redirects followed by one GET, each bounded alike; CAs publish
                        # CRLs and ARI without any, a CDN in front may add one
HTTP_READ = 65536       # bytes asked of the socket at once
HTTP_REDIRECTS = (301, 302, 303, 307, 308)
HTTP_PORTS = {"http": 80, "https": 443}     # for a URL without a port
PEM_LINE = 64           # characters of base64 per line of PEM (RFC 7468)
CRL_KEEP = DAY          # seconds a --cache-dir CRL is used at most, even when its nextUpdate
                        # is later: a CA must publish a new CRL within 24 hours of a
                        # revocation, but may date nextUpdate 10 days ahead (CA/B Forum
                        # Baseline Requirements 4.9.7): kept until nextUpdate, a CRL could
                        # hide a revocation for 10 days
DIRECTORY_KEEP = DAY    # seconds a --cache-dir ACME directory is used
ARI_RETRY_BOUNDS = (MINUTE, DAY)   # Retry-After is honoured within these (RFC 9773 4.3)
ARI_RETRY_DEFAULT = 6 * HOUR       # seconds an answer without Retry-After is kept
CRL_MODES = ("on", "require", "off")   # --crl: soft-fail (default), hard-fail, no CRL at all
CACHE_KEEP_MOST = DAY   # seconds any --cache-dir answer is kept at most (see CRL_KEEP)
CACHE_HEAD = 12         # bytes of a --cache-dir file's first line: its expiry in epoch
                        # seconds (11 digits last until the year 5138), and the newline
OID_CRL_REASON_DER = b"\x06\x03\x55\x1d\x15"   # 2.5.29.21 reasonCode, a CRL entry extension
CRL_REASONS = {0: "unspecified", 1: "keyCompromise", 2: "cACompromise",
               3: "affiliationChanged", 4: "superseded", 5: "cessationOfOperation",
               6: "certificateHold", 8: "removeFromCRL", 9: "privilegeWithdrawn",
               10: "aACompromise"}        # RFC 5280 5.3.1; no reasonCode: unspecified
# OpenSSL's verify codes (X509_V_ERR_*, x509_vfy.h; the same in 1.1.1 and 3.x) after a
# verification with a CRL: (status, cause). Any other code is ("unknown", "rejected"):
# OpenSSL refused the chain for a reason of its own, which the detail gives in its words.
CRL_VERDICTS = {
    23: ("revoked", None),                  # X509_V_ERR_CERT_REVOKED
    3: ("unknown", "wrong-crl"),            # X509_V_ERR_UNABLE_TO_GET_CRL
    33: ("unknown", "wrong-crl"),           # X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER
    8: ("unknown", "bad-signature"),        # X509_V_ERR_CRL_SIGNATURE_FAILURE
    5: ("unknown", "bad-signature"),        # X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE
    12: ("unknown", "stale"),               # X509_V_ERR_CRL_HAS_EXPIRED
    11: ("unknown", "not-yet-valid"),       # X509_V_ERR_CRL_NOT_YET_VALID
    15: ("unknown", "malformed"),           # X509_V_ERR_ERROR_IN_CRL_LAST_UPDATE_FIELD
    16: ("unknown", "malformed"),           # X509_V_ERR_ERROR_IN_CRL_NEXT_UPDATE_FIELD
}
# Why a revocation status is unknown (Revocation.cause), and why a renewal window is
# missing (RenewalWindow.cause): decisions read these codes, never the detail's text.
# docs/revocation.md explains each (tests/test_crl.py holds them together).
CRL_CAUSES = ("no-crl", "no-http-crl", "unreachable", "http-status", "too-large", "bad-url",
              "malformed", "wrong-crl", "bad-signature", "stale", "not-yet-valid",
              "rejected", "no-trust", "local")
ARI_CAUSES = ("expired", "no-aki", "no-ari", "unknown-certificate", "bad-window",
              "bad-answer", "unreachable", "untrusted", "http-status", "too-large",
              "bad-url", "no-trust")
# Causes of an unknown revocation status where the leaf names nothing to check: not
# a failure, so --crl on does not warn about them (--crl require still refuses).
NOTHING_TO_CHECK = ("no-crl", "no-http-crl")


class CaError(FetchError):
    """A failure to learn what the CA knows, with its cause (a code of CRL_CAUSES or
    ARI_CAUSES) and, for an HTTP answer other than 200, its status."""

    def __init__(self, message, cause, hint=None, status=None):
        FetchError.__init__(self, message, hint)
        self.cause, self.status = cause, status


class HttpResponse(object):
    """The final answer to a GET: its URL (after redirects), status, headers (names in
    lower case, repeated ones joined by ", ") and body."""

    def __init__(self, url, status, reason, headers, body):
        self.url, self.status, self.reason = url, status, reason
        self.headers, self.body = headers, body


def _ascii_digits(text, most):
    return 0 < len(text) <= most and all("0" <= char <= "9" for char in text)


def split_url(url, scheme):
    """(host, port, path) of a URL of the given scheme ("http" or "https"); a CaError
    for anything else: another scheme, userinfo, a bad host or port, spaces, controls."""
    def bad(why):
        return CaError("%s: not a usable %s:// URL: %s" % (printable(url[:200]), scheme, why),
                       "bad-url")
    if len(url) > MAX_URL or any(not 0x21 <= ord(char) <= 0x7E for char in url):
        raise bad("too long, or spaces or non-ASCII characters in it")
    if not url.lower().startswith(scheme + "://"):
        raise bad("another scheme")
    rest = url[len(scheme) + 3:].split("#", 1)[0]
    cut = min([index for index in (rest.find("/"), rest.find("?")) if index >= 0] or
              [len(rest)])
    authority, path = rest[:cut], rest[cut:]
    host, port = authority, ""
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or not is_ip(host) or port and not port.startswith(":"):
            raise bad("a bad IPv6 address")
        port = port[1:]
    elif ":" in authority:
        host, port = authority.rsplit(":", 1)
    if "@" in authority or not host:
        raise bad("no host, or a user name in it")
    if not is_ip(host):
        try:
            check_dns_name(host, "host")
        except UsageError:
            raise bad("a bad host name")
    if port and not (_ascii_digits(port, len(str(MAX_PORT))) and 1 <= int(port) <= MAX_PORT):
        raise bad("a bad port")
    if not path.startswith("/"):
        path = "/" + path
    return host, int(port) if port else HTTP_PORTS[scheme], path


class HttpReader(object):
    """The reading side of one HTTP exchange, bounded in bytes (limit and the head's
    bound) and in time (the deadline)."""

    def __init__(self, conn, url, deadline, limit):
        self.conn, self.url, self.deadline = conn, url, deadline
        self.limit = limit + MAX_HTTP_HEAD
        self.buffer, self.received, self.ended = bytearray(), 0, False

    def fail(self, message, cause="unreachable"):
        return CaError("%s: %s" % (self.url, message), cause)

    def _fill(self):
        """Read once more; False at the end of the stream."""
        if self.ended:
            return False
        try:
            self.conn.settimeout(remaining(self.deadline, self.url, "reading the answer"))
            chunk = self.conn.recv(HTTP_READ)
        except socket.timeout:
            raise timed_out(self.url, "reading the answer")
        except OSError as exc:
            raise self.fail("connection failed: %s" % (
                ssl_reason(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or exc))
        self.received += len(chunk)
        if self.received > self.limit:
            raise self.fail("the answer is larger than %d bytes" % (self.limit - MAX_HTTP_HEAD),
                            "too-large")
        self.buffer += chunk
        self.ended = not chunk
        return bool(chunk)

    def line(self):
        """One line, without its CR LF, as Latin-1 text."""
        while b"\n" not in self.buffer[:MAX_HTTP_LINE + 1]:
            if len(self.buffer) > MAX_HTTP_LINE:
                raise self.fail("a line longer than %d bytes" % MAX_HTTP_LINE)
            if not self._fill():
                raise self.fail("the server closed the connection in the middle of the answer")
        end = self.buffer.index(b"\n")
        line = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[:end + 1]
        return line.decode("latin-1")

    def take(self, count):
        """Exactly count bytes."""
        while len(self.buffer) < count:
            if not self._fill():
                raise self.fail("the server closed the connection after %d of %d bytes" % (
                    len(self.buffer), count))
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def rest(self, limit):
        """Everything up to the end of the stream (an answer without a length)."""
        while self._fill():
            if len(self.buffer) > limit:
                raise self.fail("the answer is larger than %d bytes" % limit, "too-large")
        data = bytes(self.buffer)
        del self.buffer[:]
        return data


def _response_head(reader):
    """(status, reason, headers) of the final response, skipping interim (1xx) ones."""
    for _ in range(MAX_INTERIM + 1):
        line = reader.line()
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or \
                not _ascii_digits(parts[1], 3) or len(parts[1]) != 3:
            raise reader.fail("not an HTTP answer (%s)" % printable(line[:80]))
        status, headers = int(parts[1]), {}
        for _ in range(MAX_HTTP_HEADERS + 1):
            line = reader.line()
            if not line:
                break
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or line[0] in " \t":
                raise reader.fail("a malformed header line (%s)" % printable(line[:80]))
            name = name.lower()
            headers[name] = headers[name] + ", " + value.strip() if name in headers \
                else value.strip()
        else:
            raise reader.fail("more than %d header lines" % MAX_HTTP_HEADERS)
        if not 100 <= status < 200 or status == 101:
            return status, parts[2] if len(parts) > 2 else "", headers
    raise reader.fail("more than %d interim (1xx) answers" % MAX_INTERIM)


def _chunked_body(reader, limit):
    """A body sent in chunks (RFC 9112 7.1), then its trailer lines, skipped."""
    parts, size = [], 0
    while True:
        text = reader.line().split(";", 1)[0].strip()
        if not 0 < len(text) <= 8 or any(char not in "0123456789abcdefABCDEF" for char in text):
            raise reader.fail("a malformed chunk size (%s)" % printable(text[:20]))
        chunk = int(text, 16)
        if chunk == 0:
            break
        size += chunk
        if size > limit:
            raise reader.fail("the answer is larger than %d bytes" % limit, "too-large")
        parts.append(reader.take(chunk))
        if reader.take(2) != b"\r\n":
            raise reader.fail("a chunk does not end where its size says")
    for _ in range(MAX_HTTP_HEADERS + 1):
        if not reader.line():
            return b"".join(parts)
    raise reader.fail("more than %d trailer lines" % MAX_HTTP_HEADERS)


def _response_body(reader, status, headers, limit):
    """The body, framed by Transfer-Encoding: chunked, Content-Length or the end of
    the stream; at most limit bytes, never compressed."""
    if status in (204, 304):
        return b""
    if headers.get("content-encoding", "identity").lower() != "identity":
        raise reader.fail("a compressed answer (%s), though certgrab asked for none"
                          % printable(headers["content-encoding"][:40]))
    if "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers:
            raise reader.fail("an answer framed in a way certgrab does not read "
                              "(Transfer-Encoding: %s)" % printable(
                                  headers["transfer-encoding"][:40]))
        return _chunked_body(reader, limit)
    if "content-length" not in headers:
        return reader.rest(limit)
    lengths = set(value.strip() for value in headers["content-length"].split(","))
    length = lengths.pop()
    if lengths or not _ascii_digits(length, 15):
        raise reader.fail("a malformed Content-Length (%s)" % printable(
            headers["content-length"][:40]))
    if int(length) > limit:
        raise reader.fail("the answer is %s bytes, more than the %d allowed" % (length, limit),
                          "too-large")
    return reader.take(int(length))


def _https_handshake(sock, source, context, deadline):
    """The TLS side of an https:// GET, verified with the run's trust (ca_context)."""
    tls = context.wrap_socket(sock, server_hostname=server_hostname(source),
                              do_handshake_on_connect=False)
    try:
        tls.settimeout(remaining(deadline, source, "before the TLS handshake"))
        tls.do_handshake()
    except socket.timeout:
        tls.close()
        raise timed_out(source, "during the TLS handshake")
    except (ssl.CertificateError, OSError) as exc:
        tls.close()
        verify = isinstance(exc, ssl.CertificateError) or \
            getattr(exc, "reason", None) == VERIFY_FAILED_REASON
        reason = getattr(exc, "verify_message", None) or (
            ssl_reason(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc))
        raise CaError("%s: %s: %s" % (source, "the server's certificate does not verify"
                                      if verify else "TLS handshake failed", reason),
                      "untrusted" if verify else "unreachable")
    return tls


def _http_exchange(url, scheme, limit, deadline, family, context):
    """One GET of url: the HttpResponse, whatever its status."""
    host, port, path = split_url(url, scheme)
    source = Source(url, host, port, None if is_ip(host) else host)
    conn = open_connection(source, family, deadline)
    try:
        if context is not None:
            conn = _https_handshake(conn, source, context, deadline)
        authority = "[%s]" % host if ":" in host else host
        if port != HTTP_PORTS[scheme]:
            authority += ":%d" % port
        request = ("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: certgrab/%s\r\nAccept: */*\r\n"
                   "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
                   % (path, authority, __version__))
        try:
            conn.settimeout(remaining(deadline, url, "sending the request"))
            conn.sendall(request.encode("ascii"))
        except socket.timeout:
            raise timed_out(url, "sending the request")
        except OSError as exc:
            raise CaError("%s: cannot send the request: %s" % (url, exc.strerror or exc),
                          "unreachable")
        reader = HttpReader(conn, url, deadline, limit)
        status, reason, headers = _response_head(reader)
        body = b"" if status in HTTP_REDIRECTS else _response_body(reader, status, headers,
                                                                   limit)
        return HttpResponse(url, status, printable(reason.strip()[:80]), headers, body)
    finally:
        conn.close()


def http_get(url, limit, deadline, family, context=None):
    """GET url: http:// without a context, https:// (verified with it) with one; the
    HttpResponse of the first answer that is not a redirect. Up to MAX_REDIRECTS
    redirects are followed, to the same scheme, each bounded alike; every byte comes
    within the one deadline, and a body of more than limit bytes is refused."""
    scheme = "http" if context is None else "https"
    for _ in range(MAX_REDIRECTS + 1):
        response = _http_exchange(url, scheme, limit, deadline, family, context)
        location = response.headers.get("location")
        if response.status not in HTTP_REDIRECTS or location is None:
            return response
        if location.startswith("/") and not location.startswith("//"):
            host, port, _ = split_url(url, scheme)
            location = "%s://%s:%d%s" % (scheme, "[%s]" % host if ":" in host else host, port,
                                         location)
        split_url(location, scheme)         # a redirect elsewhere is refused here
        url = location
    raise CaError("%s: more than %d redirects" % (url, MAX_REDIRECTS), "unreachable")


def expect_ok(response):
    """The response, if its status is 200; else a CaError that says which it was."""
    if response.status != 200:
        raise CaError("%s: HTTP status %d %s" % (response.url, response.status,
                                                 response.reason), "http-status",
                      status=response.status)
    return response


class JsonReader(object):
    """RFC 8259 JSON to Python values (dict, list, str, int, float, True, False, None),
    as json.loads reads it, but strict and bounded: no NaN or Infinity, at most
    MAX_JSON_DEPTH levels and MAX_JSON_NUMBER characters per number. Written here
    because minimal hosts have no json module; tests/test_ca.py holds it to json's."""

    ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
               "t": "\t"}
    LITERALS = (("true", True), ("false", False), ("null", None))

    def __init__(self, text):
        self.text, self.pos, self.depth = text, 0, 0

    def fail(self, what):
        return ParseError("malformed JSON at character %d: %s" % (self.pos, what))

    def document(self):
        value = self.value()
        self.skip_space()
        if self.pos != len(self.text):
            raise self.fail("extra data after the value")
        return value

    def skip_space(self):
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r":
            self.pos += 1

    def value(self):
        self.skip_space()
        char = self.text[self.pos:self.pos + 1]
        if char == "{" or char == "[":
            self.depth += 1
            if self.depth > MAX_JSON_DEPTH:
                raise self.fail("nested more than %d deep" % MAX_JSON_DEPTH)
            value = self.object() if char == "{" else self.array()
            self.depth -= 1
            return value
        if char == '"':
            return self.string()
        for word, value in self.LITERALS:
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        return self.number()

    def expect(self, char):
        self.skip_space()
        if self.text[self.pos:self.pos + 1] != char:
            raise self.fail("expected %r" % char)
        self.pos += 1

    def object(self):
        self.pos += 1
        members = {}
        self.skip_space()
        if self.text[self.pos:self.pos + 1] == "}":
            self.pos += 1
            return members
        while True:
            self.skip_space()
            if self.text[self.pos:self.pos + 1] != '"':
                raise self.fail("expected a member name")
            name = self.string()
            self.expect(":")
            members[name] = self.value()
            self.skip_space()
            self.pos += 1
            if self.text[self.pos - 1:self.pos] == "}":
                return members
            if self.text[self.pos - 1:self.pos] != ",":
                raise self.fail("expected ',' or '}'")

    def array(self):
        self.pos += 1
        items = []
        self.skip_space()
        if self.text[self.pos:self.pos + 1] == "]":
            self.pos += 1
            return items
        while True:
            items.append(self.value())
            self.skip_space()
            self.pos += 1
            if self.text[self.pos - 1:self.pos] == "]":
                return items
            if self.text[self.pos - 1:self.pos] != ",":
                raise self.fail("expected ',' or ']'")

    def digits(self, pos):
        """Where the run of ASCII digits from pos ends."""
        while pos < len(self.text) and "0" <= self.text[pos] <= "9":
            pos += 1
        return pos

    def number(self):
        """-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?: an int, or a float with a
        fraction or an exponent."""
        text, start = self.text, self.pos
        pos = start + 1 if text.startswith("-", start) else start
        end = pos + 1 if text.startswith("0", pos) else self.digits(pos)
        if end == pos:
            raise self.fail("expected a value")
        fraction = text.startswith(".", end) and self.digits(end + 1) > end + 1
        if fraction:
            end = self.digits(end + 1)
        power = end + 1 + (text[end + 1:end + 2] in ("+", "-"))
        exponent = text[end:end + 1] in ("e", "E") and self.digits(power) > power
        if exponent:
            end = self.digits(power)
        if end - start > MAX_JSON_NUMBER:
            raise self.fail("a number longer than %d characters" % MAX_JSON_NUMBER)
        self.pos = end
        return float(text[start:end]) if fraction or exponent else int(text[start:end])

    def string(self):
        text, pos, parts = self.text, self.pos + 1, []
        while True:
            end = pos
            while end < len(text) and text[end] not in '"\\' and text[end] >= " ":
                end += 1
            parts.append(text[pos:end])
            char, self.pos = text[end:end + 1], end + 1
            if char == '"':
                return "".join(parts)
            if char != "\\":
                raise self.fail("a control character or the end in a string")
            parts.append(self.escape())
            pos = self.pos

    def escape(self):
        char = self.text[self.pos:self.pos + 1]
        self.pos += 1
        if char in self.ESCAPES:
            return self.ESCAPES[char]
        if char != "u":
            raise self.fail("a bad escape")
        code = self.hex4()
        if 0xD800 <= code <= 0xDBFF and self.text.startswith("\\u", self.pos):
            low = self.hex4(self.pos + 2)
            if 0xDC00 <= low <= 0xDFFF:             # a surrogate pair: one character
                self.pos += 6
                return chr(0x10000 + (code - 0xD800 << 10) + low - 0xDC00)
        return chr(code)            # a lone surrogate stays one, as json.loads keeps it

    def hex4(self, pos=None):
        """The 4 hex digits at pos (default: here, and then past them)."""
        here = self.pos if pos is None else pos
        digits = self.text[here:here + 4]
        if len(digits) != 4 or any(char not in "0123456789abcdefABCDEF" for char in digits):
            raise self.fail("a bad \\u escape")
        if pos is None:
            self.pos += 4
        return int(digits, 16)


def parse_json(data):
    """JSON bytes (UTF-8, at most MAX_JSON) to Python values; ParseError if malformed."""
    if len(data) > MAX_JSON:
        raise ParseError("JSON larger than %d bytes" % MAX_JSON)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("JSON that is not UTF-8")
    return JsonReader(text).document()


class Revocation(object):
    """What the CRL says about one certificate of a path. status: "good", "revoked" or
    "unknown"; cause: why unknown (a code of CRL_CAUSES); detail: that failure for
    people; url: the CRL's; time (epoch seconds, or None when the entry could not be
    read) and reason (RFC 5280's name) of a revocation; this_update and next_update of
    the CRL that said good or revoked. cert and position: the certificate and its place
    in the chain (0: the leaf). A leaf's Revocation also holds intermediates: those of
    its chain's intermediates that name an http:// CRL, in chain order."""

    def __init__(self, status, cause=None, detail=None, url=None, crl=None, entry=None):
        self.status, self.cause, self.detail, self.url = status, cause, detail, url
        self.this_update = crl.this_update if crl else None
        self.next_update = crl.next_update if crl else None
        self.time, self.reason = entry or (None, None)
        self.cert, self.position, self.intermediates = None, 0, []

    def chain(self):
        """This (a leaf's) Revocation, then its intermediates'."""
        return [self] + self.intermediates

    def subject(self):
        """How messages name the certificate: "the leaf serial S", or "the intermediate
        "NAME" (serial S)"."""
        if self.position == 0:
            return "the leaf serial %s" % self.cert.serial_hex
        return 'the intermediate "%s" (serial %s)' % (self.cert.name, self.cert.serial_hex)


class RenewalWindow(object):
    """What the ACME server's renewalInfo (ARI) suggests for a leaf: start and end
    (epoch seconds) and explanation_url; or, when it could not be asked or said
    nothing usable, start None, cause (a code of ARI_CAUSES) and detail (for people).
    cause "expired": not asked, as RFC 9773 says of an expired certificate."""

    def __init__(self, start=None, end=None, explanation_url=None, cause=None, detail=None):
        self.start, self.end, self.explanation_url = start, end, explanation_url
        self.cause, self.detail = cause, detail


class Crl(object):
    """One CRL: its url and DER, thisUpdate and nextUpdate (epoch seconds; nextUpdate
    None when absent), and context, the trust store with it (crl_context)."""

    def __init__(self, url, der, this_update, next_update):
        self.url, self.der = url, der
        self.this_update, self.next_update = this_update, next_update
        self.context = None


def _crl_tbs(der):
    """The fields of a CRL's TBSCertList after its version: signature, issuer,
    thisUpdate, then nextUpdate, revokedCertificates and extensions where present."""
    top = _tlv(der, 0, len(der))
    if top[2] != len(der):
        raise ParseError("trailing bytes after the CRL")
    tbs = _children(der, _children(der, top, DER_SEQUENCE, 3)[0], DER_SEQUENCE, 3)
    if tbs[0][0] == DER_INTEGER:
        tbs = tbs[1:]
    if len(tbs) < 3 or tbs[0][0] != DER_SEQUENCE or tbs[1][0] != DER_SEQUENCE:
        raise ParseError("a bad TBSCertList")
    return tbs


def parse_crl(data, url):
    """A Crl from DER or PEM (X509 CRL) bytes, its header read whole; the entries are
    read only when OpenSSL says a certificate is on the CRL (crl_entry). CaError if it
    is not a CRL."""
    try:
        if data.lstrip()[:11] == b"-----BEGIN ":
            text = data.decode("ascii", "replace")
            start, stop = text.find("-----BEGIN X509 CRL-----"), text.find("-----END X509 CRL")
            if start < 0 or stop < start:
                raise ParseError("PEM without an X509 CRL in it")
            data = _pem_body(text[start + 24:stop])
        tbs = _crl_tbs(data)
        this_update = _time(data, tbs[2])
        next_update = _time(data, tbs[3]) if len(tbs) > 3 and tbs[3][0] in (0x17, 0x18) \
            else None
    except ParseError as exc:
        raise CaError("%s: not a CRL: %s" % (url, str(exc).replace("malformed certificate: ",
                                                                     "")), "malformed")
    return Crl(url, bytes(data), this_update, next_update)


def serial_octets(serial):
    """The content octets of a serial number's DER INTEGER: minimal two's complement,
    a leading zero byte kept where the top bit is set."""
    return serial.to_bytes((serial if serial >= 0 else ~serial).bit_length() // 8 + 1, "big",
                           signed=True)


def _crl_reason(der, extensions):
    """The name of a CRL entry's reasonCode; "unspecified" without one (RFC 5280 5.3.1).
    The entry has at most MAX_EXTENSIONS extensions, as a certificate."""
    for extension in _at_most(_children(der, extensions[0], DER_SEQUENCE), MAX_EXTENSIONS,
                              "extensions of a CRL entry") if extensions else ():
        fields = _children(der, extension, DER_SEQUENCE, 2)
        if _element(der, fields[0]) == OID_CRL_REASON_DER:
            code = _wrapped(der, fields[-1], DER_OCTET_STRING)
            if code[0] != 0x0A or code[2] - code[1] != 1:       # ENUMERATED, one byte
                raise ParseError("a bad reasonCode")
            return CRL_REASONS.get(der[code[1]], "reason %d" % der[code[1]])
    return CRL_REASONS[0]


def crl_entry(der, serial):
    """(revocation time, reason) of serial's entry on the CRL; None if it has none.
    Only the entries' serials are looked at, each bounded by the CRL's own DER."""
    tbs, wanted = _crl_tbs(der), serial_octets(serial)
    rest = [item for item in tbs[3:] if item[0] == DER_SEQUENCE]
    if not rest:
        return None
    pos, end = rest[0][1], rest[0][2]
    while pos < end:
        entry = _tlv(der, pos, end)
        number = _tlv(der, entry[1], entry[2])
        pos = entry[2]
        if number[0] == DER_INTEGER and der[number[1]:number[2]] == wanted:
            fields = _children(der, entry, DER_SEQUENCE, 2)
            return _time(der, fields[1]), _crl_reason(der, fields[2:])
    return None


def ca_context(settings):
    """The run's trust store in a verify_only context (make_context): what the CA's
    https:// and the CRL checks are verified with, under --insecure too."""
    try:
        return make_context(settings, verify_only=True)
    except CertgrabError as exc:        # no store on this host (an --insecure run)
        raise CaError("cannot load the trust store: %s" % exc, "no-trust", exc.hint)


def crl_context(crl, settings):
    """The trust store with this CRL, requiring a CRL for the certificate verified
    first (VERIFY_CRL_CHECK_LEAF); no name is checked. OpenSSL loads CRLs only from
    PEM files: a temporary one, removed once read."""
    ctx = ca_context(settings)
    ctx.check_hostname = False
    text = binascii.b2a_base64(crl.der, newline=False)
    pem = b"-----BEGIN X509 CRL-----\n%s\n-----END X509 CRL-----\n" % b"\n".join(
        text[start:start + PEM_LINE] for start in range(0, len(text), PEM_LINE))
    try:
        temp = write_temp_file(os.environ.get("TMPDIR") or "/tmp", "crl.pem", pem)
    except OSError as exc:
        raise CaError("cannot write a temporary file for the CRL: %s" % (exc.strerror or exc),
                      "local")
    try:
        ctx.load_verify_locations(cafile=temp)
    except ssl.SSLError as exc:
        raise CaError("%s: OpenSSL cannot read the CRL: %s" % (crl.url, ssl_reason(exc)),
                      "malformed")
    finally:
        remove_quietly(temp)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def revocation_verdict(crl, chain, source):
    """replay_verdict on chain (certificates, the one to check first) with crl's context,
    no name checked: None, or OpenSSL's (verify code, message). A replay that cannot be
    made is a CaError, cause "rejected": it says nothing about the certificate."""
    suite = replay_suite(chain[0])
    try:
        if suite is None:
            raise replay_error(source, "no TLS 1.2 suite to replay a %s key" % chain[0].key_type)
        return replay_verdict(crl.context, [cert.der for cert in chain], suite, None, source)
    except FetchError as exc:
        raise CaError(str(exc), "rejected")


def cache_path(cache_dir, prefix, url):
    """The --cache-dir file of a URL: "crl-", "ari-" or "directory-" and a hash."""
    return os.path.join(cache_dir, "%s-%s" % (prefix, hashlib.sha256(url.encode()).hexdigest()))


def read_cache(path, limit, now):
    """What a --cache-dir file keeps (write_cache) while it is fresh: None when there is
    none, it has expired, or it is not a regular file of this user's that no one else
    may write, of at most limit bytes (read_file, kept). An expiry more than
    CACHE_KEEP_MOST ahead (a clock set back) counts as expired."""
    try:
        data = read_file(path, limit + CACHE_HEAD, kept=True)
    except (OSError, RefusedError):     # not a file of ours: fetched again, and replaced
        return None
    head, _, body = (data or b"").partition(b"\n")
    if not _ascii_digits(head.decode("latin-1"), CACHE_HEAD - 1) or len(body) > limit or \
            not now < int(head) <= now + CACHE_KEEP_MOST:
        return None
    return body


def write_cache(path, data, until, reporter):
    """Keep data in --cache-dir until until (epoch seconds): the expiry as a line of
    digits, then data (replace_file). A failure is a warning: the next run fetches
    again."""
    try:
        replace_file(path, os.path.basename(path), b"%d\n" % until + data)
    except OSError as exc:
        reporter.warn("cannot keep %s in --cache-dir: %s; the next run fetches it again" % (
            path, exc.strerror or exc))


class CaLookups(object):
    """What the CA said, asked once per run and shared by its threads: CRLs and ACME
    answers by URL, OpenSSL's verdicts by chain. A failure is kept too, so that a
    CRL host that is down costs the run one timeout, not one per source."""

    def __init__(self, settings, reporter):
        self.settings, self.reporter = settings, reporter
        self._lock, self._entries = threading.Lock(), {}

    def once(self, key, compute, deadline, url):
        """compute()'s value (or CertgrabError) for key, computed by the first thread
        to ask; the others wait for it until their own deadline."""
        with self._lock:
            entry = self._entries.setdefault(key, [threading.Lock(), False, None, None])
        if not entry[0].acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise timed_out(url, "waiting for another source's look-up")
        try:
            if not entry[1]:
                try:
                    entry[2] = compute()
                except CertgrabError as exc:
                    entry[3] = exc
                entry[1] = True
        finally:
            entry[0].release()
        if entry[3] is not None:
            raise entry[3]
        return entry[2]

    def https(self, deadline):
        """The run's context for the CA's https:// (ca_context)."""
        return self.once(("https",), lambda: ca_context(self.settings), deadline,
                         self.settings.acme_directory)


def load_crl(url, lookups, deadline):
    """The Crl at url, with its context: from --cache-dir while fresh (until its
    nextUpdate, CRL_KEEP at most), else fetched, and kept while fresh."""
    settings, now = lookups.settings, time.time()
    path = settings.cache_dir and cache_path(settings.cache_dir, "crl", url)
    data = read_cache(path, MAX_CRL, now) if path else None
    try:
        crl = parse_crl(data, url) if data is not None else None
    except CaError:                     # a damaged copy: fetched again, and replaced
        crl = None
    if crl is None:
        started = time.monotonic()
        response = expect_ok(http_get(url, MAX_CRL, deadline, settings.family))
        crl = parse_crl(response.body, url)
        lookups.reporter.info("fetched the CRL %s: %d bytes in %.0f ms" % (
            url, len(response.body), (time.monotonic() - started) * 1000))
        if path and crl.next_update is not None and crl.next_update > now:
            write_cache(path, crl.der, min(crl.next_update, now + CRL_KEEP), lookups.reporter)
    crl.context = crl_context(crl, settings)
    return crl


def crl_url(cert):
    """The first http:// URL of cert's CRL Distribution Points; None if none."""
    return next((url for url in cert.crl_urls if url.lower().startswith("http://")), None)


def crl_revocation(chain, url, source, lookups, deadline):
    """The Revocation of chain[0] by the CRL at url: OpenSSL verifies chain (the rest of
    its chain, without the root) with the trust store and that CRL, which must be
    chain[0]'s issuer's. Only when OpenSSL says "revoked" is the CRL's entry read, for
    the time and reason. A CRL and a verdict are had once per run (lookups)."""
    try:
        crl = lookups.once(("crl", url), lambda: load_crl(url, lookups, deadline), deadline, url)
        failure = lookups.once(("verdict", url) + tuple(cert.der for cert in chain),
                               lambda: revocation_verdict(crl, chain, source), deadline, url)
    except CertgrabError as exc:
        return Revocation("unknown", getattr(exc, "cause", "unreachable"), str(exc), url)
    if failure is None:
        return Revocation("good", url=url, crl=crl)
    status, cause = CRL_VERDICTS.get(failure[0], ("unknown", "rejected"))
    if status == "unknown":
        return Revocation(status, cause, "%s: OpenSSL: %s" % (url, failure[1]), url)
    try:
        entry = crl_entry(crl.der, chain[0].serial)
    except ParseError:
        entry = None                    # OpenSSL read it: the time is then unknown
    return Revocation("revoked", url=url, crl=crl, entry=entry)


def chain_revocation(result, lookups, deadline):
    """The Revocation of the result's leaf, with those of the intermediates of its chain
    that name an http:// CRL: each is checked on its own, as the first certificate of
    the chain from it (crl_revocation), against its own issuer's CRL. An intermediate
    that names none is not checked (the leaf's own CRL is what a CA must publish)."""
    chain, revocations = result.issuing, []
    for position, cert in enumerate(chain):
        url = crl_url(cert)
        if url is not None:
            revocation = crl_revocation(chain[position:], url, result.source, lookups, deadline)
        elif position == 0:
            revocation = Revocation("unknown", "no-http-crl" if cert.crl_urls else "no-crl",
                                    "the leaf names %s" % ("no http:// CRL, only %s" % printable(
                                        ", ".join(cert.crl_urls)[:200]) if cert.crl_urls
                                        else "no CRL"))
        else:
            continue
        revocation.cert, revocation.position = cert, position
        revocations.append(revocation)
    revocations[0].intermediates = revocations[1:]
    return revocations[0]


def ari_cert_id(aki, serial):
    """RFC 9773's certificate ID: base64url(the authority key identifier) "."
    base64url(the serial's DER content octets, a leading zero kept), unpadded."""
    return ".".join(binascii.b2a_base64(part, newline=False).decode("ascii").rstrip("=")
                    .replace("+", "-").replace("/", "_") for part in (aki, serial_octets(serial)))


def parse_rfc3339(text):
    """Epoch seconds of an RFC 3339 date-time ("2025-01-02T04:00:00Z"; fractions of a
    second are dropped, offsets applied); ParseError for anything else."""
    import re
    match = re.match(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                     r"(?:\.[0-9]{1,9})?(?:([Zz])|([-+])([0-9]{2}):([0-9]{2}))\Z", text)
    if match is None:
        raise ParseError("not an RFC 3339 date-time: %r" % text[:40])
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month) \
            or hour > 23 or minute > 59 or second > 60:
        raise ParseError("an impossible date-time: %r" % text[:40])
    offset = 0 if match.group(7) else (int(match.group(9)) * HOUR + int(match.group(10))
                                       * MINUTE) * (1 if match.group(8) == "+" else -1)
    return _days_from_civil(year, month, day) * DAY + hour * HOUR + minute * MINUTE \
        + min(second, 59) - offset


def retry_after(value, now):
    """Seconds to keep an ARI answer: its Retry-After (seconds, or an HTTP date) within
    ARI_RETRY_BOUNDS; ARI_RETRY_DEFAULT without one that certgrab can read."""
    import re
    value = (value or "").strip()
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    date = re.match(r"[A-Z][a-z]{2}, ([0-9]{2}) ([A-Z][a-z]{2}) ([0-9]{4}) ([0-9]{2}):"
                    r"([0-9]{2}):([0-9]{2}) GMT\Z", value)
    if _ascii_digits(value, 10):
        seconds = int(value)
    elif date and date.group(2) in months:
        stamp = "%s-%02d-%sT%s:%s:%sZ" % (date.group(3), months.index(date.group(2)) + 1,
                                          date.group(1), date.group(4), date.group(5),
                                          date.group(6))
        try:
            seconds = parse_rfc3339(stamp) - now
        except ParseError:
            seconds = ARI_RETRY_DEFAULT
    else:
        seconds = ARI_RETRY_DEFAULT
    return int(min(max(seconds, ARI_RETRY_BOUNDS[0]), ARI_RETRY_BOUNDS[1]))


def _json_answer(response):
    try:
        return parse_json(response.body)
    except ParseError as exc:
        raise CaError("%s: %s" % (response.url, exc), "bad-answer")


def renewal_info_url(lookups, deadline):
    """The renewalInfo URL of --acme-directory's directory (kept DIRECTORY_KEEP in
    --cache-dir); CaError when the CA offers no ARI."""
    settings, directory, now = lookups.settings, lookups.settings.acme_directory, time.time()
    path = settings.cache_dir and cache_path(settings.cache_dir, "directory", directory)
    data = read_cache(path, MAX_JSON, now) if path else None
    fetched = data is None
    if fetched:
        data = expect_ok(http_get(directory, MAX_JSON, deadline, settings.family,
                                  lookups.https(deadline))).body
    document = _json_answer(HttpResponse(directory, 200, "", {}, data))
    url = document.get("renewalInfo") if isinstance(document, dict) else None
    if not isinstance(url, str):
        raise CaError("%s: the ACME directory has no renewalInfo: this CA offers no ARI"
                      % directory, "no-ari", hint="check --acme-directory: it is the URL of "
                      "the directory of the CA that issued the leaf")
    split_url(url, "https")
    if path and fetched:
        write_cache(path, data, now + DIRECTORY_KEEP, lookups.reporter)
    return url.rstrip("/")


def renewal_answer(url, lookups, deadline):
    """(start, end, explanation URL) of the ARI answer at url: from --cache-dir until
    its Retry-After has passed, else asked and kept that long."""
    settings, now = lookups.settings, time.time()
    path = settings.cache_dir and cache_path(settings.cache_dir, "ari", url)
    body = read_cache(path, MAX_JSON, now) if path else None
    if body is None:
        response = expect_ok(http_get(url, MAX_JSON, deadline, settings.family,
                                      lookups.https(deadline)))
        body = response.body
        if path:
            keep = retry_after(response.headers.get("retry-after"), now)
            write_cache(path, body, now + keep, lookups.reporter)
    document = _json_answer(HttpResponse(url, 200, "", {}, body))
    window = document.get("suggestedWindow") if isinstance(document, dict) else None
    try:
        start, end = (parse_rfc3339(window[key]) if isinstance(window, dict) and isinstance(
            window.get(key), str) else None for key in ("start", "end"))
    except ParseError as exc:
        raise CaError("%s: %s" % (url, exc), "bad-answer")
    if start is None or end is None:
        raise CaError("%s: no suggestedWindow with a start and an end" % url, "bad-answer")
    explanation = document.get("explanationURL")
    return start, end, explanation[:MAX_URL] if isinstance(explanation, str) else None


def leaf_renewal(result, lookups, deadline, now):
    """The RenewalWindow the ACME server suggests for the result's leaf (ARI). An
    expired leaf is not asked about, and a window whose end is not after its start
    counts as no answer (RFC 9773)."""
    leaf = result.leaf
    if now >= leaf.not_after:
        return RenewalWindow(cause="expired", detail="not asked: the leaf has expired")
    if leaf.aki is None:
        return RenewalWindow(cause="no-aki", detail="the leaf has no authority key "
                             "identifier, by which ARI names a certificate")
    try:
        base = lookups.once(("directory",), lambda: renewal_info_url(lookups, deadline),
                            deadline, lookups.settings.acme_directory)
        url = "%s/%s" % (base, ari_cert_id(leaf.aki, leaf.serial))
        start, end, explanation = lookups.once(("ari", url), lambda: renewal_answer(
            url, lookups, deadline), deadline, url)
    except CertgrabError as exc:
        cause = getattr(exc, "cause", "unreachable")
        if getattr(exc, "status", None) == 404:
            cause = "unknown-certificate"
        return RenewalWindow(cause=cause, detail=str(exc))
    if end <= start:
        return RenewalWindow(cause="bad-window", detail="%s: a window whose end (%s) is not "
                             "after its start (%s), ignored" % (url, format_time(end),
                                                                format_time(start)))
    return RenewalWindow(start, end, explanation)


def ask_ca(result, lookups, settings):
    """One source's look-ups, within --timeout from now: its chain's CRLs (unless --crl
    off), and with --acme-directory its leaf's renewal window. A bug here is that
    source's error (consult_ca contains it)."""
    deadline = time.monotonic() + settings.timeout
    if settings.crl != "off":
        result.revocation = chain_revocation(result, lookups, deadline)
    if settings.acme_directory:
        result.renewal = leaf_renewal(result, lookups, deadline, time.time())


def same_chains(results):
    """The results in groups, in the order given, by the chain their files would get
    (issuing): what the CA says of a chain is the same for every source serving it."""
    groups = {}
    for result in results:
        groups.setdefault(tuple(cert.der for cert in result.issuing), []).append(result)
    return list(groups.values())


def ask_ca_once(group, lookups, settings, reporter):
    """ask_ca for the first source of a group (same_chains); the others share its
    answers, the same objects, which nothing changes afterwards. After a bug in the
    first, each of the others is asked on its own, so that its error names it."""
    first = group[0]
    contain_bug(ask_ca, first, reporter, lookups, settings)
    for result in group[1:]:
        if first.error is None:
            result.revocation, result.renewal = first.revocation, first.renewal
        else:
            contain_bug(ask_ca, result, reporter, lookups, settings)


def consult_ca(results, settings, reporter, sharers=1):
    """Ask the CA about the leaf of each source that gave one: its CRL (unless --crl
    off) and, with --acme-directory, its renewal window; sets result.revocation and
    result.renewal. Asked once per distinct chain (same_chains), each within --timeout
    from when it is asked; a URL is fetched once per run, whichever chain asks first."""
    if settings.crl == "off" and not settings.acme_directory:
        return
    lookups = CaLookups(settings, reporter)
    groups = same_chains([result for result in results
                          if result.error is None and result.issuing])

    def ask(group):
        ask_ca_once(group, lookups, settings, reporter)

    remote, local = [], []
    for group in groups:
        fetches = settings.acme_directory or settings.crl != "off" and any(
            crl_url(cert) for cert in group[0].issuing)
        (remote if fetches else local).append(group)
    for group in local + remote if len(remote) < 2 else local:
        ask(group)                      # nothing to fetch, or one chain: no thread
    if len(remote) > 1:
        width = min(len(remote), settings.parallel or DEFAULT_PARALLEL)
        map_in_threads(ask, remote, max(1, width // sharers), reporter,
                       "asking the CA about %d chain(s)")


# ---------------------------------------------------------------------------
# The gate: what may be installed. Every fetched chain is checked (the key, the
# name, the dates, nothing revoked) before the newest one is chosen; under the
# lock, the chosen leaf must not be older than the installed one, nor held back
# (--min-age), nor the one a --confirm rolled back.
# ---------------------------------------------------------------------------

def read_leaf(path):
    """The first certificate of an existing output, None when there is no such file.

    Raises OSError when the file cannot be read and ParseError when it is not
    whole PEM certificates (garbage, cut short, bad base64, bad DER, empty).
    """
    data = read_file(path, MAX_FILE, output=True)
    if data is None:
        return None
    ders = pem_to_ders(data.decode("ascii", "replace"))
    if not ders:
        raise ParseError("no PEM certificate in it")
    return [parse_certificate(der) for der in ders][0]     # every one must be whole


def installed_leaf(plan):
    """What the outputs hold: (newest leaf or None, [(path, why) of damaged outputs]).

    Every cert, fullchain and combined output counts, so a damaged file cannot
    hide a newer leaf in another. An output that exists but cannot be read as
    certificates is damaged, never "nothing installed".
    """
    newest, damaged = None, []
    for named, path, content in plan:
        if content in ("chain", "privkey"):        # no leaf in these
            continue
        try:
            leaf = read_leaf(path)
        except (OSError, ParseError) as exc:
            damaged.append((named, getattr(exc, "strerror", None) or str(exc)))
            continue
        if leaf is not None and (newest is None or leaf.not_before > newest.not_before):
            newest = leaf
    return newest, damaged


def key_mismatch(source, leaf, keys):
    """The refusal of a leaf for none of the keys: which leaf, the likely cause, the fix."""
    return RefusedError(
        "%s: refused the leaf serial %s issued %s: its key (SPKI sha256 %s) is not %s" % (
            source, leaf.serial_hex, format_time(leaf.not_before), leaf.spki_sha256, " nor ".join(
                "--key-path %s (%s)" % (key.path, "SPKI sha256 %s" % key.spki_sha256
                                        if key.spki else "encrypted or unusual key")
                for key in keys)),
        hint="the renewing machine likely made a new key: renew there with --reuse-key "
             "(certbot, lego), or copy its new key here and add it as another --key-path "
             "(README: key rollover)")


def check_gate(result, keys, now):
    """The install gate: the key (matched while fetching: refetch_for_key), the
    name and the dates; raises RefusedError."""
    leaf, source = result.leaf, result.source
    if keys and result.key is None:
        raise key_mismatch(source, leaf, keys)
    if not leaf.covers(source.verify_name):
        raise RefusedError("%s: the leaf does not cover %s; it covers: %s" % (
            source, source.verify_name, leaf.covered_names))
    if now < leaf.not_before:
        raise RefusedError("%s: the leaf is not valid before %s" % (
            source, format_time(leaf.not_before)), hint="check this machine's clock (date -u)")
    if now >= leaf.not_after:
        raise RefusedError("%s: the leaf expired at %s" % (source, format_time(leaf.not_after)),
                           hint="the server has not renewed, or this machine's clock is "
                                "wrong (date -u)")


def refusal_details(result):
    """-v on a refused chain: its protocol, the leaf, and the chain, a line each."""
    leaf = result.leaf
    return ["%s: refused: %s" % (result.source, " ".join(
                filter(None, (result.tls_version, result.cipher))) or "a local file"),
            "%s: refused: leaf serial %s, issued %s, expires %s" % (
                result.source, leaf.serial_hex, format_time(leaf.not_before),
                format_time(leaf.not_after)),
            "%s: refused: chain, leaf first: %s" % (result.source, "; ".join(
                '"%s"' % cert.name for cert in result.issuing))]


def apply_gate(results, keys, reporter):
    """The gate for every fetched chain; a refusal becomes that source's error
    (with -v, what was refused: see refusal_details), and so does a bug."""
    now = time.time()
    for result in results:
        if result.error is None:
            try:
                contain_bug(check_gate, result, reporter, keys, now)
            except RefusedError as exc:
                result.error = exc
                for line in refusal_details(result):
                    reporter.info(line)


# What the CA knows: a chain with a certificate its CA revoked is refused, and with
# --crl require one whose revocation status is unknown.
RENEW_HINT = "the renewing machine must renew now (certbot renew --force-renewal, or your " \
             "ACME client's equivalent), and the servers serve the new certificate; the " \
             "next run here installs it"


def revocation_words(revocation):
    """ "at 2026-12-07T02:44:35Z, reason keyCompromise (CRL http://...)"."""
    return "at %s, reason %s (CRL %s)" % (
        format_time(revocation.time) if revocation.time is not None else "a time its CRL "
        "does not say", revocation.reason or "unknown", printable(revocation.url))


def unknown_hint(revocation):
    """What to do about a revocation status that is unknown, by its cause."""
    cause = revocation.cause
    if cause in NOTHING_TO_CHECK:
        return "the leaf's CA publishes no CRL for it; --crl on accepts such a leaf"
    if cause in ("unreachable", "http-status", "too-large", "bad-url"):
        return "check this host's route to the CRL (%s): a proxy or firewall? --crl on " \
               "installs anyway, as browsers do" % printable(revocation.url or "")
    if cause in ("stale", "not-yet-valid"):
        return "check this machine's clock (date -u); if it is right, the CA's CRL is out " \
               "of date"
    return "a CRL that fails OpenSSL's checks says nothing about the certificate; --crl on " \
           "installs anyway"


def first_of(revocation, status):
    """The first Revocation of the chain (leaf first) with this status; None if none."""
    return next((each for each in revocation.chain() if each.status == status), None)


def ca_refusal(result, crl, installed):
    """The RefusedError for a result whose chain holds a certificate its CA revoked, the
    leaf or an intermediate (said as installed when the outputs hold the leaf: installed
    is installed_leaf's leaf), or under --crl require one whose status is unknown; None
    when the gate lets it pass."""
    source, leaf = result.source, result.leaf
    revoked = first_of(result.revocation, "revoked")
    if revoked is not None:
        here = installed is not None and installed.der == leaf.der
        if revoked.position:
            what = ': its intermediate "%s" (serial %s) was revoked by its CA' % (
                revoked.cert.name, revoked.cert.serial_hex)
        else:
            what = " was revoked by its CA" if here else ": its CA revoked it"
        return RefusedError("%s: %s leaf serial %s%s %s%s" % (
            source, "the installed" if here else "refused the", leaf.serial_hex, what,
            revocation_words(revoked), "; files untouched" if here else ""), hint=RENEW_HINT)
    unknown = first_of(result.revocation, "unknown")
    if unknown is not None and crl == "require":
        return RefusedError("%s: refused the leaf serial %s: whether its CA revoked %s is "
                            "unknown (--crl require): %s" % (
                                source, leaf.serial_hex, "it" if not unknown.position
                                else unknown.subject(), unknown.detail),
                            hint=unknown_hint(unknown))
    return None


def apply_ca_gate(results, settings, reporter):
    """Refuse (as that source's error) a chain with a certificate its CA revoked, the
    leaf or an intermediate, said with its serial, the time and the reason; with --crl
    require, also one whose status is unknown (ca_refusal). A bug is that source's."""
    revoked = [result for result in results if result.error is None and
               result.revocation is not None and first_of(result.revocation, "revoked")]
    installed = installed_leaf(resolve_outputs(settings.plan, settings.uid))[0] \
        if revoked and settings.plan else None
    for result in results:
        if result.error is None and result.revocation is not None:
            refusal = contain_bug(ca_refusal, result, reporter, settings.crl, installed)
            result.error = refusal or result.error


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
        if isinstance(result.error, InternalError):     # shown even with -q: a bug
            reporter.notice("%s (skipped)" % result.error)
        elif result.error is not None:
            reporter.warn("%s (skipped)" % result.error)
    return max(good, key=lambda r: r.leaf.not_before)


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
                        % (best.source, leaf.describe(), newest.describe()))
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


# --min-age holds a new leaf back for a while: until then the service keeps the
# installed one.
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


def hold_back(best, plan, min_age, reporter):
    """--min-age: True when the new leaf is held back (said, with the time it goes);
    files and hook are then left alone."""
    if min_age is None:
        return False
    installed, damaged = installed_leaf(plan)
    if damaged:                                 # the gate refuses every leaf
        return False
    until, why = held_until(best.leaf, installed, min_age, time.time())
    if why == "first":
        reporter.say("%s: the leaf (%s) is younger than --min-age %s, but nothing is installed "
                     "yet: a first install is not held back" % (
                         best.source, best.leaf.describe(), duration_text(min_age)))
    if until is None:
        return False
    reporter.say("%s serves a new leaf (%s): held back until %s (--min-age %s); the installed "
                 "leaf (%s) stays" % (best.source, best.leaf.describe(), format_time(until),
                                      duration_text(min_age), installed.describe()))
    reporter.outcome("held back sha256:%s from %s until %s" % (best.leaf.sha256, best.source,
                                                               format_time(until)))
    return True


def rolled_back_sha256(plan):
    """The sha256 of the leaf recorded as rolled back; None when there is none (or the
    record is no certificate)."""
    data = read_kept(rolled_back_path(plan), "the files are unchanged")
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
            best.source, best.leaf.describe(), rolled_back_path(plan)), "restored",
        hint="find what broke the service with that leaf (its error log; nginx -t), fix it, "
             "then run once with --force to install the leaf again")


# ---------------------------------------------------------------------------
# Install: output files, written whole or not at all.
# ---------------------------------------------------------------------------

def prepare_outputs(plan, owner):
    """The outputs, resolved again once their directories exist: a directory that another
    user made first in a sticky parent is refused here, before anything is put in it."""
    for directory in sorted(set(os.path.dirname(real)
                                for _, real, _ in resolve_outputs(plan, owner))):
        make_directory(directory)
    return resolve_outputs(plan, owner)


def render_outputs(plan, chain, key):
    """(real path, bytes, holds_key) for each resolved output; key is the --key-path
    the leaf matched, copied only into privkey.pem and the combined file."""
    outputs = []
    for _, path, content in plan:
        certs = {"cert": chain[:1], "chain": chain[1:], "privkey": []}.get(content, chain)
        data = "".join(der_to_pem(cert.der) for cert in certs).encode("ascii")
        data += key.pem if content in KEY_CONTENTS else b""
        outputs.append((path, data, content in KEY_CONTENTS))
    return outputs


def unlock_directories(fds):
    """Closing releases each lock; a lock file opened read-only has nothing to lose."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def open_lock_file(directory):
    """DIR/.certgrab.lock, made with mode 0600 and never through a link or onto a FIFO.
    Only this user can open it, so no other user can lock it (any user who can read a
    directory can flock the directory itself). It stays: removing a lock file others
    may be waiting on would let two runs in at once."""
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, PRIVATE_MODE)
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
        os.close(fd)
        raise RefusedError("refusing the lock file %s: it is %s" % (path, "not a regular file"
                           if not stat.S_ISREG(found.st_mode) else "owned by " +
                           user_name(found.st_uid)), hint="remove it")
    if found.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.fchmod(fd, PRIVATE_MODE)
    return fd


def _command_line(pid):
    """" (the command line)" of process pid, shortened and terminal-safe; "" if unknown."""
    try:
        words = read_file("/proc/%s/cmdline" % pid, CMDLINE_READ).split(b"\0")
    except OSError:
        return ""
    text = printable(b" ".join(words).strip().decode("utf-8", "replace"))
    return " (%s)" % (text[:CMDLINE_SHOWN] + "..." * (len(text) > CMDLINE_SHOWN)) if text else ""


def lock_holder(fd):
    """"; held by process PID (its command line)" for the lock on fd's file, as
    /proc/locks and /proc/PID/cmdline say; "" where the system cannot say."""
    found = os.fstat(fd)
    wanted = "%02x:%02x:%d" % (os.major(found.st_dev), os.minor(found.st_dev), found.st_ino)
    try:
        lines = read_file("/proc/locks", PROC_LOCKS_LIMIT).decode("ascii", "replace").splitlines()
    except OSError:
        return ""
    for fields in (line.split() for line in lines):    # ID: FLOCK ADVISORY WRITE PID DEV:INODE
        if len(fields) > 5 and fields[1] != "->" and fields[5] == wanted \
                and fields[4].isdigit():
            return "; held by process %s%s" % (fields[4], _command_line(fields[4]))
    return ""


def lock_directories(directories, wait):
    """An exclusive flock on the lock file of each output directory (open_lock_file),
    waiting at most wait seconds in all."""
    import fcntl
    fds, deadline = [], time.monotonic() + wait
    try:
        for directory in directories:
            fds.append(open_lock_file(directory))
            while True:
                try:
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WriteError("another certgrab run holds %s for too long%s" % (
                            os.path.join(directory, LOCK_FILE), lock_holder(fds[-1])))
                    time.sleep(LOCK_POLL)
    except OSError as exc:
        unlock_directories(fds)
        raise WriteError("cannot lock %s: %s" % (directory, exc.strerror or exc))
    except CertgrabError:
        unlock_directories(fds)
        raise
    return fds


def temp_prefixes(plan):
    """{directory: (".NAME" + TEMP_MARK, ...)} for the outputs in each directory."""
    prefixes = {}
    for _, path, _ in plan:
        directory = os.path.dirname(path)
        prefixes[directory] = prefixes.get(directory, ()) + (
            "." + os.path.basename(path) + TEMP_MARK,)
    return prefixes


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


def changed_outputs(outputs):
    """The outputs whose file does not hold exactly their bytes yet."""
    return [output for output in outputs if read_existing(output[0]) != output[1]]


def stage_file(path, data, holds_key, settings, mark_pending):
    """A fsynced temporary copy of data beside path, with the mode and owner it needs."""
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    if old is not None:
        mode = stat.S_IMODE(old.st_mode)
    else:
        mode = PRIVATE_MODE if holds_key else NEW_FILE_MODE if settings.mode is None \
            else settings.mode
    mode &= KEY_MODE_MOST if holds_key else CERT_MODE_MOST
    owner = (old.st_uid, old.st_gid) if old else (settings.uid, settings.gid)
    pending = mark_pending or old is not None and int(old.st_mtime) == HOOK_PENDING_MTIME
    return write_temp_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path),
                           data, mode, owner if os.geteuid() == 0 or not old else None,
                           HOOK_PENDING_MTIME if pending else None)


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


def install_files(outputs, settings, mark_pending, reporter):
    """Write each output that differs from the disk; return the paths written.

    Every new version is staged as a temporary file beside its output and
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
        left = [temp for temp, output in staged if output not in renamed]
        kept = [temp for temp in left if not discard_temp(temp)]
        raise WriteError(*write_failure(path, exc, renamed, kept, mark_pending))
    for directory in set(os.path.dirname(os.path.abspath(p)) for p, _, _ in changed):
        sync_directory(directory, reporter)
    return renamed


def pending_files(plan):
    """Outputs whose deploy hook has not yet succeeded (see install_files)."""
    pending = []
    for _, path, _ in plan:
        try:
            found = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(found.st_mode) and int(found.st_mtime) == HOOK_PENDING_MTIME:
            pending.append(path)
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


def hook_name(name):
    """True for a name RENEWED_DOMAINS may carry: a DNS name of labels of 1 to 63 letters,
    digits, "-" and "_", none starting or ending with "-", 253 characters at most, and
    "*." before it for a wildcard. Nothing a hook could take for an option ("-rf") or a
    pattern ("*")."""
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    return len(name) <= MAX_DNS_NAME and all(label and len(label) <= MAX_DNS_LABEL
                                             and set(label) <= LABEL_CHARS
                                    and "-" not in (label[0], label[-1]) for label in labels)


def run_deploy_hook(settings, plan, best, leaf=None):
    """--deploy-hook through /bin/sh in /, context only in the environment (certbot's
    names): no file certgrab's working directory holds can change what the hook runs.
    leaf: the leaf the files hold, when it is not best's (after a roll back)."""
    import signal
    import subprocess
    leaf = leaf or best.leaf
    lineage = settings.out_dir or os.path.dirname(os.path.abspath(plan[0][0]))
    env = dict(os.environ)
    names = [name for name in leaf.dns_names if hook_name(name)] or leaf.ip_addresses
    env.update(RENEWED_LINEAGE=os.path.realpath(lineage), CERTGRAB_SOURCE=best.source.text,
               RENEWED_DOMAINS=" ".join(names),     # an IP-address certificate: its IPs
               CERTGRAB_FILES=" ".join(os.path.abspath(path) for path, _ in plan),
               CERTGRAB_SHA256=leaf.sha256)
    try:
        hook = subprocess.Popen(["/bin/sh", "-c", settings.deploy_hook], env=env, cwd="/",
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise HookError("cannot run --deploy-hook: %s" % (exc.strerror or exc))
    try:
        status = hook.wait(timeout=settings.hook_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(hook.pid, signal.SIGKILL)
        hook.wait()
        raise HookError("--deploy-hook was killed after --hook-timeout %g s; the next run "
                        "retries it" % settings.hook_timeout)
    if status != 0:
        raise HookError("--deploy-hook failed (%s); the next run retries it" % (
            "exit status %d" % status if status > 0 else "signal %d" % -status))


# Rollouts: --confirm checks after the hook that the service serves the new leaf, and
# puts the previous files back (and refuses that leaf from then on: rolled_back_refusal)
# when the hook left the service completing no TLS handshake at all. The files
# --confirm keeps beside the outputs are written as the outputs are (a temp file,
# fsync, rename) in directories resolve_output checked, and read as they are
# (read_kept), only when this user wrote them.

def keep_previous(outputs, reporter):
    """--confirm, before the install: keep each existing output that is about to change
    (previous_path), until the service is confirmed to serve the new files. One kept
    already (an install not yet confirmed) stays: it is what the service last served."""
    unchanged = "the previous files are unchanged"
    for path, _, _ in changed_outputs(outputs):
        current, kept = read_existing(path), previous_path(path)
        if current is not None and read_kept(kept, unchanged) is None:
            write_kept(kept, os.path.basename(path), current, unchanged, reporter)


def discard_previous(plan):
    """The kept versions are no longer needed: the hook ran (and --confirm confirmed)."""
    for _, path, _ in plan:
        discard_temp(previous_path(path))       # emptied if it cannot go: it may hold a key


def kept_versions(plan):
    """[(path, content, bytes)] of the outputs whose previous version is kept (an emptied
    one, left by a removal that failed, is never put back)."""
    hint = "the new files stay, their hook pending"
    kept = [(path, content, read_kept(previous_path(path), hint)) for _, path, content in plan]
    return [(path, content, data) for path, content, data in kept if data]


def restore_previous(kept, settings, reporter):
    """Put back each kept version (kept_versions), hook-pending, with the mode and owner
    of the file it replaces (stage_file), by a rename; the paths restored."""
    restored = []
    for path, content, data in kept:
        temp = None
        try:
            temp = stage_file(path, data, content in KEY_CONTENTS, settings, True)
            os.replace(temp, path)
        except OSError as exc:
            if temp is not None:
                discard_temp(temp)
            raise WriteError("cannot restore %s from %s: %s%s" % (
                path, previous_path(path), exc.strerror or exc, "; restored already: %s" %
                " ".join(restored) if restored else ""),
                hint="%s still holds the version to restore; the next run runs the deploy "
                     "hook again" % previous_path(path))
        discard_temp(previous_path(path))
        restored.append(path)
    for directory in set(os.path.dirname(path) for path in restored):
        sync_directory(directory, reporter)
    return restored


def refuse_rolled_back(best, plan, settings, reporter):
    """Raise rolled_back_refusal's error, once a hook still pending for the installed
    (restored) files has run: files and service stay as they are."""
    refusal = rolled_back_refusal(best, plan, settings.force, reporter)
    if refusal is None:
        return
    pending = pending_files(plan)
    if pending and settings.deploy_hook:
        reporter.notice("retrying the deploy hook, which did not complete for %s" %
                        " ".join(pending))
        run_deploy_hook(settings, settings.plan, best, installed_leaf(plan)[0])
        clear_pending(pending)
    raise refusal


def confirm_sources(confirm, best):
    """A Source per --confirm HOST[:PORT], with the SNI and name of best's source."""
    return [Source(text, host, port, best.source.servername) for text, host, port in confirm]


def fetch_service(source, reader, settings, leaf, reporter):
    """One try of a --confirm service, fetched as any source is (_fetch_guarded: a bug
    is its error): its FetchResult, whose served list is empty when no TLS handshake
    completed. A dual-certificate service that sent the other key type's leaf is asked
    again for leaf's (as refetch_for_key does)."""
    result = _fetch_guarded(source, reader, settings, reporter)
    algorithm = leaf.key_type.split()[0]
    if result.served and result.served[0].der != leaf.der and \
            result.served[0].key_type.split()[0] != algorithm and algorithm in reader.by_algorithm:
        retry = _fetch_guarded(source, reader.by_algorithm[algorithm], settings, reporter)
        if retry.served:
            return retry
    return result


def serves(result, leaf):
    return result is not None and bool(result.served) and result.served[0].der == leaf.der


def broke(then, now):
    """True when a service that completed a TLS handshake before the install completes
    none after the hook; never on a bug of certgrab's own (an internal error)."""
    return bool(then.served) and not now.served and not isinstance(now.error, InternalError)


def await_leaf(sources, leaf, reader, settings, reporter):
    """Try each source every CONFIRM_INTERVAL until all serve leaf or --confirm-timeout
    has passed (each try within --timeout): the last FetchResult of each."""
    deadline = time.monotonic() + settings.confirm_timeout
    last = [None] * len(sources)
    while True:
        for index, source in enumerate(sources):
            if not serves(last[index], leaf):
                last[index] = fetch_service(source, reader, settings, leaf, reporter)
        left = deadline - time.monotonic()
        if left <= 0 or all(serves(result, leaf) for result in last):
            return last
        time.sleep(min(CONFIRM_INTERVAL, left))


def before_install(outputs, plan, best, reader, settings, reporter):
    """--confirm, when the hook is going to run: each service as it is now (a
    FetchResult), and the outputs about to change kept (keep_previous). [] otherwise."""
    if not settings.confirm or not (changed_outputs(outputs) or pending_files(plan)):
        return []
    services = [fetch_service(source, reader, settings, best.leaf, reporter)
                for source in confirm_sources(settings.confirm, best)]
    keep_previous(outputs, reporter)
    return services


def confirmation(before, after, leaf):
    """ "confirmed" when every service serves leaf; "restored" when one that completed
    a TLS handshake before the install completes none now (broke); else
    "not_confirmed"."""
    if all(serves(result, leaf) for result in after):
        return "confirmed"
    if any(broke(then, now) for then, now in zip(before, after)):
        return "restored"
    return "not_confirmed"


def service_state(result):
    """What a --confirm service served, for messages."""
    if isinstance(result.error, InternalError):
        return "could not be tried (%s)" % result.error
    if not result.served:
        return "completes no TLS handshake (%s)" % result.error
    return "serves the leaf %s" % result.served[0].describe()


def not_confirmed_error(before, after, leaf, confirm_timeout):
    unconfirmed = [(then, now) for then, now in zip(before, after) if not serves(now, leaf)]
    return ConfirmError(
        "the deploy hook ran, but after %g s (--confirm-timeout) %s, not the leaf just "
        "installed (%s); the hook stays pending: the next run runs it again" % (
            confirm_timeout, "; ".join(
                "%s %s%s" % (now.source, service_state(now), "" if now.served or then.served
                             else ", as before the install") for then, now in unconfirmed),
            leaf.describe()), "not_confirmed",
        hint="does the deploy hook reload the service that --confirm dials (e.g. "
             "systemctl reload nginx)?")


def broken_services(before, after, confirm_timeout):
    """"; "-joined: each service the hook broke, and what it served before."""
    return "; ".join(
        "%s completes no TLS handshake %g s after the deploy hook (before the install it "
        "served the leaf %s)" % (now.source, confirm_timeout,
                                 then.served[0].describe())
        for then, now in zip(before, after) if broke(then, now))


def nothing_to_restore(best, before, after, confirm_timeout):
    """The ConfirmError of a broken service when no output had a previous version (a
    first install): the new files stay, since no other files could take their place,
    and their hook stays pending, so that the next run tries the service again."""
    return ConfirmError(
        "%s: nothing was installed before, so there are no previous files to put back: the "
        "new files stay installed with the leaf %s, and their deploy hook stays pending "
        "(the next run runs it again)" % (broken_services(before, after, confirm_timeout),
                                          best.leaf.describe()), "not_confirmed",
        hint="the service's error log says why it fails with these files (nginx -t); "
             "once it is fixed, the next run runs the hook and confirms")


def roll_back(best, plan, pending, before, after, reader, settings, reporter):
    """A service stopped completing TLS handshakes after the hook: record the leaf
    (rolled_back_refusal), put the previous files back, run the hook again and see
    what the services serve. Returns the ConfirmError that says all of it."""
    kept = kept_versions(plan)
    if not kept:
        return nothing_to_restore(best, before, after, settings.confirm_timeout)
    record = rolled_back_path(plan)
    write_kept(record, os.path.basename(plan[0][1]), der_to_pem(best.leaf.der).encode("ascii"),
               "nothing was rolled back yet: the new files stay, their hook pending", reporter)
    message = "%s: restored the previous %s" % (
        broken_services(before, after, settings.confirm_timeout),
        " ".join(restore_previous(kept, settings, reporter)))
    refused = "the leaf %s is not installed again until a newer leaf appears" % \
        best.leaf.describe()
    previous = installed_leaf(plan)[0]
    try:
        run_deploy_hook(settings, settings.plan, best, previous)
    except HookError as exc:
        return ConfirmError("%s; the deploy hook, run again, failed: %s" % (message, exc),
                            "restored", hint="the previous files are back, their hook pending; "
                            "%s (%s records it)" % (refused, record))
    clear_pending(pending)
    now = await_leaf([result.source for result in after], previous, reader, settings, reporter)
    return ConfirmError(
        "%s; ran the deploy hook again; now %s; %s" % (message, "; ".join(
            "%s %s" % (result.source, service_state(result)) for result in now), refused),
        "restored", hint="the service's error log says why it failed with the new files "
                         "(nginx -t); %s records the leaf" % record)


def confirm_install(best, plan, pending, before, reader, settings, reporter):
    """--confirm after the hook ran: True once every service serves the new leaf
    (said); ConfirmError otherwise, after roll_back when the hook broke a service."""
    started = time.monotonic()
    after = await_leaf([result.source for result in before], best.leaf, reader, settings,
                       reporter)
    outcome = confirmation(before, after, best.leaf)
    if outcome == "not_confirmed":
        raise not_confirmed_error(before, after, best.leaf, settings.confirm_timeout)
    if outcome == "restored":
        raise roll_back(best, plan, pending, before, after, reader, settings, reporter)
    discard_temp(rolled_back_path(plan))        # a newer (or --force) leaf took
    reporter.say("confirmed: %s serve%s the leaf just installed (serial %s) after %.1f s" % (
        ", ".join(str(result.source) for result in after), "" if len(after) > 1 else "s",
        best.leaf.serial_hex, time.monotonic() - started))
    return True


def confirm_time(settings):
    """Seconds a run may hold the locks beyond its hook for --confirm: the services
    tried before the install, after it, and after a roll back, plus the hook again."""
    if not settings.confirm:
        return 0.0
    return 2 * settings.confirm_timeout + settings.hook_timeout + \
        3 * len(settings.confirm) * settings.timeout


def run_hook(best, plan, changed, pending, services, reader, settings, reporter):
    """The deploy hook for the files it is pending for (changed now, or at an earlier
    run whose hook did not complete), then --confirm (confirm_install). True when
    confirmed."""
    if pending and settings.deploy_hook:
        retried = [path for path in pending if path not in changed]
        if retried:
            reporter.notice("retrying the deploy hook, which did not complete after an "
                            "earlier run installed %s" % " ".join(retried))
        run_deploy_hook(settings, settings.plan, best)
        confirmed = bool(settings.confirm) and confirm_install(
            best, plan, pending, services, reader, settings, reporter)
        clear_pending(pending)
        discard_previous(plan)
        return confirmed
    if pending:
        reporter.warn("a deploy hook is still pending for %s (dated %s); a run with "
                      "--deploy-hook retries it" % (" ".join(pending),
                                                    format_time(HOOK_PENDING_MTIME)))
    return False


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
        best.leaf.sha256, best.source) if changed else "unchanged"))
    reporter.say("dry run: %s%s%s" % ("would write " + " ".join(changed) if changed else
                                      "files are up to date", "; would run the deploy hook"
                                      if hook else "", " and confirm on " + ", ".join(
                                          text for text, _, _ in settings.confirm)
                                      if hook and settings.confirm else ""))


def install_chain(chain, best, settings, reporter, reader):
    """Under the locks: no downgrade, write what changed, run the hook (and with
    --confirm, check that the service took the new leaf: run_hook). Returns
    "installed" (files written or a pending hook ran), "confirmed" (that, and
    --confirm's services serve the leaf), "unchanged", or "held_back" (--min-age);
    None for a dry run. An output that is a link (certbot's live/ into archive/)
    stays one: its target is replaced, as resolve_output allows; the files are
    found again now, when their directories exist (prepare_outputs)."""
    plan = resolve_outputs(settings.plan, settings.uid)
    if hold_back(best, plan, settings.min_age, reporter):
        return None if settings.dry_run else "held_back"
    if settings.dry_run:
        return dry_run(plan, render_outputs(plan, chain, best.key), best, settings, reporter,
                       installed_leaf(plan))
    plan = prepare_outputs(settings.plan, settings.uid)
    outputs = render_outputs(plan, chain, best.key)
    directories = sorted(set(os.path.dirname(path) for _, path, _ in plan))
    locks = lock_directories(directories, settings.hook_timeout + settings.timeout + LOCK_SLACK
                             + confirm_time(settings))
    try:
        remove_stale_temps(plan)
        check_not_older(best, installed_leaf(plan), settings.force, reporter)
        refuse_rolled_back(best, plan, settings, reporter)
        services = before_install(outputs, plan, best, reader, settings, reporter)
        mark = bool(settings.deploy_hook)
        changed = install_files(outputs, settings, mark, reporter)
        if changed and not settings.keys:
            reporter.warn("no --key-path: the leaf was not checked against the private key")
        if changed:
            reporter.say("installed the chain from %s (%s; %s): %s" % (
                best.source, best.leaf.describe(), when_expires(best.leaf, time.time()),
                " ".join(changed)))
        pending = sorted(set(pending_files(plan)) | set(changed if mark else ()))
        confirmed = run_hook(best, plan, changed, pending, services, reader, settings,
                             reporter)
        if not changed and not pending:
            reporter.info("files are up to date; nothing written, no hook run")
        return "confirmed" if confirmed else "installed" if changed or pending and \
            settings.deploy_hook else "unchanged"
    finally:
        unlock_directories(locks)


# ---------------------------------------------------------------------------
# Reports: stderr lines for people, stdout for the chain.
# ---------------------------------------------------------------------------

def warn_about_ca(best, installing, reporter):
    """The chosen chain's CRLs that could not be had or trusted (--crl on: soft-fail), and
    a renewal window whose end has passed, as warnings."""
    revocation, renewal = best.revocation, best.renewal
    for each in revocation.chain() if revocation is not None else ():
        if each.status == "unknown" and each.cause not in NOTHING_TO_CHECK:
            reporter.warn("%s: cannot tell whether the CA revoked %s: %s; %s anyway (--crl "
                          "on: soft-fail; --crl require refuses)" % (
                              best.source, each.subject(), each.detail,
                              "installing" if installing else "printing it"))
    if renewal is not None and renewal.start is not None and renewal.end <= time.time():
        reporter.warn("%s: the CA asked for the leaf to be replaced by %s (ARI): the renewing "
                      "machine has not renewed" % (best.source, format_time(renewal.end)))


def report_fetch(results, best, reader, settings, reporter):
    """Chain problems of the winner; with -v, how each source went."""
    files_get = " (files get the path %s: leaf, intermediates, no root)" % (
        "built from names, NOT verified" if settings.insecure else "OpenSSL verified")
    for problem in best.problems:
        reporter.warn("%s: %s%s" % (best.source, problem.text,
                                    files_get if settings.plan else ""))
    for result in results if reporter.verbose else ():
        if result.error is None:
            reporter.info("%s (%s): %s %s, %d certificate(s) read with %s, %s, %.0f ms" % (
                result.source, result.address, result.tls_version, result.cipher,
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
            % (best.source, format_time(best.leaf.not_before)))


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


def write_pieces(pieces):
    """Write each text of pieces (any iterable) to stdout as it comes: a report of
    10,240 sources is written source by source, never joined into one more copy of
    megabytes first. Characters stdout's encoding lacks (cron's ASCII) become escapes."""
    try:
        if hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            for text in pieces:
                sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "ascii",
                                                    "backslashreplace"))
            sys.stdout.buffer.flush()
        else:
            for text in pieces:
                sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        raise WriteError("cannot write to standard output: %s" % (exc.strerror or exc))


def write_stdout(text):
    write_pieces((text,))


def verdict(result, insecure):
    if result.source.file:
        return "not verified (a local file)"
    if insecure:
        return "NOT verified (--insecure)"
    return "FAILED: " + result.verify_error if result.verify_error else "OK"


def revocation_text(revocation):
    if revocation.status == "good":
        return "good: not on its CRL %s (of %s%s)" % (
            printable(revocation.url), format_time(revocation.this_update),
            ", next update %s" % format_time(revocation.next_update)
            if revocation.next_update is not None else "")
    if revocation.status == "revoked":
        return "REVOKED %s" % revocation_words(revocation)
    return "unknown: %s" % printable(revocation.detail or revocation.cause)


def renewal_text(renewal, now):
    if renewal.start is None:
        return ("unknown: %s" if renewal.cause != "expired" else "%s") % printable(
            renewal.detail or renewal.cause)
    return "the CA suggests renewing between %s and %s%s%s" % (
        format_time(renewal.start), format_time(renewal.end),
        " (ENDED %s ago)" % format_span(now - renewal.end) if renewal.end <= now else "",
        "; see %s" % printable(renewal.explanation_url) if renewal.explanation_url else "")


def ca_text_lines(result, now):
    """--text: a line for the revocation status (and one for each intermediate checked)
    and one for the renewal window."""
    lines = []
    for each in result.revocation.chain() if result.revocation is not None else ():
        lines.append("  revocation:   %s%s" % (
            'intermediate "%s": ' % each.cert.name if each.position else "",
            revocation_text(each)))
    if result.renewal is not None:
        lines.append("  renewal:      %s" % renewal_text(result.renewal, now))
    return lines


def spki_pin(cert):
    """The HPKP-style pin: base64 of the SHA-256 of the SubjectPublicKeyInfo."""
    return binascii.b2a_base64(binascii.unhexlify(cert.spki_sha256)).decode("ascii").strip()


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


def text_lines(result, settings, now):
    """One source for people: 80 columns, certificate text escaped."""
    source = result.source
    lines = ["%s%s" % (source, " (%s)" % result.address if result.address else "")]
    if not source.file:
        lines.append("  servername:   %s" % (source.servername or "(none: IP address)"))
    if result.error is not None and not result.served:
        return "\n".join(lines + ["  error:        %s" % result.error]) + "\n"
    if result.tls_version:
        lines.append("  protocol:     %s %s%s" % (result.tls_version, result.cipher,
                                                 " after STARTTLS " + settings.starttls
                                                 if settings.starttls else ""))
    lines.append("  verification: %s" % verdict(result, settings.insecure))
    lines += ca_text_lines(result, now)                 # issue 21
    lines += ["  warning:      %s" % problem.text for problem in result.problems]
    for index, cert in enumerate(result.served):
        lines += certificate_lines(index, cert, now)
    return "\n".join(lines) + "\n"


def failed_text(result, settings, now):
    """--text for a source whose rendering met a bug (render_source): its error."""
    return "%s\n  error:        %s\n" % (result.source, result.error)


def _format_times(*values):
    return [format_time(value) if value is not None else None for value in values]


def revocation_json(revocation):
    """One Revocation's fields for --json."""
    times = _format_times
    return list(zip(
        ("status", "cause", "detail", "time", "reason", "url", "crl_this_update",
         "crl_next_update"),
        [revocation.status, revocation.cause, revocation.detail] + times(revocation.time)
        + [revocation.reason, revocation.url] + times(revocation.this_update,
                                                      revocation.next_update)))


def ca_json(result):
    """--json: "revocation" (the leaf's, with "intermediates": those checked, each with
    its position in the chain, subject, serial and sha256) and "renewal_window" of a
    source (null when not asked)."""
    revocation, renewal = result.revocation, result.renewal
    times = _format_times
    return [
        ("revocation", None if revocation is None else revocation_json(revocation) + [
            ("intermediates", [[("position", each.position), ("subject", each.cert.subject),
                                ("serial", each.cert.serial_hex), ("sha256", each.cert.sha256)]
                               + revocation_json(each) for each in revocation.intermediates])]),
        ("renewal_window", None if renewal is None else list(zip(
            ("start", "end", "explanation_url", "cause", "detail"),
            times(renewal.start, renewal.end) + [renewal.explanation_url, renewal.cause,
                                                 renewal.detail])))]


def certificate_json(cert, now):
    return [("subject", cert.subject), ("issuer", cert.issuer), ("serial", cert.serial_hex),
            ("sans", cert.sans), ("key", cert.key_type), ("key_bits", cert.key_bits),
            ("signature_algorithm", cert.signature_algorithm),
            ("not_before", format_time(cert.not_before)),
            ("not_after", format_time(cert.not_after)), ("sha256", cert.sha256),
            ("spki_sha256", cert.spki_sha256), ("spki_pin", spki_pin(cert)),
            ("is_ca", cert.is_ca), ("lifetime_seconds", cert.lifetime),
            ("seconds_left", int(cert.not_after - now))]


def source_json(result, insecure, now):
    source = result.source
    return [
        ("source", source.text), ("address", result.address),
        ("servername", source.servername), ("error", None if result.error is None
                                              else str(result.error)),
        ("tls_version", result.tls_version), ("cipher", result.cipher),
        ("verified", None if source.file or insecure or not result.served else
         result.error is None and result.verify_error is None),
        ("verify_error", result.verify_error),
        ("problems", [problem.text for problem in result.problems]),
    ] + ca_json(result) + [                             # issue 21
        ("chain", [certificate_json(cert, now) for cert in result.served]),
    ]


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


def source_json_text(result, settings, now):
    """One source as an element of --json's list (json_text's indent for it)."""
    return json_text(source_json(result, settings.insecure, now), "  ")


def failed_json_text(result, settings, now):
    """--json for a source whose rendering met a bug (render_source): its error, the
    other keys empty."""
    source = result.source
    return json_text([("source", source.text), ("address", result.address),
                      ("servername", source.servername), ("error", str(result.error)),
                      ("tls_version", None), ("cipher", None), ("verified", None),
                      ("verify_error", None), ("problems", []), ("revocation", None),
                      ("renewal_window", None), ("chain", [])], "  ")


def threshold_seconds(threshold, cert):
    """--warn/--crit for this certificate: (amount, is_share) -> seconds left."""
    amount, is_share = threshold
    return amount * cert.lifetime if is_share else amount


def expiry_status(cert, thresholds, now):
    """0 OK, 1 WARNING, 2 CRITICAL: seconds left against cert's own thresholds, --warn's
    and --crit's."""
    warn, crit = thresholds
    left = cert.not_after - now
    return 2 if left < threshold_seconds(crit, cert) else \
        1 if left < threshold_seconds(warn, cert) else 0


def most_urgent(certs, thresholds, now):
    """The certificate of the worst status; of those, the one that expires first."""
    return max(certs, key=lambda cert: (expiry_status(cert, thresholds, now), -cert.not_after))


def issuing_sent(result):
    """The issuing chain as far as the server sent it (without intermediates found
    in the trust store)."""
    if not result.missing:
        return result.issuing
    served = set(cert.der for cert in result.served)
    return [cert for cert in result.issuing if cert.der in served]


def leaf_summary(leaf):
    return "sha256 %s... issued %s" % (leaf.sha256[:16], format_time(leaf.not_before))


def cert_summary(cert, index):
    """The leaf or intermediate N of a chain, by subject, sha256 and notBefore."""
    if cert is None:
        return "no intermediate %d" % index
    what = "the leaf" if index == 0 else 'intermediate %d "%s"' % (index, cert.name)
    return "%s (%s)" % (what, leaf_summary(cert))


def first_difference(chain, other):
    """(what chain has, what other has) at the first position where they differ,
    described for people; None when both hold the same certificates in order."""
    for index in range(max(len(chain), len(other))):
        mine = chain[index] if index < len(chain) else None
        theirs = other[index] if index < len(other) else None
        if mine is None or theirs is None or mine.der != theirs.der:
            return cert_summary(mine, index), cert_summary(theirs, index)
    return None


def expect_difference(result, expected, expect_file):
    """--expect-file: how the served chain differs from expected, the file's ("" if it
    does not). A file with one certificate (cert.pem) is compared with the leaf only."""
    served = issuing_sent(result)
    difference = first_difference(served[:1] if len(expected) == 1 else served, expected)
    if not difference:
        return ""
    return "%s: serves %s; %s has %s (a service not reloaded?)" % (
        result.source, difference[0], expect_file, difference[1])


def check_source(result, settings, now):
    """(status, text) for one source: UNKNOWN for a bug (it was not checked)."""
    source = result.source
    if isinstance(result.error, InternalError):
        return NAGIOS_UNKNOWN, str(result.error)
    if result.verify_error or result.error is not None and not result.served:
        return 2, "%s" % result.error       # unreachable, malformed, or not verified
    leaf = result.issuing[0]
    difference = settings.expected is not None and expect_difference(
        result, settings.expected, settings.expect_file)
    if difference:
        return 2, difference
    thresholds = settings.warn, settings.crit
    soonest = most_urgent(result.issuing, thresholds, now)
    what = "the leaf" if soonest is leaf else "intermediate %s" % soonest.name
    text = "%s: %s %s (%s), chain of %d %s, the leaf %s" % (
        source, what, when_expires(soonest, now), format_time(soonest.not_after),
        len(result.issuing), "verified" if not (source.file or settings.insecure)
        else "not verified", when_issued(leaf, now))
    return expiry_status(soonest, thresholds, now), text


def worse(*lines):
    """The (status, text) line of the worst status: CRITICAL, then UNKNOWN (a source
    that could not be checked), WARNING, OK; the first of them on a tie."""
    return max(lines, key=lambda line: NAGIOS_RANK[line[0]])


def ca_check_line(line, result, crl, now):
    """--check: a source's (status, text) with what the CA knows: CRITICAL for a revoked
    leaf and for a renewal window whose end has passed while the leaf is still served;
    WARNING for an unknown revocation under --crl require and for an ARI server that
    could not be asked; otherwise the window's dates are added to the text."""
    revocation, renewal, source = result.revocation, result.renewal, result.source
    findings = [line]
    revoked = revocation and first_of(revocation, "revoked")
    unknown = revocation and first_of(revocation, "unknown")
    if revoked:
        findings.append((2, "%s: %s%s was REVOKED by its CA %s: the renewing machine must "
                         "renew" % (source, revoked.subject(), " of the leaf serial %s" %
                                    result.leaf.serial_hex if revoked.position else "",
                                    revocation_words(revoked))))
    elif unknown and crl == "require":
        findings.append((1, "%s: revocation unknown (--crl require) for %s: %s" % (
            source, unknown.subject(), printable(unknown.detail))))
    if renewal is not None and renewal.start is None and renewal.cause != "expired":
        findings.append((1, "%s: cannot ask the CA for the renewal window (ARI): %s" % (
            source, printable(renewal.detail))))
    elif renewal is not None and renewal.start is not None and renewal.end <= now:
        findings.append((2, "%s: the CA's renewal window ended %s ago (%s) and the leaf is "
                         "still served: the renewing machine did not renew%s" % (
                             source, format_span(now - renewal.end), format_time(renewal.end),
                             "; the CA says why at %s" % printable(renewal.explanation_url)
                             if renewal.explanation_url else "")))
    worst = worse(*findings)
    if worst is line and renewal is not None and renewal.start is not None:
        return line[0], "%s; renewal window %s to %s" % (line[1], format_time(renewal.start),
                                                         format_time(renewal.end))
    return worst


def chain_status(result):
    """--check: WARNING for a served chain that lacks intermediates, is out of
    order, or holds certificates off the verified chain (CHECK_WARNS; turned off
    by --no-chain-warning): clients may fail. The first such problem is named."""
    if not result.issuing or result.error is not None:
        return 0, ""
    for problem in result.problems:
        if problem.code in CHECK_WARNS:
            return 1, "%s: %s" % (result.source, problem.text)
    return 0, ""


def check_perfdata(label, result, thresholds, now):
    """'expires_in LABEL'=SECONDSs;WARN:;CRIT: for the certificate the status line
    names (Nagios ranges: "W:" alerts below W), and 'age LABEL' of the leaf."""
    cert = most_urgent(result.issuing, thresholds, now)
    return "'expires_in %s'=%ds;%d:;%d: 'age %s'=%ds" % (
        label, cert.not_after - now, threshold_seconds(thresholds[0], cert),
        threshold_seconds(thresholds[1], cert), label, now - result.issuing[0].not_before)


def check_part(result, settings, now, label):
    """One source's (status, text) line, and its perfdata ("" without a chain)."""
    line = check_source(result, settings, now)
    if settings.chain_warning:
        line = worse(line, chain_status(result))
    line = ca_check_line(line, result, settings.crl, now)   # issue 21: CRL and ARI
    thresholds = settings.warn, settings.crit
    return line, check_perfdata(label, result, thresholds, now) if result.issuing else ""


def failed_check_part(result, settings, now, label):
    """check_part of a source whose check met a bug (render_source): UNKNOWN, no perfdata."""
    return (NAGIOS_UNKNOWN, str(result.error)), ""


def status_text(text):
    """Text for a line of --check output. Nagios reads "|" as the start of perfdata, in
    the status line and in the lines after it (long output), so "|" is escaped as
    printable() escapes control characters (\\x7c), and so is anything unprintable that
    reached the text some other way. Backslashes stay: text from certificates and
    servers went through printable() already, which escaped theirs."""
    if text.isprintable() and "|" not in text:
        return text                     # the usual line: nothing to escape, no copy
    return "".join("\\x7c" if c == "|" else c if c.isprintable() else printable(c)
                   for c in text)


def perfdata_labels(results):
    """Each source's perfdata label: the SOURCE without ' and =; one given twice gets
    "#n" (its position). Linear in the number of sources."""
    labels = [r.source.text.replace("'", "").replace("=", "") for r in results]
    seen, repeated = set(), set()
    for label in labels:
        (repeated if label in seen else seen).add(label)
    return ["%s #%d" % (label, index + 1) if label in repeated else label
            for index, label in enumerate(labels)]


def chain_age(result):
    """--same's order: the leaf's notBefore, then its intermediates' (the leaf's issuer
    first)."""
    chain = issuing_sent(result)
    return chain[0].not_before, [cert.not_before for cert in chain[1:]]


def same_chain_statuses(results):
    """--same: CRITICAL for each source whose served chain (leaf and intermediates)
    is not the newest valid one among the sources (chain_age; the first given on a
    tie). Linear in the number of sources: the newest is found once."""
    good = [r for r in results if r.error is None and r.issuing]
    if not good:
        return [(0, "")] * len(results)
    newest = max(good, key=chain_age)
    want = issuing_sent(newest)
    statuses = []
    for result in results:
        difference = result.error is None and result.issuing and \
            first_difference(issuing_sent(result), want)
        statuses.append((2, "%s: not the newest chain: serves %s; the newest (%s) serves %s" % (
            result.source, difference[0], newest.source, difference[1]))
                        if difference else (0, ""))
    return statuses


def check_parts(results, settings, now, reporter):
    """Each source's (status, text) line (check_part), and the perfdata of those that
    have any."""
    lines, perfdata = [], []
    for result, label in zip(results, perfdata_labels(results)):
        line, data = render_source(check_part, failed_check_part, result, reporter, settings,
                                   now, label)
        lines.append(line)
        if data:
            perfdata.append(data)
    return lines, perfdata


def check_pieces(summary, perfdata, lines):
    """--check's output, piece by piece as write_pieces writes it: the summary, " | "
    and every source's perfdata on the first line, then a line per source, its text
    through status_text."""
    yield summary
    if perfdata:
        yield " |"
        for each in perfdata:
            yield " " + each
    yield "\n"
    for status, text in lines:
        yield "%s - %s\n" % (NAGIOS[status], status_text(text))


def check_report(results, settings, now, reporter):
    """Nagios plugin output: a summary line with perfdata, then one line per source.
    A source's line is its worst finding: expiry, served chain, --same; a bug while
    one source is checked makes that source UNKNOWN (render_source). Every line's
    text goes through status_text: no "|" but certgrab's own before the perfdata."""
    lines, perfdata = check_parts(results, settings, now, reporter)
    if settings.same:
        lines = [worse(line, same) for line, same in zip(lines, same_chain_statuses(results))]
    worst = worse(*lines)[0]
    counts = ", ".join("%d %s" % (sum(s == n for s, _ in lines), NAGIOS[n])
                       for n in range(4) if any(s == n for s, _ in lines))
    # notifications often show the first line only: it names the first worst source
    first_problem = next(("; first: " + status_text(text) for status, text in lines
                          if status == worst and worst), "")
    write_pieces(check_pieces("CERTGRAB %s - %d source(s): %s%s" % (
        NAGIOS[worst], len(results), counts, first_problem), perfdata, lines))
    return worst


def joined(parts, separator, lead=""):
    """Pieces for write_pieces that write lead + separator.join(parts) (nothing for no
    parts), without making that copy."""
    pieces = []
    for part in parts:
        pieces += [separator if pieces else lead, part]
    return pieces


def report(results, settings, reporter):
    """--text, --json or --check over every result; returns the exit code. Each
    source's error is in its own part of the report (and, but for --check, on
    stderr too): one bad source never hides the others, and a bug while one is
    rendered is that source's error (render_source)."""
    now = time.time()
    if settings.report == "check":
        return check_report(results, settings, now, reporter)
    render, failed = (source_json_text, failed_json_text) if settings.report == "json" \
        else (text_lines, failed_text)
    parts = [render_source(render, failed, result, reporter, settings, now)
             for result in results]
    for result in results:
        if result.error is not None:
            reporter.error(result.error)
    if settings.report == "json":
        write_pieces(["[\n"] + joined(parts, ",\n  ", "  ") + ["\n]\n"])
    else:
        write_pieces(joined(parts, "\n"))
    failures = [r.error for r in results if r.error is not None]
    return max(error.exit_code for error in failures) if failures else 0


# ---------------------------------------------------------------------------
# Metrics for Prometheus: node_exporter's textfile collector reads --prometheus
# FILE. Every series has run="FILE's name without .prom", so that two certgrab
# runs writing two files into one collector directory never export the same
# series twice.
# ---------------------------------------------------------------------------

INSTALL_OUTCOMES = ("installed", "unchanged", "held_back", "refused", "hook_failed",
                    "not_confirmed", "restored", "failed")
SOURCE_METRICS = (      # (name, help) of the metrics with a series per source
    ("certgrab_source_fetch_success", "1 if the source's chain was read."),
    ("certgrab_source_verify_success", "1 if the source's chain verified."),
    ("certgrab_certificate_not_before_timestamp_seconds",
     "notBefore of each certificate of the issuing path."),
    ("certgrab_certificate_not_after_timestamp_seconds",
     "notAfter of each certificate of the issuing path."),
    ("certgrab_chain_not_after_timestamp_seconds",
     "The earliest notAfter of the source's issuing path."))

CA_METRICS = (          # (name, help) of the metrics of what the CA knows, per source
    ("certgrab_leaf_revoked", "1 if the leaf's CRL lists it, 0 if its CRL (checked by "
     "OpenSSL) does not; absent when unknown."),
    ("certgrab_ari_window_start_timestamp_seconds", "Start of the renewal window the CA "
     "suggests for the leaf (ARI)."),
    ("certgrab_ari_window_end_timestamp_seconds", "End of the renewal window the CA "
     "suggests for the leaf (ARI)."))

LAST_SYNC = "certgrab_last_sync_timestamp_seconds"
LAST_CONFIRM = "certgrab_last_confirm_timestamp_seconds"


def source_labels(result, run):
    return run + [("source", printable(result.source.text)),
                  ("servername", result.source.servername or "")]


def source_series(result, insecure, run):
    """One source's series of each of SOURCE_METRICS: fetch and verification; per
    certificate of the issuing chain (position 0 is the leaf): its dates; the chain's
    earliest notAfter."""
    source, labels = result.source, source_labels(result, run)
    verified = [] if source.file or insecure else [
        (labels, int(bool(result.served) and not result.verify_error
                     and not isinstance(result.error, VerifyError)))]
    named = [labels + [("position", str(position)), ("sha256", cert.sha256),
                       ("name", cert.name)] for position, cert in enumerate(result.issuing)]
    chain = [(labels, min(cert.not_after for cert in result.issuing))] if result.issuing else []
    return ([(labels, int(bool(result.served)))], verified,
            [(name, cert.not_before) for name, cert in zip(named, result.issuing)],
            [(name, cert.not_after) for name, cert in zip(named, result.issuing)], chain)


def failed_series(result, insecure, run):
    """source_series of a source whose metrics met a bug (render_source): not read."""
    return [(source_labels(result, run), 0)], [], [], [], []


def source_metrics(results, insecure, run, reporter):
    """SOURCE_METRICS, each with the series of every source (source_series); a bug
    while one source's are made is that source's error (render_source)."""
    series = [render_source(source_series, failed_series, result, reporter, insecure, run)
              for result in results]
    return [(name, text, [one for each in series for one in each[index]])
            for index, (name, text) in enumerate(SOURCE_METRICS)]


def ca_series(result, run):
    """One source's series of each of CA_METRICS: the leaf's revocation (none while
    unknown: 0 would say good) and its renewal window."""
    labels, revocation, renewal = source_labels(result, run), result.revocation, result.renewal
    known = revocation is not None and revocation.status != "unknown"
    window = renewal is not None and renewal.start is not None
    return ([(labels, int(revocation.status == "revoked"))] if known else [],
            [(labels, renewal.start)] if window else [], [(labels, renewal.end)] if window else [])


def no_ca_series(result, run):
    """ca_series of a source whose series met a bug (render_source): none."""
    return [], [], []


def ca_metrics(results, run, reporter):
    """CA_METRICS with the series of every source; a bug while one source's are made is
    that source's error (render_source), as in source_metrics."""
    series = [render_source(ca_series, no_ca_series, result, reporter, run)
              for result in results]
    return [(name, text, [one for each in series for one in each[index]])
            for index, (name, text) in enumerate(CA_METRICS)]


def previous_value(path, name):
    """name's value in the metrics file a previous run wrote; None if unknown (read as
    outputs are: never through a link, never waiting on a FIFO)."""
    data = read_existing(path) or b""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


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


def confirm_metrics(results, path, run, outcome, now):
    """--confirm: when a run last confirmed that the services serve the installed leaf,
    that leaf's serial and sha256 as labels. A run that confirmed nothing carries the
    series over from the metrics file at path, as the previous run wrote it
    (previous_confirm)."""
    if outcome == "confirmed":
        leaf = max((r for r in results if r.error is None), key=lambda r: r.leaf.not_before).leaf
        series = [(run + [("serial", leaf.serial_hex), ("sha256", leaf.sha256)], now)]
    else:
        series = previous_confirm(path, run)
    return [(LAST_CONFIRM, "When --confirm last saw the services serve the installed leaf "
             "(its serial and sha256 in labels).", series)]


def metric_labels(pairs):
    """{a="x",b="y"}, the values (made terminal-safe by printable() where they come from
    a certificate or the command line) escaped as the exposition format says."""
    return "{%s}" % ",".join('%s="%s"' % (key, value.replace("\\", "\\\\")
                                            .replace('"', '\\"').replace("\n", "\\n"))
                             for key, value in pairs)


def metric_value(value):
    return "%d" % value if isinstance(value, int) else "%.3f" % value


def metrics_text(results, settings, clock, outcome, reporter):
    """The exposition text: (name, help, [(labels, value)]) per metric, in order."""
    run = [("run", printable(os.path.basename(settings.prometheus).rsplit(".prom", 1)[0]))]
    now = time.time()
    metrics = [("certgrab_run_timestamp_seconds", "When this run started.", [(run, clock[0])]),
               ("certgrab_run_duration_seconds", "How long this run took.",
                [(run, time.monotonic() - clock[1])])]
    metrics += source_metrics(results, settings.insecure, run, reporter)
    metrics += ca_metrics(results, run, reporter)       # issue 21
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
        metrics += confirm_metrics(results, settings.prometheus, run, outcome, now) \
            if settings.confirm else []
    return "".join("# HELP %s %s\n# TYPE %s gauge\n%s" % (name, text, name, "".join(
        "%s%s %s\n" % (name, metric_labels(labels), metric_value(value))
        for labels, value in series)) for name, text, series in metrics if series)


def metrics_directory(path):
    """The real path of --prometheus FILE's directory. Unlike the outputs', it may belong
    to another user (Debian's prometheus-node-exporter gives /var/lib/prometheus to the
    prometheus user): it is resolved without the ownership rule, but a link is followed
    only where no other user could have put it (resolve_path, not strict)."""
    doing = "cannot write --prometheus %s" % path
    directory, entry, _ = resolve_path(os.path.dirname(os.path.abspath(path)), doing,
                                       strict=False)
    if entry is None or not stat.S_ISDIR(entry.st_mode):
        raise WriteError("%s: %s is not a directory" % (doing, directory))
    return directory


def open_directory(directory):
    """A descriptor of directory (a real path), opened one name at a time from / without
    following any link: whoever owns a directory on the way can swap what lies below it
    only for something already in a directory they may write, never for a link."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    for name in _names(directory):
        try:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


def remove_stale_metrics(fd, name):
    """Temporary files of name that a killed run left in the directory open at fd: only
    regular files of this user's, older than METRICS_TEMP_STALE."""
    for stale in os.listdir(fd):
        if not stale.startswith("." + name + TEMP_MARK):
            continue
        try:
            found = os.stat(stale, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:           # another run renamed or removed it meanwhile
            continue
        if stat.S_ISREG(found.st_mode) and found.st_uid == os.geteuid() and \
                time.time() - found.st_mtime > METRICS_TEMP_STALE:
            remove_quietly(stale, fd)


def write_metrics(path, text, reporter):
    """Replace path atomically: a temp file beside it, fsynced, renamed over it. The
    temp's name does not end in .prom, so the textfile collector never reads it. All of
    it happens in the directory opened once (metrics_directory, open_directory): the
    temp is created exclusively, and the rename replaces a link at path, never follows
    it, so whoever may write that directory cannot send the write elsewhere."""
    name = os.path.basename(path)
    directory = metrics_directory(path)
    try:
        fd = open_directory(directory)
        try:
            remove_stale_metrics(fd, name)
            temp = write_temp_file(directory, name, text.encode("utf-8"), NEW_FILE_MODE,
                                   dir_fd=fd)
            try:
                os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except OSError:
                remove_quietly(temp, fd)
                raise
            sync_directory(directory, reporter, fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError("cannot write --prometheus %s: %s" % (path, exc.strerror or exc))


def record_run(settings, results, clock, outcome, code, reporter):
    """--prometheus: write the run's metrics; returns the run's exit code. A failed
    write, or a bug while a source's metrics were made (source_metrics), is an error
    line; it makes a run that otherwise succeeded exit 5 (or 3), but leaves --check's
    status alone (the status line is already out)."""
    if not settings.prometheus:
        return code
    errors = [result.error for result in results]
    text = metrics_text(results, settings, clock, outcome, reporter)
    failures = [r.error for r, error in zip(results, errors) if r.error is not error]
    try:
        write_metrics(settings.prometheus, text, reporter)
    except (WriteError, RefusedError) as exc:
        failures.append(exc)
    for failure in failures:
        reporter.error(failure)
    worst = max([failure.exit_code for failure in failures] or [0])
    return code or (0 if settings.report == "check" else worst)


def install_outcome(exc, plan, dry_run):
    """The outcome of an install that raised exc (failure_outcome); None when the run
    installs nothing (no outputs planned, or --dry-run)."""
    return failure_outcome(exc) if plan and not dry_run else None


# ---------------------------------------------------------------------------
# Command line: argparse, validated once into read-only Settings.
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
PATH_VALUES = ("FILE", "DIR")   # the values of these options are paths (relative: --config)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        raise UsageError(message or "argparse wanted to exit with status %d" % status)


# Every option: (group, ((flags, value, help), ...)) in --help's order, as docs/options.md
# and the man page (tests/make_man.py) group them. value is the metavar, SWITCH for a flag
# without one, and "NAME..." for an option that may be given more than once. --config
# reads its keys from the same definitions (file_options).
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
    ("what the CA knows: revocation (CRL) and renewal windows (ARI)", (     # issue 21
        (("--crl",), "MODE", "on: check the CRLs the chain names, go ahead when one cannot "
         "be had (default); require: refuse then; off: no CRL"),
        (("--acme-directory",), "URL", "ask this ACME server's renewalInfo (ARI) for the "
         "leaf's renewal window"),
        (("--cache-dir",), "DIR", "keep CRLs (until nextUpdate, a day at most) and ARI "
         "answers (Retry-After) in DIR across runs"),
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
         "--check: no WARNING for a served chain lacking intermediates, out of order, or "
         "holding certificates off the verified path"),
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


def epilog():
    """--starttls protocols, examples and the exit codes of the docstring."""
    protocols = wrap_items(["%s %d" % (name, STARTTLS[name][1]) for name in sorted(STARTTLS)],
                           76)
    doc = __doc__ or "\nExit codes\n    (see README.md: python -OO dropped them)\n"
    exit_codes = doc.split("\nExit codes\n", 1)[1].replace("    ", "  ")
    return "--starttls protocols (default port):\n%s\n\n%s\n\nexit codes:\n%s" % (
        "\n".join("  " + line for line in protocols), EXAMPLES, exit_codes.rstrip("\n"))


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
    """The command line (or a --config section), validated and converted once by
    validate_settings: numbers are numbers, the key is read, paths and names are
    checked. Every field is declared here, each given once and read by some step;
    nothing assigns to one afterwards, so that no step can change what a later one
    sees. Steps that need one or two of them are given those values instead."""

    __slots__ = (
        # where to connect, and how (fetch_chain)
        "sources",          # (Source, ...): every SOURCE, parsed (parse_sources)
        "all_addresses",    # --all-addresses: a source per address of a host name
        "family",           # socket.AF_INET (-4), AF_INET6 (-6) or AF_UNSPEC
        "timeout",          # --timeout: seconds for each source, from DNS to the chain
        "parallel",         # --parallel: sources fetched at once; 0: fetch_width chooses
        "starttls",         # --starttls PROTOCOL (a key of STARTTLS), or None
        "ehlo",             # --ehlo NAME, or None: this host's (ehlo_name)
        "alpn",             # --alpn: [protocol, ...], or None
        "tls_min",          # --tls-min: one of TLS_VERSIONS, or None
        "tls_max",          # --tls-max: one of TLS_VERSIONS, or None
        # what is trusted (make_context), and what the CA is asked (consult_ca)
        "trust",            # Trust: --cafile and --capath, or the system store
        "insecure",         # --insecure: nothing verified
        "crl",              # --crl: one of CRL_MODES
        "acme_directory",   # --acme-directory URL, or None: no ARI
        "cache_dir",        # --cache-dir: its real path (cache_directory), or None
        # reports instead of files (report)
        "report",           # "text", "json" or "check"; None: print or install the chain
        "warn",             # --warn: (amount, is_share) (_threshold)
        "crit",             # --crit: (amount, is_share)
        "same",             # --same
        "expect_file",      # --expect-file FILE, or None
        "expected",         # its issuing chain ([Certificate]), or None
        "chain_warning",    # not --no-chain-warning
        "prometheus",       # --prometheus FILE, or None
        # the gate and the files (install_chain)
        "keys",             # (PrivateKey, ...): --key-path, read, in the order given
        "plan",             # ((path, content), ...): the outputs (plan_outputs)
        "out_dir",          # --out-dir DIR, or None (the hook's RENEWED_LINEAGE)
        "verified_chain",   # --verified-chain: print or write the verified chain, root included
        "force",            # --force
        "dry_run",          # --dry-run
        "min_age",          # --min-age: seconds, or None
        "mode",             # --mode of new certificate files, or None: NEW_FILE_MODE
        "uid",              # --owner's uid, or -1
        "gid",              # --group's gid, or -1
        "deploy_hook",      # --deploy-hook CMD, or None
        "hook_timeout",     # --hook-timeout: seconds
        "confirm",          # --confirm: ((HOST[:PORT], host, port), ...)
        "confirm_timeout",  # --confirm-timeout: seconds
    )

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        missing = set(self.__slots__) - set(values)
        if unknown or missing:
            raise TypeError("Settings: unknown %s, missing %s" % (sorted(unknown),
                                                                  sorted(missing)))
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("Settings are read-only: cannot set %s" % name)

    def __delattr__(self, name):
        raise AttributeError("Settings are read-only: cannot delete %s" % name)


def _prometheus_path(path, plan, key_paths):
    """--prometheus FILE: never one of the outputs or a key; its directory must exist."""
    if path is None:
        return None
    option = ("--prometheus",)
    if os.path.realpath(path) in [os.path.realpath(p) for p in
                                  [p for p, _ in plan] + list(key_paths)]:
        raise UsageError("--prometheus %s names a certificate output or the key" % path,
                         options=option)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError("--prometheus %s: the directory %s does not exist" % (
            path, os.path.dirname(os.path.abspath(path))), options=option)
    if os.path.isdir(path):
        raise UsageError("--prometheus %s is a directory; name a file in it, such as "
                         "%s" % (path, os.path.join(path, "certgrab.prom")), options=option)
    try:
        metrics_directory(path)         # a link no one else could have put there
    except CertgrabError as exc:
        exc.options = option
        raise
    return path


def _number(text, default, convert):
    """text as convert (int or float), default when absent, None when not a number."""
    if text is None:
        return default
    try:
        return convert(text)
    except ValueError:
        return None


def _connecting_settings(args):
    """-4/-6, --timeout, --parallel, --starttls, --ehlo, --alpn."""
    timeout = _number(args.timeout, DEFAULT_TIMEOUT, float)
    if timeout is None or not 0 < timeout < DAY:
        raise UsageError("--timeout must be a number of seconds above 0", options=("--timeout",))
    parallel = _number(args.parallel, 0, int)       # 0: fetch_width chooses
    if parallel is None:
        raise UsageError("--parallel takes a number", options=("--parallel",))
    if args.parallel is not None and not 1 <= parallel <= PARALLEL_LIMIT:
        raise UsageError("--parallel must be from 1 to %d" % PARALLEL_LIMIT,
                         options=("--parallel",))
    if args.starttls is not None and args.starttls not in STARTTLS:
        raise UsageError("--starttls %s: unknown protocol; known: %s"
                         % (args.starttls, ", ".join(sorted(STARTTLS))), options=("--starttls",))
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
                flag, value, ", ".join(TLS_VERSIONS)), options=(flag,))
    if args.tls_min and args.tls_max and args.tls_min > args.tls_max:
        raise UsageError("--tls-min %s is above --tls-max %s" % (args.tls_min, args.tls_max),
                         options=("--tls-min", "--tls-max"))
    return dict(tls_min=args.tls_min, tls_max=args.tls_max)


def _threshold(text, days, flag, default_share):
    """--warn/--crit (or their --*-days form) as (amount, is_share): "36h", "2d",
    "90m", "600s" -> (seconds, False); "25%" -> (0.25, True); absent: the default."""
    if text is not None and days is not None:
        raise UsageError("%s and %s-days exclude each other" % (flag, flag),
                         options=(flag, flag + "-days"))
    if days is not None:
        number = _number(days, None, float)
        if number is None or not 0 <= number < float("inf"):
            raise UsageError("%s-days %s: give a number of days, such as 14" % (flag, days),
                             options=(flag + "-days",))
        return number * DAY, False
    if text is None:
        return default_share, True
    unit = text[-1:].lower()
    scale = DURATION_UNITS.get(unit) or (0.01 if unit == "%" else None)
    number = _number(text[:-1], None, float) if scale else None
    if number is None or not 0 <= number < float("inf") or unit == "%" and number > 100:
        raise UsageError("%s %s: give a duration such as 36h, 2d or 90m, or a share of the "
                         "certificate's lifetime such as 25%%" % (flag, text), options=(flag,))
    return number * scale, unit == "%"


def _report_settings(args):
    """--text, --json, --check (with --same, --expect-file, --warn-days, --crit-days)."""
    check = args.check or args.same or args.expect_file is not None
    modes = [mode for mode, given in (("text", args.text), ("json", args.json),
                                      ("check", check)) if given]
    if len(modes) > 1:
        raise UsageError("--%s and --%s exclude each other" % tuple(modes[:2]),
                         options=tuple("--" + mode for mode in modes[:2]))
    report = modes[0] if modes else None
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    if report and (writes or args.key_path or args.verified_chain):
        raise UsageError("--%s only reports; it cannot go with output files, --key-path or "
                         "--verified-chain" % report,
                         options=("--" + report, "--key-path", "--verified-chain"))
    warn = _threshold(args.warn, args.warn_days, "--warn", WARN_SHARE)
    crit = _threshold(args.crit, args.crit_days, "--crit", CRIT_SHARE)
    expected = None                 # --expect-file: its issuing chain (root aside)
    if args.expect_file is not None:
        ders = pem_to_ders(read_input(args.expect_file, "--expect-file")
                           .decode("ascii", "replace"))
        if not ders:
            raise UsageError("--expect-file %s: no PEM certificate in it" % args.expect_file,
                             options=("--expect-file",))
        expected = chain_from_names(parse_chain(ders[:MAX_CHAIN], args.expect_file))[0]
    return dict(report=report, same=args.same, expect_file=args.expect_file,
                expected=expected, warn=warn, crit=crit, chain_warning=not args.no_chain_warning)


def _given(args, flag):
    return getattr(args, flag.lstrip("-").replace("-", "_")) not in (None, False)


def _key_settings(args, writes, reporter):
    """--key-path (once, or twice for a rollover), read; --privkey's and the
    key's companions checked. Returns the keys, a tuple in the order given."""
    for flag in ("--combined-path", "--key-password-file", "--privkey"):
        if _given(args, flag) and not args.key_path:
            raise UsageError("%s needs --key-path" % flag, options=(flag,))
    if args.privkey and not args.out_dir:
        raise UsageError("--privkey writes privkey.pem in --out-dir; give --out-dir",
                         options=("--privkey",))
    if len(args.key_path or ()) > 1 and writes and not (args.privkey or args.combined_path):
        raise UsageError("several --key-path need --privkey (or --combined-path) to install",
                         hint="the service must get the key that matches the new "
                              "certificate, in the same set: README, key rollover",
                         options=("--key-path",))
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
        raise UsageError("%s %s: no such %s on this host" % (flag, name, what),
                         options=(flag,))


def _install_settings(args, reporter):
    """Files, key, hook: the options of runs that write files or check a key."""
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    for flag in ("--deploy-hook", "--owner", "--group", "--mode", "--force", "--dry-run"):
        if _given(args, flag) and not writes:
            raise UsageError("%s needs an output file (--out-dir or a --*-path)" % flag,
                             options=(flag,))
    keys = _key_settings(args, writes, reporter)
    hook_timeout = _number(args.hook_timeout, HOOK_TIMEOUT, float)
    mode = _number(args.mode, None, lambda text: int(text, 8))
    if hook_timeout is None or args.mode is not None and mode is None:
        raise UsageError("--hook-timeout takes seconds and --mode an octal number like 0644",
                         options=("--hook-timeout", "--mode"))
    if not hook_timeout > 0:
        raise UsageError("--hook-timeout must be above 0", options=("--hook-timeout",))
    if mode is not None and mode & ~CERT_MODE_MOST:
        raise UsageError("--mode allows at most 0644: certificate files are never "
                         "executable or writable by others", options=("--mode",))
    return dict(out_dir=args.out_dir, keys=keys, force=args.force, dry_run=args.dry_run,
                deploy_hook=args.deploy_hook, hook_timeout=hook_timeout, mode=mode,
                uid=lookup_id(args.owner, "--owner"), gid=lookup_id(args.group, "--group"))


def cache_directory(path):
    """--cache-dir: its real path, made (DIR_MODE) when missing. What it keeps decides
    what a run believes without asking (an ARI window is not signed), so it is held to
    the outputs' rules (resolve_path: every directory on the way safe from other users,
    links only where they could not have put them; found again once made), and it must
    itself belong to root or this user and be writable by no one else. RefusedError
    otherwise, before any connection."""
    doing = "cannot keep answers in --cache-dir %s" % path
    resolve_path(path, doing)
    make_directory(path)
    real, entry, _ = resolve_path(path, doing)
    if entry is None or not stat.S_ISDIR(entry.st_mode):
        raise WriteError("%s: %s is not a directory" % (doing, real))
    if entry.st_uid not in trusted_users():
        raise RefusedError("%s: %s belongs to %s, who could change what certgrab reads "
                           "there" % (doing, real, user_name(entry.st_uid)),
                           hint="chown root %s, or name a directory of root's" % real)
    if _exposed(entry):
        raise RefusedError("%s: %s is writable by group or others (mode %04o)" % (
            doing, real, stat.S_IMODE(entry.st_mode)), hint="chmod go-w %s" % real)
    return real


def _ca_settings(args):
    """--crl, --acme-directory and --cache-dir, checked."""
    crl = args.crl if args.crl is not None else "on"
    if crl not in CRL_MODES:
        raise UsageError("--crl %s: give on (check, install anyway when the CRL cannot be "
                         "had), require or off" % crl, options=("--crl",))
    if args.acme_directory is not None:
        try:
            split_url(args.acme_directory, "https")
        except CaError as exc:
            raise UsageError("--acme-directory: %s" % exc, options=("--acme-directory",))
    try:
        cache_dir = args.cache_dir and cache_directory(args.cache_dir)
    except CertgrabError as exc:
        exc.options = ("--cache-dir",)
        raise
    return dict(crl=crl, acme_directory=args.acme_directory, cache_dir=cache_dir)


def _duration(text, flag):
    """A duration as --warn takes one, 90m, 36h, 2d or 600s, in seconds."""
    scale = DURATION_UNITS.get(text[-1:].lower())
    number = _number(text[:-1], None, float) if scale else None
    if number is None or not 0 <= number < float("inf"):
        raise UsageError("%s %s: give a duration such as 90m, 36h or 2d" % (flag, text),
                         options=(flag,))
    return number * scale


def _rollout_settings(args, default_port):
    """--all-addresses, --min-age, --confirm HOST[:PORT] (each as (HOST[:PORT], host,
    port)) and --confirm-timeout. --confirm needs --deploy-hook: the hook makes the
    service take the new files, and is what stays pending when it did not."""
    writes = any(getattr(args, name) for name in OUTPUT_OPTIONS)
    for flag in ("--min-age", "--confirm"):
        if _given(args, flag) and not writes:
            raise UsageError("%s needs an output file (--out-dir or a --*-path)" % flag,
                             options=(flag,))
    if args.confirm and not args.deploy_hook:
        raise UsageError("--confirm needs --deploy-hook (the command that reloads the service "
                         "--confirm dials)", options=("--confirm",))
    if args.confirm_timeout is not None and not args.confirm:
        raise UsageError("--confirm-timeout needs --confirm", options=("--confirm-timeout",))
    timeout = _number(args.confirm_timeout, CONFIRM_TIMEOUT, float)
    if timeout is None or not 0 < timeout < DAY:
        raise UsageError("--confirm-timeout must be a number of seconds above 0",
                         options=("--confirm-timeout",))
    confirm = tuple((text,) + split_source(text, default_port) for text in args.confirm or ())
    min_age = None if args.min_age is None else _duration(args.min_age, "--min-age")
    return dict(all_addresses=args.all_addresses, min_age=min_age, confirm=confirm,
                confirm_timeout=timeout)


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
            raise UsageError("%s and %s exclude each other" % (first, second),
                             options=(first, second))
    values = dict(insecure=args.insecure, verified_chain=args.verified_chain,
                  trust=Trust(args.cafile, args.capath))
    values.update(_connecting_settings(args))
    values.update(_tls_version_settings(args))
    values.update(_report_settings(args))
    values.update(_install_settings(args, reporter))
    values.update(_ca_settings(args))                   # issue 21: --crl, ARI, --cache-dir
    default_port = parse_port(args.port, "-p/--port", ("--port",)) if args.port is not None \
        else STARTTLS[args.starttls][1] if args.starttls else DEFAULT_PORT
    values.update(_rollout_settings(args, default_port))
    values["sources"] = parse_sources(sources, parse_servername(args.servername),
                                      default_port, files_allowed=bool(values["report"]))
    values["plan"] = plan_outputs(args.out_dir, dict(
        (content, getattr(args, content + "_path")) for content in ("cert", "chain", "fullchain",
                                                          "combined")), args.key_path or (),
        args.privkey, values["uid"])
    values["prometheus"] = _prometheus_path(args.prometheus, values["plan"], args.key_path or ())
    return Settings(**values)


# ---------------------------------------------------------------------------
# Config file: one section per certificate, keys named like the long options.
# ---------------------------------------------------------------------------

class Section(object):
    """One section of --config, ready to run: its name, Settings, reader and reporter."""

    def __init__(self, name, settings, reader, reporter):
        self.name, self.settings, self.reader, self.reporter = name, settings, reader, reporter


def check_config_file(path):
    """Running as root, a --config file runs its hooks as root: like sudo and sshd, refuse
    one that another user could change: owned by another user or writable by group or
    others, or in a directory such a user could change (resolve_path, strict)."""
    if os.geteuid() != 0:
        return
    doing = "refusing --config %s" % path
    real, entry, _ = resolve_path(path, doing)
    if entry is None:
        return                                  # read_config says it is missing
    if entry.st_uid not in trusted_users():
        raise RefusedError("%s: it belongs to %s, and its hooks would run as root" % (
            doing, user_name(entry.st_uid)), hint="chown root %s" % real)
    if _exposed(entry):
        raise RefusedError("%s: it is writable by group or others (mode %04o), and its hooks "
                           "would run as root" % (doing, stat.S_IMODE(entry.st_mode)),
                           hint="chmod go-w %s" % real)


def read_config(path):
    """FILE through configparser (no interpolation: a hook keeps its % and $)."""
    import configparser
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read_string(read_input(path, "--config").decode("utf-8"), path)
    except UnicodeDecodeError:
        raise UsageError("--config %s: not UTF-8 text" % path)
    except configparser.Error as exc:
        raise UsageError("--config %s: %s" % (path, " ".join(str(exc).split())))
    return config


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


def config_paths(action, value, base):
    """The value of a FILE or DIR key with its relative paths taken from base (for an
    option given several times, each path of the list); other values as they are."""
    if action.metavar not in PATH_VALUES or not value:
        return value
    if isinstance(action, argparse._AppendAction):
        return " ".join(os.path.join(base, item) for item in value.split())
    return os.path.join(base, value)


def section_args(parser, config, name, where, base):
    """argparse's namespace and the SOURCEs of one section ([DEFAULT] included).
    Each key becomes its option's words and is parsed alone first, so that an
    error names the key; the options are the parser's own (file_options). A
    relative path (a SOURCE file, or the value of a FILE or DIR option) is taken
    from base, the config file's directory, not from the working directory."""
    options, words, sources = file_options(parser), [], []
    for key, value in config.items(name):
        if key == "source":
            sources = [os.path.join(base, source) if looks_like_file(source) else source
                       for source in value.split()]
            continue
        inherited = config.defaults().get(key) == value     # as far as one can tell
        here = "%s%s, key %s" % (where, " (from [DEFAULT])" if inherited else "", key)
        if key not in options:
            raise UsageError("%s: %s" % (here, "an option of the command line only" if "--" +
                                         key in COMMAND_LINE_ONLY else "no such option; keys "
                                         "are source and the long options without --"))
        try:
            key_words = option_words(options[key], "--" + key,
                                     config_paths(options[key], value, base))
            parse_command_line(parser, key_words)
        except UsageError as exc:
            raise UsageError("%s: %s" % (here, exc))
        words.extend(key_words)
    return parse_command_line(parser, words)[0], sources


def section_settings(parser, config, name, path, overrides, syslog):
    """The Section of one section, validated like a command line."""
    where = "%s, section [%s]" % (path, name)
    args, sources = section_args(parser, config, name, where,
                                 os.path.dirname(os.path.abspath(path)))
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
    except (UsageError, InputError, RefusedError) as exc:  # InputError: cannot read a file
        keys = [key for key in config.options(name) if "--" + key in exc.options]
        raise type(exc)("%s%s: %s" % (where, ", key " + keys[0] if keys else "", exc),
                        exc.hint)
    return Section(name, settings, reader, reporter)


def config_sections(parser, args, sources, reporter):
    """[Section] of the sections to run, in file order. Options given on
    the command line replace that key in every section. UsageError names the file,
    the section and the key."""
    path = args.config
    if sources:
        raise UsageError("--config %s: SOURCEs come from each section's source key, not from "
                         "the command line (%s)" % (path, sources[0]))
    check_config_file(path)
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


# ---------------------------------------------------------------------------
# The run: main() and its steps, in the order they run, numbered once:
#   1. the command line (parse_command_line)
#   2. the settings (validate_settings), or every --config section's (run_config)
#   3. the trust store and the way to read chains (make_reader)
#   4. every source fetched (fetch_all, fetch_every_address)
#   5. what the CA knows (consult_ca)
#   6. a report (--text, --json, --check), or
#   7. the gate (apply_gate, apply_ca_gate) and the newest chain (choose_result)
#   8. the chain printed, or installed (install_chain: hold back, lock, write,
#      hook, confirm)
#   9. the metrics (record_run) and the --syslog line (Reporter.log)
# Nothing but main() turns an error into an exit code, and nothing calls sys.exit.
# ---------------------------------------------------------------------------

def plugin_unknown(exc):
    """A monitoring plugin's status line for a run that could not even check."""
    try:
        write_stdout("CERTGRAB UNKNOWN - %s\n" % status_text(str(exc)))
    except WriteError:
        pass                            # stdout is gone: the exit code still says it


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


def deliver(results, settings, reader, reporter):
    """Steps 6 to 8: report on the results, or print or install the newest good chain:
    (exit code, install outcome for the metrics or None)."""
    if settings.report:                                 # 6. a report of every source
        reporter.outcome("reported (--%s)" % settings.report)
        return report(results, settings, reporter), None
    if settings.plan or settings.keys:
        apply_gate(results, settings.keys, reporter)    # 7. the gate: key, name, dates,
    apply_ca_gate(results, settings, reporter)          #    nothing revoked,
    best = choose_result(results, reporter)             #    and the newest chain
    warn_about_ca(best, bool(settings.plan), reporter)  #    (CRL soft-fail, ARI window)
    report_fetch(results, best, reader, settings, reporter)
    chain = best.verified if settings.verified_chain else None
    if not settings.plan:                               # 8. printed exactly as served,
        write_stdout("".join(der_to_pem(cert.der) for cert in chain or best.served))
        reporter.outcome("printed sha256:%s from %s" % (best.leaf.sha256, best.source))
        return 0, None
    outcome = install_chain(chain or best.issuing, best, settings, reporter, reader)  # or in
    if outcome in ("installed", "confirmed", "unchanged"):  # (dry run, held back: said)
        confirmed = "; confirmed" if outcome == "confirmed" else ""
        reporter.outcome("installed sha256:%s from %s%s" % (best.leaf.sha256, best.source,
                                                           confirmed)
                         if outcome != "unchanged" else outcome, outcome != "unchanged")
    return 0, outcome


def run_one(settings, reader, reporter, sharers=1):
    """Steps 4 to 9 for one certificate: fetch every source, ask the CA, deliver, then
    --prometheus. Returns the exit code; an expected failure raises CertgrabError,
    after the metrics have recorded it. sharers: see fetch_all."""
    clock = (time.time(), time.monotonic())
    reporter.checking("%s from %s" % (settings.sources[0].verify_name,
                                      " ".join(source.text for source in settings.sources)))
    if settings.insecure:
        reporter.warn("--insecure: the chain is NOT verified; anyone on the path could "
                      "have sent it%s" % ("; files get the path built from the served "
                                          "certificates' names alone, no signature checked: "
                                          "clients may fail to verify it" if settings.plan
                                          else ""))
    fetch = fetch_every_address if settings.all_addresses else fetch_all
    results = fetch(settings.sources, reader, settings, reporter, sharers)  # 4. fetch
    consult_ca(results, settings, reporter, sharers)    # 5. what the CA knows
    try:
        code, outcome = deliver(results, settings, reader, reporter)  # 6. to 8.
    except Exception as exc:            # certgrab's own error, or a bug: the run's error
        error = as_error(exc, None, reporter)
        record_run(settings, results, clock, install_outcome(error, settings.plan,
                                                             settings.dry_run),
                   error.exit_code, reporter)
        raise error
    return record_run(settings, results, clock, outcome, code, reporter)  # 9. metrics


def run_section(section, sharers):
    """One section: its exit code; an expected failure is its own error line.
    sharers: how many sections run at once, sharing the open-files limit."""
    settings, reporter = section.settings, section.reporter
    try:
        code, failure = run_one(settings, section.reader, reporter, sharers), None
    except Exception as exc:            # certgrab's own error, or a bug: this section's
        exc = as_error(exc, None, reporter)
        reporter.error(exc)
        code, failure = exc.exit_code, exc
        if settings.report == "check":
            plugin_unknown(exc)
            code = NAGIOS_UNKNOWN
    reporter.log(code, failure)
    return code


def source_groups(sections):
    """Lists of section indexes: sections that share a source (host and port, or
    file) are in one group, so that no source sees two of our runs at once."""
    groups = []                                 # [(sources, [index, ...])]
    for index, section in enumerate(sections):
        keys = set((source.host, source.port, source.file) for source in
                   section.settings.sources)
        merged = (keys, [index])
        for group in [group for group in groups if group[0] & keys]:
            groups.remove(group)
            merged[0].update(group[0])
            merged[1].extend(group[1])
        groups.append(merged)
    return [sorted(indexes) for _, indexes in groups]


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


def run_config(parser, args, sources, reporter):
    """--config: every section (or the one --section names), all validated (steps 2
    and 3) before any connection, then run (4 to 9) concurrently where their sources
    differ. One failing section does not stop the others; returns the worst exit
    code."""
    reporter.checking("config %s" % args.config)
    sections = config_sections(parser, args, sources, reporter)  # 2. and 3. for each
    codes = run_sections(sections, reporter)        # 4. to 9. for each section
    return summarize_sections(sections, codes, reporter)  # 9. which failed, the worst code


def main(argv=None):
    """Run certgrab; return the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.umask(UMASK)                     # first: nothing made group- or world-writable
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
        if args.config is not None:                     # 2. to 9. for each section
            return run_config(parser, args, sources, reporter)
        settings = validate_settings(args, sources, reporter)  # 2. options, SOURCEs, files
        reader = make_reader(settings)                  # 3. trust store, chain reader
        code = run_one(settings, reader, reporter)      # 4. to 9.
        reporter.log(code)                              # 9. the --syslog line
        return code
    except CertgrabError as exc:
        return report_failure(exc, argv, reporter)
    except Exception as exc:            # a bug: one line, the traceback under -v
        return report_failure(internal_error(None, exc, reporter), argv, reporter)


if __name__ == "__main__":
    sys.exit(main())
