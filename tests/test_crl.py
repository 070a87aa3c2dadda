"""Issue 21: revocation from CRLs, with a real CA (`openssl ca`), real CRLs (`-revoke`,
`-gencrl`) served over HTTP on loopback, and certgrab.main in-process.

    1. what the CRL says: good, revoked (serial, time, reason), in --json, --text, --check
       and --prometheus (promtool)
    2. the gate: a revoked leaf is never installed, an installed one is said so; a CRL that
       cannot be had: installed anyway (--crl on), refused (--crl require), not asked (off)
    3. a CRL that fails a check is never evidence: another key, stale, not yet valid
    4. hostile or absent CRL servers: unreachable, oversized, slow, garbage
    5. cost: one fetch per CRL per run, also for 1,024 sources; --cache-dir keeps it
       across runs (a day at most), under the outputs' path rules
    6. nginx serving the CRL; PEM CRLs
    7. intermediates that name a CRL: checked on their own, against the root's CRL; a
       revoked one refuses the chain
    8. CRL text in --check: never a "|" before the perfdata
"""

import datetime
import json
import os
import shutil
import stat
import tempfile
import time

import pytest
from cryptography import x509

from ca_servers import CrlCA, FileServer, RawHttpServer
from helpers import (REFUSED, ROOT, assert_only_certgrabs_perfdata, assert_promtool_accepts,
                     bug_line, call_main, error_lines, grab, inject_bug, iso, load_cert,
                     serial_hex, source_metric)
from make_certs import DAY, NAME
from servers import DelayedTLSServer, GarbageServer, TLSServer, closed_port


@pytest.fixture
def dead_port():
    """A loopback port where connections are refused, for the test's duration."""
    with closed_port() as port:
        yield port


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CrlCA(tmp_path_factory.mktemp("crl-ca"))


@pytest.fixture(scope="module")
def crl_server(tmp_path_factory):
    server = FileServer(tmp_path_factory.mktemp("crls")).start()
    yield server
    server.stop()


@pytest.fixture
def issue(ca, crl_server, request):
    """issue(revoked=False, url=None) -> a leaf directory whose CRL DP names url (default:
    this test's own CRL file on crl_server, written now, after any revocation)."""
    counter = [0]

    def make(revoked=False, url=None, reason="keyCompromise"):
        counter[0] += 1
        name = "%s-%d" % (request.node.name.replace("[", "-").replace("]", ""), counter[0])
        own = url is None
        leaf = ca.leaf(name, url or crl_server.url(name + ".crl"))
        if revoked:
            ca.revoke(name, reason)
        if own:
            ca.crl(os.path.join(crl_server.directory, name + ".crl"))
        leaf_name[leaf] = name
        return leaf

    leaf_name = {}
    make.name = leaf_name
    return make


def serve(started, leaf):
    return started(TLSServer(os.path.join(leaf, "fullchain.pem"), os.path.join(leaf, "key.pem")))


def crl_entry(path, leaf):
    """(revocation time as certgrab writes it, reason name) from the CRL file, by pyca."""
    with open(path, "rb") as f:
        crl = x509.load_der_x509_crl(f.read())
    serial = load_cert(os.path.join(leaf, "cert.pem")).serial_number
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    return serial_hex(serial), iso(entry.revocation_date_utc), \
        {"key_compromise": "keyCompromise"}.get(reason.value, reason.value)


def revocation(run, server, leaf, *extra):
    result = grab(run, server, leaf, "--json", *extra)
    return result, json.loads(result.out)[0]["revocation"]


# ---------------------------------------------------------------- 1. what the CRL says

def test_a_good_leaf_is_good_everywhere(run, started, issue, crl_server, tmp_path):
    leaf = issue()
    server = serve(started, leaf)
    result, status = revocation(run, server, leaf)
    assert result.rc == 0, result.err
    assert status["status"] == "good" and status["cause"] is None
    assert status["url"] == crl_server.url(issue.name[leaf] + ".crl")
    assert status["crl_next_update"] > status["crl_this_update"]
    text = grab(run, server, leaf, "--text")
    assert "  revocation:   good: not on its CRL %s" % status["url"] in text.out
    check = grab(run, server, leaf, "--check", "--crl", "require")
    assert check.rc == 0 and check.out.startswith("CERTGRAB OK"), check.out


