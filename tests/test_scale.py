"""Issue 15: a thousand endpoints. Wide by default, within the host's limits, never a crash.

    acceptance                                          tests
    1  --check over 1,024 sources whose server answers  test_a_thousand_sources_with_default_flags
       200 ms after each accept: exit 0, one line each  (the timing itself: `make bench`, (e))
    2  --check --same over the same sources             the same test, with --same
    3  --parallel 1024 under ulimit -n 512: every       test_parallel_1024_under_ulimit_512
       source reported, no traceback                    test_default_width_follows_ulimit,
                                                        test_no_free_descriptor_*,
                                                        test_no_thread_free_*

Issue 23: ten thousand endpoints at the floor (CPU and memory: `make bench`, row (f)).

    what the issue asks                                 tests
    each distinct certificate parsed once per run,      test_a_fleet_serving_two_chains_parses_
    shared, never changed                               four_certificates,
                                                        test_shared_certificates_are_unchanged_
                                                        after_every_report
    a result keeps what its report needs: no socket,    test_results_keep_no_connection_frame_
    TLS object, traceback or raw bytes after its        or_raw_bytes,
    fetch; the certificates of a fleet, and its         test_results_of_a_fleet_share_its_four_
    chains, held once                                   certificates
    what the CA says of a chain (CRL, ARI) asked        test_the_ca_is_asked_once_per_chain
    once per chain, not per source
    every report byte for byte as before (acceptance    test_reports_are_the_same_as_with_each_
    3): --json, --text, --check, --check --same,        source_on_its_own
    --prometheus over a fleet with two chains, CRLs

"Before" is certgrab with every certificate parsed anew for each source that sent it and
the CA asked for each source, as it was: ParsedCertificates.parse is replaced by
parse_certificate and same_chains puts each source in a group of its own for that run,
the clock held still for both. The certificate fields in those reports are also checked
against hashlib over the served files, independently of certgrab.

Speed is measured by `make bench`, never here: these tests assert what a user sees (every
source reported, in order, the exit code, no traceback, the warning when --parallel is
lowered) and how many sources were fetched at once, as the server counts them. Their time
bounds only catch a hang.
"""

import gc
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import types

import pytest

from ca_servers import CrlCA, FileServer
from helpers import CERTGRAB, ROOT
from make_certs import NAME, read_ders
from servers import DelayedTLSServer, HTTPServer, SilentServer, TLSServer, closed_port

FLEET = 1024                # sources in acceptance 1 to 3
DELAY = 0.2                 # seconds the server waits after each accept (acceptance 1)
HANG = 60                   # seconds; far beyond any run here: only a hang gets there
NOBODY = 65534              # uid and gid of nobody, whose processes the thread test limits

# Runs certgrab.main with every descriptor but argv[1] of them taken (opened on /dev/null):
# sources must then share the few left, or fail one by one.
HOLD_FILES = """
import os, resource, sys
sys.path.insert(0, %r)
import certgrab
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
for _ in range(int(sys.argv[1])):
    os.close(held.pop())
sys.exit(certgrab.main(sys.argv[2:]))
""" % ROOT


@pytest.fixture
def fleet_server(certs):
    """One server for the whole fleet (each SOURCE names it again): answers DELAY s late."""
    chain = certs / "ec1"
    with DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as server:
        yield server


@pytest.fixture
def root(certs):
    return str(certs / "ec1" / "root.pem")


def check_args(root, sources, *extra):
    return ["--check", "-n", NAME, "--cafile", root] + list(extra) + sources


def run_limited(argv, limits=(), user=None, python=sys.executable):
    """certgrab (or python code: argv[0] "-c") as a program under resource limits, as user."""
    def apply_limits():
        for kind, value in limits:
            resource.setrlimit(kind, value)
        if user is not None:
            os.setgid(user)
            os.setuid(user)
    proc = subprocess.run([python] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=apply_limits, timeout=HANG)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_every_source(out, sources, status="OK"):
    """The summary, then one line per source, in order, each with the status given."""
    lines = out.splitlines()
    assert lines[0].startswith("CERTGRAB %s - %d source(s): %d %s" % (
        status, len(sources), len(sources), status)), lines[0][:200]
    assert len(lines) == len(sources) + 1, "%d lines for %d sources" % (len(lines),
                                                                         len(sources))
    for line, source in zip(lines[1:], sources):
        assert line.startswith("%s - %s: " % (status, source)), (line, source)


# ---------------------------------------------------------------- 1 and 2: a thousand sources

