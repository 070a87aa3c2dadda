"""One source never ends the run, and untrusted text never writes perfdata (issue 19, 1 and 5).

A hostile certificate: OpenSSL accepts a subject attribute whose OID has an arc of 5,000
digits, and verifies it (root-ec issued it here; a man in the middle needs no trusted
certificate at all, since certgrab reads the chain before it reports the verification).
Python 3.11+ refuses to turn such an int into text. Served beside a good source, it must
be that source's error only:

  * an install still installs the good chain (exit 0, the hostile source warned about);
  * --check prints its status line and names the hostile source; --json reports both;
  * the --prometheus file is written, --config prints its summary, --syslog logs its line.

A bug, injected by replacing one function for one source (the only mock here: a real bug
cannot be ordered), is that source's "internal error ... please report it": exit 3 (under
--check that source is UNKNOWN, and CRITICAL outranks it), the traceback only under -v,
and the other sources, the status line, the metrics file and the summary still happen. A
bug outside any one source is the run's: exit 1, one line, metrics and sections still.

Certificate names and STARTTLS replies holding "|" never reach --check's output as "|":
only certgrab's own separator stands before the perfdata, which is certgrab's alone.
"""

import hashlib
import os

import pytest

from helpers import (CRITICAL, FETCH, INTERNAL, UNKNOWN, assert_only_certgrabs_perfdata,
                     bug_line, call_main, error_lines, expected, files_ders, inject_bug,
                     received, run_with_dev_log, source_metric)
from make_certs import NAME, make_dated_chain, openssl, pem_ders, read_ders
from servers import TLSServer, closed_port

HUGE_ARC = "9" * 5000          # digits: Python 3.11+ prints ints of at most 4,300
OID_ERROR = "certificate 1 of 1: malformed certificate: an object identifier of"
EVIL = "x | 'expires_in evil'=999999999s;1:;1:"    # a name that writes perfdata if let

HOSTILE_CONFIG = """\
oid_section = new_oids
[ new_oids ]
hostile = 1.2.3.{arc}
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
O = certgrab tests
CN = hostile leaf
hostile = x
[ leaf ]
subjectAltName = DNS:{name},IP:127.0.0.1
basicConstraints = critical, CA:FALSE
"""


@pytest.fixture(scope="module")
def hostile_pem(certs, tmp_path_factory):
    """A leaf with the 5,000-digit OID arc in its subject, for ec1's key, issued by
    root-ec: OpenSSL verifies it."""
    work = tmp_path_factory.mktemp("hostile")
    config = work / "hostile.cnf"
    config.write_text(HOSTILE_CONFIG.format(arc=HUGE_ARC, name=NAME))
    openssl("req", "-new", "-config", config, "-key", certs / "ec1" / "key.pem",
            "-out", work / "hostile.csr")
    openssl("x509", "-req", "-in", work / "hostile.csr", "-CA", certs / "root-ec" / "cert.pem",
            "-CAkey", certs / "root-ec" / "key.pem", "-days", "3650", "-extfile", config,
            "-extensions", "leaf", "-out", work / "hostile.pem")
    openssl("verify", "-CAfile", certs / "root-ec" / "cert.pem", work / "hostile.pem")
    return work / "hostile.pem"


@pytest.fixture
def two(certs, hostile_pem, started):
    """(hostile server, good server): both serve ec1's key, the first the hostile leaf."""
    return (started(TLSServer(hostile_pem, certs / "ec1" / "key.pem")),
            started(TLSServer(certs / "ec1" / "fullchain.pem", certs / "ec1" / "key.pem")))


def sources(servers, certs):
    return [server.address for server in servers] + [
        "-n", NAME, "--cafile", certs / "root-ec" / "cert.pem"]


# A hostile certificate beside a good source ---------------------------------------------------

def test_install_takes_the_good_source_and_writes_the_metrics(run, certs, two, tmp_path):
    hostile, good = two
    prom = tmp_path / "certgrab.prom"
    result = run(*sources(two, certs) + ["--out-dir", tmp_path / "out", "--prometheus", prom])
    assert result.rc == 0, result.err
    assert files_ders(tmp_path / "out") == expected(certs, "ec1")
    assert "certgrab: warning: %s: %s 2375 bytes, more than 63 (skipped)" % (
        hostile.address, OID_ERROR) in result.err
    assert "installed the chain from %s" % good.address in result.err
    metrics = prom.read_text()
    assert source_metric(metrics, "certgrab_source_fetch_success", hostile.address) == 0
    assert source_metric(metrics, "certgrab_source_fetch_success", good.address) == 1
    assert 'certgrab_install_outcome{run="certgrab",outcome="installed"} 1' in metrics