def test_a_revoked_leaf_has_its_time_and_reason(run, started, issue, crl_server):
    leaf = issue(revoked=True)
    server = serve(started, leaf)
    result, status = revocation(run, server, leaf)
    serial, when, reason = crl_entry(os.path.join(crl_server.directory,
                                                  issue.name[leaf] + ".crl"), leaf)
    assert (status["status"], status["time"], status["reason"]) == ("revoked", when, reason)
    assert reason == "keyCompromise"
    text = grab(run, server, leaf, "--text")
    assert "  revocation:   REVOKED at %s, reason keyCompromise (CRL %s)" % (
        when, status["url"]) in text.out


def test_check_is_critical_for_a_revoked_leaf(run, started, issue):
    leaf = issue(revoked=True, reason="superseded")
    result = grab(run, serve(started, leaf), leaf, "--check")
    assert result.rc == 2, result.out
    assert result.out.startswith("CERTGRAB CRITICAL")
    assert "was REVOKED by its CA at" in result.out and "reason superseded" in result.out
    assert "the renewing machine must renew" in result.out


def test_check_warns_about_an_unknown_status_only_with_crl_require(run, started, issue,
                                                                   dead_port):
    leaf = issue(url="http://127.0.0.1:%d/gone.crl" % dead_port)
    server = serve(started, leaf)
    soft = grab(run, server, leaf, "--check")
    assert soft.rc == 0 and soft.out.startswith("CERTGRAB OK"), soft.out
    hard = grab(run, server, leaf, "--check", "--crl", "require")
    assert hard.rc == 1 and hard.out.startswith("CERTGRAB WARNING"), hard.out
    assert "revocation unknown (--crl require)" in hard.out and "gone.crl" in hard.out


def test_prometheus_leaf_revoked(run, started, issue, tmp_path, dead_port):
    good, revoked = issue(), issue(revoked=True)
    unknown = issue(url="http://127.0.0.1:%d/x.crl" % dead_port)
    values = {}
    for name, leaf in (("good", good), ("revoked", revoked), ("unknown", unknown)):
        prom = tmp_path / ("%s.prom" % name)
        result = grab(run, serve(started, leaf), leaf, "--check", "--prometheus", prom)
        text = prom.read_text()
        lines = [line for line in text.splitlines() if line.startswith("certgrab_leaf_revoked{")]
        values[name] = [line.rsplit(" ", 1)[1] for line in lines]
        assert_promtool_accepts(text)
        assert result.rc in (0, 2)
    assert values == {"good": ["0"], "revoked": ["1"], "unknown": []}


# ---------------------------------------------------------------- 2. the gate

def test_a_revoked_leaf_is_never_installed(run, started, issue, crl_server, tmp_path):
    leaf = issue(revoked=True)
    out = tmp_path / "live"
    result = grab(run, serve(started, leaf), leaf, "--out-dir", out,
                  "--key-path", os.path.join(leaf, "key.pem"))
    serial, when, _ = crl_entry(os.path.join(crl_server.directory, issue.name[leaf] + ".crl"),
                                leaf)
    assert result.rc == REFUSED, result.err
    line = error_lines(result.err)[0]
    assert "refused the leaf serial %s: its CA revoked it at %s, reason keyCompromise" % (
        serial, when) in line
    assert "the renewing machine must renew now" in result.err
    assert not out.exists() or not os.listdir(str(out))


def test_stdout_does_not_print_a_revoked_leaf(run, started, issue):
    leaf = issue(revoked=True)
    result = grab(run, serve(started, leaf), leaf)
    assert result.rc == REFUSED and result.out == ""


def test_an_installed_revoked_leaf_is_said_so_and_left(run, started, issue, ca, crl_server,
                                                        tmp_path):
    leaf = issue()
    server, out = serve(started, leaf), tmp_path / "live"
    first = grab(run, server, leaf, "--out-dir", out)
    assert first.rc == 0, first.err
    before = dict((p.name, (p.read_bytes(), p.stat().st_mtime_ns)) for p in out.iterdir())
    ca.revoke(issue.name[leaf])
    ca.crl(os.path.join(crl_server.directory, issue.name[leaf] + ".crl"))
    second = grab(run, server, leaf, "--out-dir", out, "-v")
    assert second.rc == REFUSED, second.err
    assert "the installed leaf serial" in second.err and "files untouched" in second.err
    assert "up to date" not in second.err
    assert before == dict((p.name, (p.read_bytes(), p.stat().st_mtime_ns)) for p in out.iterdir())