@pytest.mark.parametrize("extra", [[], ["--same"]], ids=["check", "check-same"])
def test_a_thousand_sources_with_default_flags(run, certgrab, fleet_server, root, extra):
    sources = [fleet_server.address] * FLEET
    result = run(*check_args(root, sources, *extra))
    assert result.rc == 0, result.out[:2000] + result.err
    assert_every_source(result.out, sources)
    assert result.err == ""
    assert certgrab.DEFAULT_PARALLEL // 2 < fleet_server.most <= certgrab.DEFAULT_PARALLEL, \
        "the default fetches up to %d sources at once, not %d" % (
            certgrab.DEFAULT_PARALLEL, fleet_server.most)
    assert result.elapsed < HANG


# ---------------------------------------------------------------- 3: the open-files limit

def test_parallel_1024_under_ulimit_512(certgrab, fleet_server, root):
    """Lowered to what 512 descriptors allow, with a warning; every source reported."""
    sources = [fleet_server.address] * FLEET
    rc, out, err = run_limited([CERTGRAB] + check_args(root, sources, "--parallel", "1024"),
                               [(resource.RLIMIT_NOFILE, (512, 512))])
    allowed = (512 - certgrab.FILES_KEPT) // certgrab.FILES_PER_FETCH
    assert rc == 0, out[:2000] + err
    assert_every_source(out, sources)
    assert err == "certgrab: warning: --parallel 1024 lowered to %d: this process may open " \
        "only 512 files (ulimit -n), 2 per source at once\n" % allowed
    assert fleet_server.most <= allowed


@pytest.mark.parametrize("hard, most", [(128, 48), (4096, 256)], ids=["hard-128", "raised"])
def test_default_width_follows_ulimit(fleet_server, root, hard, most):
    """Without --parallel, a low soft limit is raised toward the hard one; what cannot be
    raised narrows the default silently (the user asked for nothing)."""
    sources = [fleet_server.address] * 300
    rc, out, err = run_limited([CERTGRAB] + check_args(root, sources),
                               [(resource.RLIMIT_NOFILE, (128, hard))])
    assert rc == 0, out[:2000] + err
    assert_every_source(out, sources)
    assert err == ""
    assert fleet_server.most <= most
    assert fleet_server.most > most // 2, "fetched %d at once" % fleet_server.most


def test_no_free_descriptor_makes_sources_wait_for_one(fleet_server):
    """With one descriptor left, sources take turns at it: all OK, no traceback."""
    sources = [fleet_server.address] * 6
    rc, out, err = run_limited(["-c", HOLD_FILES, "1", "--check", "--insecure",
                                "-n", NAME] + sources, [(resource.RLIMIT_NOFILE, (64, 64))])
    assert rc == 0, out + err
    assert_every_source(out, sources)
    assert "Traceback" not in err
    assert fleet_server.most == 1


def test_no_free_descriptor_until_the_timeout_is_each_sources_error(fleet_server):
    sources = [fleet_server.address] * 3
    rc, out, err = run_limited(["-c", HOLD_FILES, "0", "--check", "--insecure", "--timeout",
                                "0.5", "-n", NAME] + sources,
                               [(resource.RLIMIT_NOFILE, (64, 64))])
    assert rc == 2, out + err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].startswith("CERTGRAB CRITICAL - 3 source(s): 3 CRITICAL; first: "
                               "%s: cannot open a socket: Too many open files" % sources[0])
    assert lines[1:] == ["CRITICAL - %s: cannot open a socket: Too many open files" % source
                         for source in sources]
    assert fleet_server.connections == 0


# ---------------------------------------------------------------- threads