def test_check_names_the_hostile_source_and_reports_the_good(run, certs, two):
    hostile, good = two
    result = run("--check", *sources(two, certs))
    assert result.rc == CRITICAL, result.err
    first, *rest = result.out.splitlines()
    assert first.startswith("CERTGRAB CRITICAL - 2 source(s): 1 OK, 1 CRITICAL; first: %s: %s"
                            % (hostile.address, OID_ERROR)), first
    assert first.split(" | ")[1].startswith("'expires_in %s'=" % good.address)
    assert rest[0].startswith("CRITICAL - %s: %s" % (hostile.address, OID_ERROR))
    assert rest[1].startswith("OK - %s: the leaf expires in" % good.address)
    report = run("--json", *sources(two, certs))
    assert report.rc == FETCH
    assert '"error": "%s: %s' % (hostile.address, OID_ERROR) in report.out
    assert '"subject": "O=certgrab tests, CN=ec1 leaf"' in report.out


def test_config_summary_names_the_hostile_section(run, certs, two, tmp_path):
    hostile, good = two
    config = tmp_path / "c.conf"
    config.write_text(
        "[DEFAULT]\nservername = %s\ncafile = %s\n[hostile]\nsource = %s\nout-dir = %s\n"
        "[both]\nsource = %s %s\nout-dir = %s\n" % (
            NAME, certs / "root-ec" / "cert.pem", hostile.address, tmp_path / "h",
            hostile.address, good.address, tmp_path / "both"))
    result = run("--config", config)
    assert result.rc == FETCH, result.err
    assert error_lines(result.err)[-1] == "certgrab: 1 of 2 sections failed: hostile (exit 3)"
    assert "certgrab: [hostile] %s: %s" % (hostile.address, OID_ERROR) in result.err
    assert files_ders(tmp_path / "both") == expected(certs, "ec1")
    assert not (tmp_path / "h").exists()


def test_syslog_line_is_logged(certs, two, tmp_path, syslog_socket):
    directory, sock = syslog_socket
    hostile, good = two
    done = run_with_dev_log(directory, *sources(two, certs) + [
        "--out-dir", tmp_path / "out", "--syslog"])
    assert done.returncode == 0, done.stderr
    lines = received(sock)
    leaf = read_ders(certs / "ec1" / "cert.pem")[0]
    assert len(lines) == 1, lines
    assert ": %s from %s %s: installed sha256:%s from %s; exit 0; " % (
        NAME, hostile.address, good.address, hashlib.sha256(leaf).hexdigest(),
        good.address) in lines[0], lines


# A bug in one source: its error, never the end of the run -------------------------------------

def test_a_bug_while_fetching_is_that_sources_internal_error(certgrab, capsys, certs, served,
                                                             monkeypatch, tmp_path):
    buggy, good = served("ec1"), served("ec1")
    inject_bug(monkeypatch, certgrab, "parse_chain", buggy.address)
    prom = tmp_path / "check.prom"
    argv = ["--check", buggy.address, good.address, "-n", NAME,
            "--cafile", certs / "ec1" / "root.pem", "--prometheus", prom]
    code, out, err = call_main(certgrab, capsys, *argv)
    assert code == UNKNOWN
    first, bad_line, good_line = out.splitlines()
    assert first.startswith("CERTGRAB UNKNOWN - 2 source(s): 1 OK, 1 UNKNOWN; first: %s | "
                            % bug_line(buggy.address, "parse_chain")), first
    assert bad_line == "UNKNOWN - " + bug_line(buggy.address, "parse_chain")
    assert good_line.startswith("OK - %s: the leaf expires in" % good.address)
    assert "Traceback" not in err
    assert source_metric(prom.read_text(), "certgrab_source_fetch_success", good.address) == 1

    code, out, err = call_main(certgrab, capsys, *argv + ["-v"])
    assert code == UNKNOWN
    assert "certgrab: %s: the internal error happened here:\nTraceback (most recent call " \
        "last):\n" % buggy.address in err
    assert "RuntimeError: injected bug in parse_chain" in err

    with closed_port() as port:
        dead = "127.0.0.1:%d" % port
        code, out, _ = call_main(certgrab, capsys, *[dead] + argv)
    assert code == CRITICAL                    # a failing source outranks one not checked
    assert out.startswith("CERTGRAB CRITICAL - 3 source(s): 1 OK, 1 CRITICAL, 1 UNKNOWN; "
                          "first: %s: cannot connect" % dead), out


def test_a_bug_in_the_gate_skips_that_source_even_quietly(certgrab, capsys, certs, served,
                                                          monkeypatch, tmp_path):
    buggy, good = served("ec1"), served("ec1")
    inject_bug(monkeypatch, certgrab, "check_gate", buggy.address)
    code, out, err = call_main(certgrab, capsys, buggy.address, good.address, "-n", NAME, "-q",
                               "--cafile", certs / "ec1" / "root.pem",
                               "--out-dir", tmp_path / "out")
    assert code == 0, err
    assert files_ders(tmp_path / "out") == expected(certs, "ec1")
    assert err == "certgrab: %s (skipped)\n" % bug_line(buggy.address, "check_gate")


@pytest.mark.parametrize("name, mode", [("text_lines", "--text"),
                                        ("source_json", "--json")])