def test_an_unreachable_crl_does_not_stop_an_install(run, started, issue, tmp_path, dead_port):
    port = dead_port
    leaf = issue(url="http://127.0.0.1:%d/int.crl" % port)
    server, out = serve(started, leaf), tmp_path / "live"
    result = grab(run, server, leaf, "--out-dir", out)
    assert result.rc == 0, result.err
    assert (out / "fullchain.pem").exists()
    warning = [line for line in result.err.splitlines() if "revoked the leaf" in line]
    assert warning and "installing anyway (--crl on: soft-fail" in warning[0], result.err
    assert "cannot connect" in warning[0] and str(port) in warning[0]
    strict = grab(run, server, leaf, "--out-dir", tmp_path / "strict", "--crl", "require")
    assert strict.rc == REFUSED and "--crl require" in strict.err
    assert "check this host's route to the CRL" in strict.err
    assert not (tmp_path / "strict").exists() or not os.listdir(str(tmp_path / "strict"))


def test_crl_off_asks_nothing(run, started, issue, crl_server):
    leaf = issue(revoked=True)
    before = len(crl_server.paths)
    result, status = revocation(run, serve(started, leaf), leaf, "--crl", "off")
    assert result.rc == 0 and status is None
    assert len(crl_server.paths) == before


def test_a_leaf_naming_no_crl_is_no_warning_but_require_refuses(run, started, ca, tmp_path):
    leaf = ca.leaf("no-crl-leaf", None)
    server = serve(started, leaf)
    result, status = revocation(run, server, leaf)
    assert (status["status"], status["cause"]) == ("unknown", "no-crl")
    installed = grab(run, server, leaf, "--out-dir", tmp_path / "a",
                     "--key-path", os.path.join(leaf, "key.pem"))
    assert installed.rc == 0 and "warning" not in installed.err, installed.err
    refused = grab(run, server, leaf, "--out-dir", tmp_path / "b", "--crl", "require")
    assert refused.rc == REFUSED and "names no CRL" in refused.err


# ---------------------------------------------------------------- 3. a bad CRL is not evidence

@pytest.mark.parametrize("kind,cause", [
    ("forged", ("bad-signature", "wrong-crl")),
    ("stale", ("stale",)),
    ("future", ("not-yet-valid",)),
])
def test_a_crl_failing_a_check_is_neither_good_nor_revoked(run, started, issue, ca, crl_server,
                                                           kind, cause):
    url_name = "bad-%s.crl" % kind
    path = os.path.join(crl_server.directory, url_name)
    results = []
    for revoked in (False, True):
        leaf = issue(revoked=revoked, url=crl_server.url(url_name))
        if kind == "forged":
            ca.forged_crl(path)
        elif kind == "stale":
            ca.crl(path, last="20200101000000Z", next="20200108000000Z")
        else:
            ca.crl(path, last="20990101000000Z", next="20990108000000Z")
        result, status = revocation(run, serve(started, leaf), leaf)
        assert result.rc == 0, result.err
        results.append((status["status"], status["cause"] in cause, status["time"]))
        check = grab(run, serve(started, leaf), leaf, "--check")
        assert check.rc == 0, check.out                 # never CRITICAL: not evidence
    assert results == [("unknown", True, None), ("unknown", True, None)]


# ---------------------------------------------------------------- 4. hostile CRL servers

def _crl_reply(size):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size


@pytest.mark.parametrize("server,words", [
    (lambda: GarbageServer(), "not an HTTP answer"),
    (lambda: RawHttpServer(_crl_reply(32 * 1024 * 1024 + 1), "hold"), "more than the"),
    (lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\n\r\n", "endless-body"), "larger than"),
    (lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                           "endless-chunks"), "larger than"),
    (lambda: RawHttpServer(_crl_reply(4000) + b"0" * 100, "close"),
     "closed the connection after 100 of 4000 bytes"),
    (lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"),
     "not a CRL"),
], ids=["garbage", "oversized", "endless-body", "endless-chunks", "lying-length", "not-crl"])
def test_hostile_crl_servers_are_unknown_and_do_not_stop_an_install(run, started, issue,
                                                                      tmp_path, server, words):
    hostile = started(server())
    leaf = issue(url="http://127.0.0.1:%d/int.crl" % hostile.port)
    result, status = revocation(run, serve(started, leaf), leaf)
    assert status["status"] == "unknown" and words in status["detail"], status
    installed = grab(run, serve(started, leaf), leaf, "--out-dir", tmp_path / "out")
    assert installed.rc == 0 and "installing anyway" in installed.err