@pytest.fixture
def nobody_dir():
    """A directory nobody may read (pytest's tmp_path is under a 0700 one)."""
    directory = tempfile.mkdtemp(prefix="certgrab-scale-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


def python_for_nobody():
    """An interpreter the user nobody may run (pyenv's under /root is not)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([python, "-c", "pass"], preexec_fn=lambda: os.setuid(NOBODY),
                           check=True, timeout=HANG)
            return python
        except (OSError, subprocess.CalledProcessError):
            continue
    pytest.skip("no Python interpreter that the user nobody may run")


def test_no_thread_free_fetches_with_the_threads_there_are(fleet_server, certs, nobody_dir):
    """nobody may run 4 processes (threads count): certgrab starts what it can and says so."""
    python = python_for_nobody()
    copy, root = os.path.join(nobody_dir, "certgrab.py"), os.path.join(nobody_dir, "root.pem")
    shutil.copyfile(CERTGRAB, copy)
    shutil.copyfile(str(certs / "ec1" / "root.pem"), root)
    sources = [fleet_server.address] * 16
    rc, out, err = run_limited([copy] + check_args(root, sources),
                               [(resource.RLIMIT_NPROC, (4, 4))], user=NOBODY, python=python)
    assert rc == 0, out + err
    assert_every_source(out, sources)
    assert err.startswith("certgrab: warning: could start only "), err
    assert "of 16 threads (out of threads or memory): fetching " in err
    assert "Traceback" not in err
    assert fleet_server.most < 4


def test_config_sections_run_at_once_share_the_open_files_limit(certs, root, tmp_path):
    """Two --config sections on different sources run at once: each gets half of what
    the open-files limit allows, says so when its --parallel is lowered, and every source
    of both is reported."""
    chain = certs / "ec1"
    with DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as first, \
            DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as second:
        config = tmp_path / "fleet.conf"
        config.write_text("[DEFAULT]\nservername = %s\ncafile = %s\ncheck = yes\n"
                          "parallel = 200\n\n[first]\nsource = %s\n\n[second]\nsource = %s\n"
                          % (NAME, root, " ".join([first.address] * 100),
                             " ".join([second.address] * 100)))
        rc, out, err = run_limited([CERTGRAB, "--config", str(config)],
                                   [(resource.RLIMIT_NOFILE, (256, 256))])
    assert rc == 0, out + err
    share = (256 - 32) // 2 // 2        # FILES_KEPT, FILES_PER_FETCH, two sections at once
    lowered = ("--parallel 200 lowered to %d: this process may open only 256 files "
               "(ulimit -n), 2 per source at once, shared by 2 sections at once" % share)
    assert err.count(lowered) == 2, err
    assert out.count("\nOK - ") == 200, out
    assert "Traceback" not in err
    assert first.most <= share and second.most <= share


# ---------------------------------------------------------------- issue 23: parsed once, kept lean

TWO_CHAINS = ("ec1", "ec1new")  # a fleet half renewed: two leaves, one intermediate, one root
FLEET_23 = 240                  # sources serving those two chains, in turn
DISTINCT = 4                    # certificates among them: two leaves, the intermediate, the root


@pytest.fixture
def two_chains(certs):
    """Two servers, one per chain of TWO_CHAINS (queues long enough for a fleet)."""
    with DelayedTLSServer(certs / "ec1" / "fullchain.pem", certs / "ec1" / "key.pem", 0) as old, \
            DelayedTLSServer(certs / "ec1new" / "fullchain.pem", certs / "ec1new" / "key.pem",
                             0) as new:
        yield old, new


def fleet(two_chains, count=FLEET_23):
    return [two_chains[i % 2].address for i in range(count)]


def counting(monkeypatch, certgrab, name):
    """The first argument of every call of certgrab.NAME, which still does its work."""
    calls = []
    real = getattr(certgrab, name)

    def counted(first, *args):
        calls.append(first)
        return real(first, *args)

    monkeypatch.setattr(certgrab, name, counted)
    return calls


def keeping_results(monkeypatch, certgrab):
    """The FetchResults of each run, as deliver receives them (then delivered as usual)."""
    kept = []
    real = certgrab.deliver

    def deliver(results, *args):
        kept.append(results)
        return real(results, *args)

    monkeypatch.setattr(certgrab, "deliver", deliver)
    return kept


def test_a_fleet_serving_two_chains_parses_four_certificates(run, certgrab, monkeypatch,
                                                            two_chains, root):
    """240 sources, two chains: two leaves, their intermediate, and the root the verified
    chain ends at are each read once; before, every source read its own three."""
    calls = counting(monkeypatch, certgrab, "parse_certificate")
    sources = fleet(two_chains)
    result = run(*check_args(root, sources))
    assert result.rc == 0, result.out[:2000] + result.err
    assert_every_source(result.out, sources)
    assert len(calls) == DISTINCT, "%d parses for %d sources" % (len(calls), len(sources))
    assert len(set(calls)) == DISTINCT


def reachable(obj):
    """Every object obj holds, directly or not, but for the insides of certificates (their
    DER and its parts), of the Source (what the command line said) and of classes,
    modules and functions."""
    found, seen, stack = [], set(), [obj]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType,
                                               types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        found.append(obj)
        if type(obj).__name__ not in ("Certificate", "Source"):
            stack.extend(gc.get_referents(obj))
    return found


def test_results_keep_no_connection_frame_or_raw_bytes(run, certgrab, monkeypatch, certs,
                                                        served, started, root):
    """After its fetch a result holds no socket, TLS object or context, no frame or
    traceback (they would hold those), and no bytes but its certificates': whether it
    verified, failed to verify (its error used to keep the fetch's frames), met no TLS,
    timed out or could not connect."""
    kept = keeping_results(monkeypatch, certgrab)
    with closed_port() as port:
        sources = [served("ec1").address, served("unknown").address,
                   started(HTTPServer()).address, started(SilentServer()).address,
                   "127.0.0.1:%d" % port]
        result = run(*check_args(root, sources, "--timeout", "1"))
    assert result.rc == 2, result.out + result.err
    assert [line.split(" - ")[0] for line in result.out.splitlines()[1:]] == [
        "OK", "CRITICAL", "CRITICAL", "CRITICAL", "CRITICAL"], result.out
    forbidden = (socket.socket, ssl.SSLContext, ssl.SSLObject, ssl.MemoryBIO,
                 ssl._ssl._SSLSocket, types.FrameType, types.TracebackType,
                 bytes, bytearray, memoryview)
    for each in kept[0]:
        held = [type(obj).__name__ for obj in reachable(each) if isinstance(obj, forbidden)]
        assert held == [], "%s keeps %s" % (each.source, held)
    assert all(each.error is None or each.error.__context__ is None for each in kept[0])


def test_results_of_a_fleet_share_its_four_certificates(run, certgrab, monkeypatch, two_chains,
                                                       root):
    """Whatever the number of sources, their results hold the same four Certificate
    objects, one list for each chain (as served, verified, for files) and one answer
    of the CA for each: memory grows with the sources, not with the chains they serve."""
    kept = keeping_results(monkeypatch, certgrab)
    result = run(*check_args(root, fleet(two_chains)))
    assert result.rc == 0, result.out[:2000] + result.err
    held = [obj for each in kept[0] for obj in reachable(each)
            if isinstance(obj, certgrab.Certificate)]
    assert len(held) >= FLEET_23 * 3, "each result holds its leaf, intermediate and root"
    assert len(set(map(id, held))) == DISTINCT
    for field in ("served", "verified", "issuing", "revocation"):
        assert len(set(id(getattr(each, field)) for each in kept[0])) == len(TWO_CHAINS), field


def test_the_ca_is_asked_once_per_chain(run, certgrab, monkeypatch, crl_fleet):
    """Sources serving the same chain get one answer from the CA: its CRLs checked once
    per chain, however many sources serve it; a revoked one is still each one's finding."""
    sources, cafile, _ = crl_fleet
    asked = counting(monkeypatch, certgrab, "ask_ca")
    verdicts = counting(monkeypatch, certgrab, "revocation_verdict")
    result = run(*report_args(["--check"], sources, cafile, None))
    assert result.rc == 2, result.out + result.err
    chains = set(tuple(cert.der for cert in each.issuing) for each in asked)
    assert len(asked) == len(chains) == 5, "asked %d times" % len(asked)  # ec1, ec1new, with
    assert len(verdicts) == 2           # the root (its chain is ec1's), good, revoked, unknown
    assert [line.startswith("CRITICAL - ") for line in result.out.splitlines()
            if "was REVOKED by its CA" in line] == [False, True, True], result.out


def test_shared_certificates_are_unchanged_after_every_report(run, certgrab, monkeypatch,
                                                             golden_fleet, tmp_path):
    """A certificate many sources share is read once and never written to: after every
    kind of report over the fleet, each is field for field what a fresh parse gives."""
    runs = []
    real = certgrab.ParsedCertificates

    class Recorded(real):
        def __init__(self):
            real.__init__(self)
            runs.append(self)

    monkeypatch.setattr(certgrab, "ParsedCertificates", Recorded)
    sources, cafile, _ = golden_fleet
    for report in REPORTS:
        run(*report_args(report, sources, cafile, tmp_path))
    certificates = [cert for parsed in runs for cert in parsed._by_der.values()]
    assert len(runs) == len(REPORTS) and len(certificates) >= len(REPORTS) * DISTINCT
    for cert in certificates:
        assert vars(cert) == vars(certgrab.parse_certificate(cert.der)), cert.name


# The fleet of the byte-for-byte comparison: the two chains, and among them a server that
# sends the root too (a problem naming shared certificates), one under a root not trusted
# here (verification fails, the chain is still reported), a closed port, and leaves that
# name a CRL: one good, one revoked, one whose CRL host is down, each served twice.
REPORTS = (["--json"], ["--text"], ["--check"], ["--check", "--same"],
           ["--check", "--prometheus", "{dir}/fleet.prom"])


@pytest.fixture(scope="module")
def crl_ca(tmp_path_factory):
    """A CA whose leaves name CRLs on a loopback file server: (ca, server, its files)."""
    ca = CrlCA(tmp_path_factory.mktemp("crl-ca"))
    crls = tmp_path_factory.mktemp("crls")
    server = FileServer(crls).start()
    yield ca, server, crls
    server.stop()


@pytest.fixture
def crl_fleet(crl_ca, two_chains, started, certs, tmp_path):
    """The two chains, a server sending ec1's root too, and three leaves of crl_ca (good,
    revoked, CRL host down), each served by two sources: (sources, a --cafile with both
    roots, the files those four servers serve)."""
    ca, server, crls = crl_ca
    with_root = tmp_path / "with-root.pem"
    with_root.write_text((certs / "ec1" / "fullchain.pem").read_text()
                         + (certs / "ec1" / "root.pem").read_text())
    leaves = [ca.leaf("scale-good", server.url("scale.crl")),
              ca.leaf("scale-revoked", server.url("scale.crl"))]
    ca.revoke("scale-revoked", "keyCompromise")
    ca.crl(str(crls / "scale.crl"))
    with closed_port() as port:
        leaves.append(ca.leaf("scale-down", "http://127.0.0.1:%d/gone.crl" % port))
    chains = [with_root] + [os.path.join(leaf, "fullchain.pem") for leaf in leaves]
    keys = [certs / "ec1" / "key.pem"] + [os.path.join(leaf, "key.pem") for leaf in leaves]
    sources = fleet(two_chains, 40)
    for index, (chain, key) in enumerate(zip(chains, keys)):
        sources[5 + 8 * index:5 + 8 * index] = [started(TLSServer(chain, key)).address] * 2
    cafile = tmp_path / "roots.pem"
    cafile.write_text((certs / "ec1" / "root.pem").read_text()
                      + open(os.path.join(leaves[0], "root.pem")).read())
    return sources, cafile, chains


@pytest.fixture
def golden_fleet(crl_fleet, served):
    """crl_fleet, with two sources under an unknown root and two on a closed port:
    (sources, --cafile, every file of certificates served)."""
    sources, cafile, chains = crl_fleet
    unknown = served("unknown").address
    with closed_port() as port:
        sources[2:2] = [unknown, "127.0.0.1:%d" % port]
        sources[30:30] = [unknown, "127.0.0.1:%d" % port]
        yield sources, cafile, chains


def report_args(report, sources, cafile, tmp_path):
    return [arg.format(dir=tmp_path) for arg in report] + ["-n", NAME, "--cafile", cafile] \
        + sources


def report_output(run, report, sources, cafile, tmp_path):
    """What a user gets from report: stdout, stderr, the exit code and the metrics file
    (its run duration aside, which no two runs share)."""
    result = run(*report_args(report, sources, cafile, tmp_path))
    metrics = tmp_path / "fleet.prom"
    text = metrics.read_text() if metrics.exists() else ""
    text = re.sub(r"(certgrab_run_duration_seconds\{[^}]*\}) \S+", r"\1 D", text)
    return result.rc, result.out, result.err, text


@pytest.mark.parametrize("report", REPORTS, ids=lambda r: " ".join(r[:2]).replace("{dir}/", ""))
def test_reports_are_the_same_as_with_each_source_on_its_own(run, certgrab, monkeypatch,
                                                            golden_fleet, tmp_path, certs,
                                                            report):
    """Acceptance 3: one run as certgrab is, one with every certificate parsed anew and
    the CA asked for each source (as before issue 23), the clock held still for both: the
    same bytes, so no source's report changes for sharing with the sources before it."""
    sources, cafile, served = golden_fleet
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)
    shared = report_output(run, report, sources, cafile, tmp_path)
    monkeypatch.setattr(certgrab.ParsedCertificates, "parse",
                        lambda parsed, der: certgrab.parse_certificate(der))
    monkeypatch.setattr(certgrab, "same_chains", lambda results: [[each] for each in results])
    assert report_output(run, report, sources, cafile, tmp_path) == shared
    rc, out, err, metrics = shared
    assert rc == (2 if "--check" in report else 4), err   # CRITICAL; or the unknown root
    assert out.count(NAME if report == ["--text"] else "127.0.0.1:") >= 52, out
    assert "revoked" in out.lower() and "scale.crl" in out, out
    if report == ["--json"]:
        files = [certs / chain / name for chain in TWO_CHAINS + ("unknown",)
                 for name in ("fullchain.pem", "root.pem")] + served + [cafile]
        digests = set(hashlib.sha256(der).hexdigest() for path in files
                      for der in read_ders(path))
        chains = [source["chain"] for source in json.loads(out)]
        assert sum(len(chain) for chain in chains) > 100
        assert all(cert["sha256"] in digests for chain in chains for cert in chain)