def test_a_bug_while_reporting_is_that_sources_error(certgrab, capsys, certs, served,
                                                     monkeypatch, name, mode):
    buggy, good = served("ec1"), served("ec1")
    inject_bug(monkeypatch, certgrab, name, buggy.address)
    code, out, err = call_main(certgrab, capsys, mode, buggy.address, good.address, "-n", NAME,
                               "--cafile", certs / "ec1" / "root.pem")
    assert code == FETCH
    assert error_lines(err) == ["certgrab: " + bug_line(buggy.address, name)]
    assert out.count("CN=ec1 leaf") == 1                # the good source, whole
    assert bug_line(buggy.address, name) in out         # the buggy one, as its error


def test_a_bug_in_the_metrics_of_one_source(certgrab, capsys, certs, served, monkeypatch,
                                            tmp_path):
    buggy, good = served("ec1"), served("ec1")
    inject_bug(monkeypatch, certgrab, "source_series", buggy.address)
    prom = tmp_path / "m.prom"
    code, out, err = call_main(certgrab, capsys, buggy.address, good.address, "-n", NAME,
                               "--cafile", certs / "ec1" / "root.pem",
                               "--out-dir", tmp_path / "out", "--prometheus", prom)
    assert code == FETCH                                # the files are in; the bug is said
    assert files_ders(tmp_path / "out") == expected(certs, "ec1")
    assert error_lines(err)[-1] == "certgrab: " + bug_line(buggy.address, "source_series")
    metrics = prom.read_text()
    assert source_metric(metrics, "certgrab_source_fetch_success", buggy.address) == 0
    assert source_metric(metrics, "certgrab_source_fetch_success", good.address) == 1


def test_a_bug_outside_the_sources_is_the_runs_error(certgrab, capsys, certs, served,
                                                     monkeypatch, tmp_path):
    """After the newest chain is chosen nothing is one source's: the run fails with one
    line and exit 1 (as an uncaught exception's), the metrics still written, and
    --config's other sections still run."""
    server = served("ec1")

    def broken(*args):
        raise RuntimeError("injected bug in install_chain")

    monkeypatch.setattr(certgrab, "install_chain", broken)
    prom = tmp_path / "run.prom"
    code, out, err = call_main(certgrab, capsys, server.address, "-n", NAME, "--cafile",
                               certs / "ec1" / "root.pem", "--out-dir", tmp_path / "out",
                               "--prometheus", prom)
    assert code == INTERNAL
    assert error_lines(err) == ["certgrab: internal error in certgrab %s (RuntimeError: "
                                "injected bug in install_chain); please report it"
                                % certgrab.__version__]
    assert 'certgrab_install_outcome{run="run",outcome="failed"} 1' in prom.read_text()

    config = tmp_path / "c.conf"
    config.write_text("[DEFAULT]\nsource = %s\nservername = %s\ncafile = %s\n[files]\n"
                      "out-dir = %s\n[stdout]\n" % (server.address, NAME,
                                                    certs / "ec1" / "root.pem", tmp_path / "o"))
    code, out, err = call_main(certgrab, capsys, "--config", config)
    assert code == INTERNAL
    assert pem_ders(out) == read_ders(certs / "ec1" / "fullchain.pem")
    assert error_lines(err)[-1] == "certgrab: 1 of 2 sections failed: files (exit 1)"


# "|" from a certificate or a server never reaches --check's output as "|" ----------------------

@pytest.fixture(scope="module")
def evil_chain(certs, tmp_path_factory):
    """A chain whose intermediate is named EVIL (so its leaf's issuer is too), and the
    leaf something like it; the intermediate expires in 5 days, so --check names it."""
    return make_dated_chain(tmp_path_factory.mktemp("evil"), certs / "root-ec", "evil",
                            leaf_days=3650, intermediate_days=5,
                            leaf_subject=[("CN", "leaf | 'age evil'=1s")],
                            intermediate_subject=[("O", "certgrab tests"), ("CN", EVIL)])


def test_names_with_a_bar_never_write_perfdata(run, certs, evil_chain, started):
    chain = evil_chain
    whole = started(TLSServer(os.path.join(chain, "fullchain.pem"),
                              os.path.join(chain, "key.pem")))
    leaf_only = started(TLSServer(os.path.join(chain, "cert.pem"),
                                  os.path.join(chain, "key.pem")))
    result = run("--check", "--warn", "30d", whole.address, leaf_only.address, "-n", NAME,
                 "--cafile", os.path.join(chain, "root.pem"))
    assert result.rc == CRITICAL, result.out
    first = assert_only_certgrabs_perfdata(result.out, [whole.address, leaf_only.address])
    escaped = EVIL.replace("|", "\\x7c").replace(";", "\\x5c;")   # RFC 4514 escapes ";"
    assert 'issued by "O=certgrab tests, CN=%s"' % escaped in first      # the leaf's issuer
    assert "WARNING - %s: intermediate O=certgrab tests, CN=%s expires in 5 days" % (
        whole.address, escaped) in result.out