def test_a_slow_crl_server_is_stopped_by_the_deadline(run, started, issue):
    slow = started(RawHttpServer(_crl_reply(20) + b"x" * 20, "drip", interval=0.5))
    leaf = issue(url=slow.url())
    started_at = time.monotonic()
    result, status = revocation(run, serve(started, leaf), leaf, "--timeout", "2")
    assert status["status"] == "unknown" and "timed out" in status["detail"], status
    assert time.monotonic() - started_at < 2 * 2 + 3     # the fetch's deadline, then the CRL's


# ---------------------------------------------------------------- 5. cost and --cache-dir

def test_many_sources_one_crl_one_fetch(run, started, issue, crl_server):
    leaf = issue()
    servers = [serve(started, leaf) for _ in range(6)]
    before = len(crl_server.paths)
    result = run(*[s.address for s in servers] + ["-n", NAME, "--cafile",
                                                   os.path.join(leaf, "root.pem"), "--json"])
    assert [s["revocation"]["status"] for s in json.loads(result.out)] == ["good"] * 6
    assert len(crl_server.paths) == before + 1


def kept_until(path):
    """The expiry a --cache-dir file carries on its first line (epoch seconds)."""
    return int(path.read_bytes().split(b"\n", 1)[0])


def test_1024_sources_naming_one_crl_fetch_it_once(run, issue, crl_server):
    """A fleet of 1,024 sources in sync (one server, named 1,024 times): one GET of the CRL
    for the whole run, and every source is good."""
    leaf = issue()
    before = len(crl_server.paths)
    with DelayedTLSServer(os.path.join(leaf, "fullchain.pem"), os.path.join(leaf, "key.pem"),
                          0) as server:
        result = run("--check", "--crl", "require", "-n", NAME, "--cafile",
                     os.path.join(leaf, "root.pem"), *[server.address] * 1024)
    assert result.rc == 0, result.out[:1000] + result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("CERTGRAB OK - 1024 source(s): 1024 OK")
    assert len(lines) == 1025 and all(line.startswith("OK - ") for line in lines[1:])
    assert len(crl_server.paths) == before + 1


def test_cache_dir_keeps_the_crl_across_runs(run, started, issue, crl_server, tmp_path):
    leaf = issue()
    server, cache = serve(started, leaf), tmp_path / "cache"
    before = len(crl_server.paths)
    for _ in range(3):
        result, status = revocation(run, server, leaf, "--cache-dir", cache)
        assert status["status"] == "good", status
    assert len(crl_server.paths) == before + 1
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755       # made as output directories are
    (kept,) = list(cache.iterdir())
    assert kept.name.startswith("crl-") and stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_a_cached_crl_is_kept_a_day_at_most_though_its_next_update_is_later(
        run, started, issue, ca, crl_server, tmp_path):
    """The CRL says nextUpdate in 7 days (openssl ca's default_crl_days here; the Baseline
    Requirements allow 10), but a CA must publish a revocation within 24 hours: the copy
    is used for a day at most, then fetched again."""
    leaf = issue()
    server, cache = serve(started, leaf), tmp_path / "cache"
    status = revocation(run, server, leaf, "--cache-dir", cache)[1]
    (kept,) = list(cache.iterdir())
    next_update = datetime.datetime.strptime(status["crl_next_update"], "%Y-%m-%dT%H:%M:%SZ")
    assert (next_update - datetime.datetime.utcnow()).days >= 6
    assert 0 < kept_until(kept) - time.time() <= DAY
    before = len(crl_server.paths)
    body = kept.read_bytes().split(b"\n", 1)[1]
    kept.write_bytes(b"%d\n" % (time.time() - 1) + body)    # as if a day had passed
    assert revocation(run, server, leaf, "--cache-dir", cache)[1]["status"] == "good"
    assert len(crl_server.paths) == before + 1 and kept_until(kept) > time.time()


def test_a_cached_crl_is_still_checked_by_openssl(run, started, issue, ca, crl_server,
                                                  tmp_path):
    """A --cache-dir file is only a copy: replaced with a forged CRL it says nothing."""
    leaf = issue(revoked=True)
    server, cache = serve(started, leaf), tmp_path / "cache"
    assert revocation(run, server, leaf, "--cache-dir", cache)[1]["status"] == "revoked"
    (kept,) = list(cache.iterdir())
    ca.forged_crl(str(tmp_path / "forged.crl"))
    with open(str(tmp_path / "forged.crl"), "rb") as forged:
        kept.write_bytes(b"%d\n" % kept_until(kept) + forged.read())
    assert revocation(run, server, leaf, "--cache-dir", cache)[1]["status"] == "unknown"


def test_a_damaged_cached_crl_is_fetched_again(run, started, issue, crl_server, tmp_path):
    leaf = issue()
    server, cache = serve(started, leaf), tmp_path / "cache"
    revocation(run, server, leaf, "--cache-dir", cache)
    (kept,) = list(cache.iterdir())
    kept.write_bytes(b"%d\nnot a CRL" % kept_until(kept))
    before = len(crl_server.paths)
    assert revocation(run, server, leaf, "--cache-dir", cache)[1]["status"] == "good"
    assert len(crl_server.paths) == before + 1 and b"not a CRL" not in kept.read_bytes()


@pytest.mark.parametrize("plant", ["fifo", "link", "foreign"])
def test_a_cache_file_that_is_no_regular_file_is_not_read(run, started, issue, crl_server,
                                                          tmp_path, plant):
    """Read as outputs are: no link followed, no FIFO waited on, no file of another user's
    (kept files: read_file); the CRL is fetched again."""
    leaf = issue()
    server, cache = serve(started, leaf), tmp_path / "cache"
    revocation(run, server, leaf, "--cache-dir", cache)
    (kept,) = list(cache.iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(kept.read_bytes())
    kept.unlink()
    if plant == "fifo":
        os.mkfifo(str(kept))
    elif plant == "link":
        kept.symlink_to(elsewhere)
    else:
        kept.write_bytes(elsewhere.read_bytes())
        os.chown(str(kept), 65534, 65534)
    before = len(crl_server.paths)
    result, status = revocation(run, server, leaf, "--cache-dir", cache)
    assert status["status"] == "good" and len(crl_server.paths) == before + 1
    assert result.elapsed < 10


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_cache_dir_others_can_write_is_refused(run, tmp_path, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    result = run("127.0.0.1:1", "--cache-dir", cache)
    assert result.rc == REFUSED, result.err
    assert error_lines(result.err)[0] == (
        "certgrab: cannot keep answers in --cache-dir %s: %s is writable by group or others "
        "(mode %04o)" % (cache, cache, mode))
    assert "certgrab: hint: chmod go-w %s" % cache in result.err


def test_a_cache_dir_of_another_user_is_refused(run, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chown(str(cache), 65534, 65534)
    result = run("127.0.0.1:1", "--cache-dir", cache)
    assert result.rc == REFUSED
    assert "%s belongs to nobody, who could change what certgrab reads there" % cache \
        in result.err


def test_a_cache_dir_under_a_directory_others_can_write_is_refused_and_not_made(run, tmp_path):
    """resolve_path's rules, as for an output: a parent others may write is refused before
    anything is made in it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = run("127.0.0.1:1", "--cache-dir", shared / "cache")
    assert result.rc == REFUSED
    assert "the directory %s is writable by group or others (mode 0777)" % shared in result.err
    assert not (shared / "cache").exists()


def test_a_relative_cache_dir_in_a_config_file_is_the_file_s(run, started, issue, crl_server,
                                                             tmp_path, monkeypatch):
    leaf = issue()
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "certgrab.conf"
    config.write_text("[one]\nsource = %s\nservername = %s\ncafile = %s\ncache-dir = cache\n"
                      "json = yes\n" % (serve(started, leaf).address, NAME,
                                        os.path.join(leaf, "root.pem")))
    monkeypatch.chdir(str(tmp_path))
    result = run("--config", config)
    assert result.rc == 0, result.err
    assert [p.name[:4] for p in (tmp_path / "etc" / "cache").iterdir()] == ["crl-"]
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- 6. other servers, PEM

def test_nginx_serves_the_crl(run, started, issue, ca):
    import acme
    from servers import free_ports
    root = tempfile.mkdtemp(prefix="certgrab-nginx-crl-")   # nginx's workers must read it
    os.chmod(root, 0o755)
    # the Nginx of tests/acme.py serves the webroot's /.well-known/acme-challenge/ only
    served = os.path.join(root, "www", ".well-known", "acme-challenge")
    os.makedirs(served, mode=0o755)
    port = free_ports(1)[0]
    leaf = issue(revoked=True, url="http://127.0.0.1:%d/.well-known/acme-challenge/int.crl"
                 % port)
    ca.crl(os.path.join(served, "int.crl"))
    os.chmod(os.path.join(served, "int.crl"), 0o644)
    nginx = acme.Nginx(root, "nginx-crl", http_port=port, webroot=os.path.join(root, "www"))
    nginx.start()
    try:
        result, status = revocation(run, serve(started, leaf), leaf)
    finally:
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert status["status"] == "revoked", status


def test_a_pem_crl_is_read_too(run, started, issue, ca, crl_server):
    path = os.path.join(crl_server.directory, "pem.crl")
    leaf = issue(revoked=True, url=crl_server.url("pem.crl"))
    ca.crl(path, der=False)
    assert open(path).read().startswith("-----BEGIN X509 CRL-----")
    assert revocation(run, serve(started, leaf), leaf)[1]["status"] == "revoked"


def test_the_crl_is_verified_with_an_rsa_leaf_too(run, started, ca, crl_server):
    leaf = ca.leaf("rsa-revoked", crl_server.url("rsa.crl"), key="rsa")
    ca.revoke("rsa-revoked")
    ca.crl(os.path.join(crl_server.directory, "rsa.crl"))
    assert revocation(run, serve(started, leaf), leaf)[1]["status"] == "revoked"


def test_a_chain_larger_than_a_tls_record_is_replayed_whole(run, started, ca, crl_server):
    """A leaf of 800 names (over 16 KiB: the replayed Certificate message spans records)."""
    leaf = ca.leaf("large-revoked", crl_server.url("large.crl"), more_names=800)
    assert os.path.getsize(os.path.join(leaf, "cert.pem")) > 16384 * 4 // 3
    ca.revoke("large-revoked")
    ca.crl(os.path.join(crl_server.directory, "large.crl"))
    assert revocation(run, serve(started, leaf), leaf)[1]["status"] == "revoked"


def test_the_time_of_a_revocation_is_now(run, started, issue):
    """The entry is read from the CRL itself: its time is when `openssl ca -revoke` ran."""
    leaf = issue(revoked=True)
    when = revocation(run, serve(started, leaf), leaf)[1]["time"]
    stamp = datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ")
    assert abs((datetime.datetime.utcnow() - stamp).total_seconds()) < 600


def test_crl_and_cache_dir_are_config_keys(run, started, issue, crl_server, tmp_path):
    good, revoked = issue(), issue(revoked=True)
    config = tmp_path / "certgrab.conf"
    config.write_text(
        "[DEFAULT]\nservername = %s\ncafile = %s\ncache-dir = %s\n"
        "[strict]\nsource = %s\nout-dir = %s\ncrl = require\n"
        "[no-route]\nsource = %s\nout-dir = %s\ncrl = off\n" % (
            NAME, os.path.join(good, "root.pem"), tmp_path / "cache",
            serve(started, good).address, tmp_path / "strict",
            serve(started, revoked).address, tmp_path / "no-route"))
    before = len(crl_server.paths)
    for _ in range(2):
        result = run("--config", config)
        assert result.rc == 0, result.err
    assert len(crl_server.paths) == before + 1      # [strict]'s CRL, kept in cache-dir
    assert (tmp_path / "no-route" / "fullchain.pem").exists()   # revoked, but crl = off


# ---------------------------------------------------------------- 7. intermediates

class Hierarchy(object):
    """root -> intermediate -> leaf made with `openssl ca`; the intermediate names the
    root's CRL (ROOT.crl) and the leaf the intermediate's (INT.crl), both on crl_server
    under this test's own names, published now (publish() again after a revocation)."""

    def __init__(self, directory, server, name):
        self.server, self.root_crl, self.int_crl = server, name + "-root.crl", name + "-int.crl"
        self.ca = CrlCA(directory, intermediate_crl=server.url(self.root_crl))
        self.leaf = self.ca.leaf("leaf", server.url(self.int_crl))
        self.publish()

    def publish(self):
        self.ca.crl(os.path.join(self.server.directory, self.root_crl), issuer=self.ca.root)
        self.ca.crl(os.path.join(self.server.directory, self.int_crl))

    def intermediate(self):
        """(subject as certgrab writes it, serial in hex) of the intermediate, by pyca."""
        with open(os.path.join(self.ca.intermediate, "cert.pem"), "rb") as f:
            serial = x509.load_pem_x509_certificate(f.read()).serial_number
        text = "%x" % serial
        return "CN=CRL test intermediate", "0" * (len(text) % 2) + text


@pytest.fixture
def hierarchy(tmp_path, crl_server, request):
    return Hierarchy(tmp_path / "ca", crl_server, request.node.name.replace("[", "-")
                     .replace("]", ""))


def test_an_intermediate_that_names_a_crl_is_checked_too(run, started, hierarchy):
    leaf = hierarchy.leaf
    server = serve(started, leaf)
    result, status = revocation(run, server, leaf)
    assert result.rc == 0, result.err
    subject, serial = hierarchy.intermediate()
    assert status["status"] == "good"
    (checked,) = status["intermediates"]
    assert (checked["position"], checked["subject"], checked["serial"], checked["status"],
            checked["url"]) == (1, subject, serial, "good",
                                hierarchy.server.url(hierarchy.root_crl))
    text = grab(run, server, leaf, "--text").out
    assert '  revocation:   intermediate "%s": good: not on its CRL %s' % (
        subject, checked["url"]) in text
    check = grab(run, server, leaf, "--check", "--crl", "require")
    assert check.rc == 0 and check.out.startswith("CERTGRAB OK"), check.out


def test_an_intermediate_its_root_revoked_refuses_the_chain(run, started, hierarchy, tmp_path):
    """The root revokes the intermediate (`openssl ca -revoke`, then its CRL): the leaf is
    good on its own CRL, but the chain is revoked: the gate refuses it naming the
    intermediate, --check is CRITICAL, certgrab_leaf_revoked stays the leaf's (0)."""
    leaf, ca = hierarchy.leaf, hierarchy.ca
    ca.revoke_intermediate("cACompromise")
    hierarchy.publish()
    server = serve(started, leaf)
    subject, serial = hierarchy.intermediate()
    _, status = revocation(run, server, leaf)
    (checked,) = status["intermediates"]
    assert (status["status"], checked["status"], checked["reason"]) == (
        "good", "revoked", "cACompromise")
    with open(os.path.join(hierarchy.server.directory, hierarchy.root_crl), "rb") as f:
        crl = x509.load_der_x509_crl(f.read())
    (entry,) = list(crl)
    assert checked["time"] == iso(entry.revocation_date_utc)
    leaf_serial = crl_entry_serial(leaf)
    out = tmp_path / "live"
    install = grab(run, server, leaf, "--out-dir", out, "--key-path",
                   os.path.join(leaf, "key.pem"))
    assert install.rc == REFUSED, install.err
    assert error_lines(install.err)[0] == (
        'certgrab: %s: refused the leaf serial %s: its intermediate "%s" (serial %s) was '
        "revoked by its CA at %s, reason cACompromise (CRL %s)" % (
            server.address, leaf_serial, subject, serial, checked["time"], checked["url"]))
    assert not out.exists() or not os.listdir(str(out))
    printed = grab(run, server, leaf)
    assert printed.rc == REFUSED and printed.out == ""
    prom = tmp_path / "check.prom"
    check = grab(run, server, leaf, "--check", "--prometheus", prom)
    assert check.rc == 2 and check.out.startswith("CERTGRAB CRITICAL"), check.out
    assert 'the intermediate "%s" (serial %s) of the leaf serial %s was REVOKED by its CA' % (
        subject, serial, leaf_serial) in check.out
    metrics = prom.read_text()
    assert [line.rsplit(" ", 1)[1] for line in metrics.splitlines()
            if line.startswith("certgrab_leaf_revoked{")] == ["0"]
    assert_promtool_accepts(metrics)


def crl_entry_serial(leaf):
    return serial_hex(load_cert(os.path.join(leaf, "cert.pem")).serial_number)


def test_an_installed_chain_whose_intermediate_is_revoked_is_said_so(run, started, hierarchy,
                                                                       tmp_path):
    leaf = hierarchy.leaf
    server, out = serve(started, leaf), tmp_path / "live"
    assert grab(run, server, leaf, "--out-dir", out).rc == 0
    before = dict((p.name, (p.read_bytes(), p.stat().st_mtime_ns)) for p in out.iterdir())
    hierarchy.ca.revoke_intermediate("keyCompromise")
    hierarchy.publish()
    second = grab(run, server, leaf, "--out-dir", out)
    assert second.rc == REFUSED, second.err
    subject, serial = hierarchy.intermediate()
    assert 'the installed leaf serial %s: its intermediate "%s" (serial %s) was revoked by ' \
        "its CA at" % (crl_entry_serial(leaf), subject, serial) in second.err
    assert "reason keyCompromise" in second.err and "; files untouched" in second.err
    assert before == dict((p.name, (p.read_bytes(), p.stat().st_mtime_ns))
                          for p in out.iterdir())


def test_an_intermediates_crl_that_cannot_be_had_is_soft_fail(run, started, hierarchy, tmp_path):
    leaf = hierarchy.leaf
    os.unlink(os.path.join(hierarchy.server.directory, hierarchy.root_crl))     # 404
    server = serve(started, leaf)
    subject, serial = hierarchy.intermediate()
    installed = grab(run, server, leaf, "--out-dir", tmp_path / "a")
    assert installed.rc == 0, installed.err
    assert 'cannot tell whether the CA revoked the intermediate "%s" (serial %s): %s: HTTP ' \
        "status 404" % (subject, serial, hierarchy.server.url(hierarchy.root_crl)) \
        in installed.err and "installing anyway (--crl on: soft-fail" in installed.err
    strict = grab(run, server, leaf, "--out-dir", tmp_path / "b", "--crl", "require")
    assert strict.rc == REFUSED
    assert 'whether its CA revoked the intermediate "%s" (serial %s) is unknown (--crl ' \
        "require)" % (subject, serial) in strict.err
    check = grab(run, server, leaf, "--check", "--crl", "require")
    assert check.rc == 1 and "revocation unknown (--crl require) for the intermediate" \
        in check.out


def test_one_fetch_per_crl_for_many_sources_and_their_intermediates(run, started, hierarchy):
    leaf = hierarchy.leaf
    servers = [serve(started, leaf) for _ in range(6)]
    before = list(hierarchy.server.paths)
    result = run(*[s.address for s in servers] + ["-n", NAME, "--cafile",
                                                   os.path.join(leaf, "root.pem"), "--json"])
    assert [s["revocation"]["intermediates"][0]["status"] for s in json.loads(result.out)] \
        == ["good"] * 6
    assert sorted(hierarchy.server.paths[len(before):]) == sorted(
        ["/" + hierarchy.int_crl, "/" + hierarchy.root_crl])


# ---------------------------------------------------------------- 8. "|" in --check

def test_crl_text_never_writes_perfdata(run, started, issue):
    """A CRL host's reason phrase and a URL the leaf names, both with "|", in --check's
    WARNING (--crl require): escaped, only certgrab's perfdata after the status line's."""
    hostile = started(RawHttpServer(b"HTTP/1.1 500 down | 'expires_in x'=1s;1:;1:\r\n"
                                    b"Content-Length: 0\r\n\r\n"))
    leaf = issue(url="http://127.0.0.1:%d/a|b.crl" % hostile.port)
    server = serve(started, leaf)
    check = grab(run, server, leaf, "--check", "--crl", "require")
    assert check.rc == 1, check.out
    assert_only_certgrabs_perfdata(check.out, [server.address])
    assert "/a\\x7cb.crl: HTTP status 500 down \\x7c 'expires_in x'" in check.out



# ---------------------------------------------------------------- 9. a bug in one source's look-up

@pytest.mark.parametrize("name", ["ask_ca", "ca_refusal", "ca_series"])
def test_a_bug_in_one_sources_ca_part_is_that_sources_error(certgrab, capsys, started, issue,
                                                            monkeypatch, tmp_path, name):
    """Injected (the only mock: a real bug cannot be ordered) into the look-ups, the gate or
    the metrics of one source: that source's internal error; the other source is installed,
    the metrics file written."""
    leaf = issue()
    buggy, good = serve(started, leaf), serve(started, leaf)
    inject_bug(monkeypatch, certgrab, name, buggy.address)
    prom, out = tmp_path / "m.prom", tmp_path / "live"
    code, _, err = call_main(certgrab, capsys, buggy.address, good.address, "-n", NAME, "--cafile",
                             os.path.join(leaf, "root.pem"), "--out-dir", out, "--prometheus", prom)
    assert bug_line(buggy.address, name) in err
    assert code == (3 if name == "ca_series" else 0), err    # a metrics bug is said after
    assert (out / "fullchain.pem").exists() and "Traceback" not in err
    metrics = prom.read_text()
    assert source_metric(metrics, "certgrab_source_fetch_success", good.address) == 1
    if name != "ca_series":
        assert source_metric(metrics, "certgrab_leaf_revoked", good.address) == 0


# ---------------------------------------------------------------- 10. the docs

def test_docs_explain_every_cause(certgrab):
    """docs/revocation.md names every code a decision or a report may carry."""
    with open(os.path.join(ROOT, "docs", "revocation.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [cause for cause in certgrab.CRL_CAUSES + certgrab.ARI_CAUSES
               if "`%s`" % cause not in text]
    assert missing == []
    assert "\n# Revocation and renewal windows\n" in "\n" + text
