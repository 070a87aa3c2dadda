"""Issue 21: renewal windows from ACME Renewal Information (ARI, RFC 9773).

    1. the certificate ID: RFC 9773's worked example, and pyca's reading of a real leaf
    2. a server written to RFC 9773 (ca_servers.AriServer): the window in --json, --text,
       --check (OK with it, CRITICAL once its end has passed) and --prometheus; a window whose
       end is not after its start, an unknown certificate, a directory without renewalInfo,
       an untrusted or unreachable server (WARNING, said as such); Retry-After kept in
       --cache-dir; an expired certificate is never asked about
    3. the real acme2certifier (PyPI), issuing with Debian's certbot: the window it suggests,
       and CRITICAL from one configured so that the window has passed
"""

import json
import os
import time

import pytest
from cryptography import x509

from ca_servers import (WINDOW_END, WINDOW_START, Acme2Certifier, AriServer, CrlCA, cert_id,
                        window)
from helpers import assert_only_certgrabs_perfdata, assert_promtool_accepts, grab
from make_certs import NAME
from servers import TLSServer, closed_port


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CrlCA(tmp_path_factory.mktemp("ari-ca"))


@pytest.fixture(scope="module")
def leaf(ca):
    return ca.leaf("ari-leaf", None)


@pytest.fixture
def ari(ca, started):
    api = ca.leaf("ari-api", None)
    return started(AriServer(os.path.join(api, "fullchain.pem"), os.path.join(api, "key.pem")))


@pytest.fixture
def source(leaf, started):
    return started(TLSServer(os.path.join(leaf, "fullchain.pem"), os.path.join(leaf, "key.pem")))


def ask(run, source, leaf, directory, *extra):
    return grab(run, source, leaf, "--acme-directory", directory, *extra)


def renewal(run, source, leaf, directory, *extra):
    result = ask(run, source, leaf, directory, "--json", *extra)
    assert result.rc == 0, result.err
    return json.loads(result.out)[0]["renewal_window"]


# ---------------------------------------------------------------- 1. the certificate ID

def test_cert_id_of_rfc_9773s_example(certgrab):
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert certgrab.ari_cert_id(aki, 0x0087654321) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("serial,octets", [(0x7F, "7f"), (0x80, "0080"), (0, "00"),
                                           (0xFF00, "00ff00"), (-1, "ff"), (-128, "80")])
def test_serial_octets_are_der_content_octets(certgrab, serial, octets):
    assert certgrab.serial_octets(serial).hex() == octets


def test_cert_id_of_a_real_leaf_is_pycas(run, ari, source, leaf):
    ari.answers[cert_id(leaf)] = window()
    assert renewal(run, source, leaf, ari.directory)["start"] == WINDOW_START
    assert ari.paths == ["/directory", "/renewal-info/" + cert_id(leaf)]


# ---------------------------------------------------------------- 2. an RFC 9773 server

def test_the_window_in_every_report(run, ari, source, leaf, tmp_path):
    ari.answers[cert_id(leaf)] = window(explanation="https://acme.example.test/why")
    assert renewal(run, source, leaf, ari.directory) == {
        "start": WINDOW_START, "end": WINDOW_END,
        "explanation_url": "https://acme.example.test/why", "cause": None, "detail": None}
    text = ask(run, source, leaf, ari.directory, "--text").out
    assert "  renewal:      the CA suggests renewing between %s and %s; see " \
           "https://acme.example.test/why" % (WINDOW_START, WINDOW_END) in text
    prom = tmp_path / "ari.prom"
    check = ask(run, source, leaf, ari.directory, "--check", "--prometheus", prom)
    assert check.rc == 0 and check.out.startswith("CERTGRAB OK"), check.out
    assert "renewal window %s to %s" % (WINDOW_START, WINDOW_END) in check.out
    metrics = prom.read_text()
    for name, stamp in (("start", WINDOW_START), ("end", WINDOW_END)):
        line = [l for l in metrics.splitlines()
                if l.startswith("certgrab_ari_window_%s_timestamp_seconds{" % name)]
        assert len(line) == 1
        assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(line[0].split()[-1]))) \
            == stamp
    assert_promtool_accepts(metrics)


def test_a_passed_window_is_critical(run, ari, source, leaf, tmp_path):
    """CRITICAL, with the CA's explanation URL: untrusted text, escaped ("|" never reaches
    --check's output but as certgrab's own perfdata separator)."""
    ari.answers[cert_id(leaf)] = window(start="2026-01-01T00:00:00Z", end="2026-01-02T00:00:00Z",
                                        explanation="https://x.test/why|'expires_in x'=1s")
    check = ask(run, source, leaf, ari.directory, "--check")
    assert check.rc == 2 and check.out.startswith("CERTGRAB CRITICAL"), check.out
    assert "renewal window ended" in check.out and "the renewing machine did not renew" in \
        check.out
    assert "; the CA says why at https://x.test/why\\x7c'expires_in x'=1s" in check.out
    assert_only_certgrabs_perfdata(check.out, [source.address])
    install = ask(run, source, leaf, ari.directory, "--out-dir", tmp_path / "live")
    assert install.rc == 0
    assert "the CA asked for the leaf to be replaced by 2026-01-02T00:00:00Z (ARI)" in install.err


@pytest.mark.parametrize("answer,cause,words", [
    (window(start=WINDOW_END, end=WINDOW_START), "bad-window", "is not after its start"),
    (window(start=WINDOW_START, end=WINDOW_START), "bad-window", "is not after its start"),
    ((200, b'{"suggestedWindow": {"start": "yesterday", "end": "2099-01-01T00:00:00Z"}}', {}),
     "bad-answer", "not an RFC 3339 date-time"),
    ((200, b'{"suggestedWindow": ', {}), "bad-answer", "malformed JSON"),
    ((200, b"[" * 30 + b"]" * 30, {}), "bad-answer", "nested more than"),
    ((500, b"{}", {}), "http-status", "HTTP status 500"),
    (None, "unknown-certificate", "HTTP status 404"),
], ids=["reversed", "empty", "bad-date", "cut-short", "too-deep", "server-error", "unknown"])
def test_an_answer_certgrab_cannot_use_is_a_warning(run, ari, source, leaf, answer, cause,
                                                    words):
    if answer:
        ari.answers[cert_id(leaf)] = answer
    found = renewal(run, source, leaf, ari.directory)
    assert (found["start"], found["cause"]) == (None, cause) and words in found["detail"]
    check = ask(run, source, leaf, ari.directory, "--check")
    assert check.rc == 1 and "cannot ask the CA for the renewal window (ARI)" in check.out


def test_a_directory_without_renewal_info_says_the_ca_offers_no_ari(run, ca, source, leaf,
                                                                    started):
    api = ca.leaf("ari-api-old", None)
    old = started(AriServer(os.path.join(api, "fullchain.pem"), os.path.join(api, "key.pem")))
    old.directory_body = b'{"newNonce": "https://127.0.0.1/nonce"}'
    found = renewal(run, source, leaf, old.directory)
    assert found["cause"] == "no-ari" and "this CA offers no ARI" in found["detail"]


def test_an_untrusted_ari_server_is_a_warning(run, certs, source, leaf, started):
    other = certs / "ipsan"     # IP:127.0.0.1, under another root than --cafile's
    server = started(AriServer(other / "fullchain.pem", other / "key.pem"))
    found = renewal(run, source, leaf, server.directory)
    assert found["cause"] == "untrusted"
    assert "the server's certificate does not verify" in found["detail"]
    check = ask(run, source, leaf, server.directory, "--check")
    assert check.rc == 1 and check.out.startswith("CERTGRAB WARNING")
    assert server.paths == []


def test_an_unreachable_ari_server_is_a_warning(run, source, leaf):
    with closed_port() as port:
        directory = "https://127.0.0.1:%d/directory" % port
        found = renewal(run, source, leaf, directory)
        check = ask(run, source, leaf, directory, "--check")
    assert found["cause"] == "unreachable" and "cannot connect" in found["detail"]
    assert check.rc == 1 and "cannot ask the CA for the renewal window" in check.out


def test_retry_after_is_kept_in_the_cache_dir(run, ari, source, leaf, tmp_path):
    ari.answers[cert_id(leaf)] = window(retry_after="3600")
    for _ in range(3):
        assert renewal(run, source, leaf, ari.directory, "--cache-dir",
                       tmp_path / "cache")["start"] == WINDOW_START
    assert ari.paths == ["/directory", "/renewal-info/" + cert_id(leaf)]
    assert renewal(run, source, leaf, ari.directory)["start"] == WINDOW_START   # no cache: asked
    assert len(ari.paths) == 4


def test_an_expired_certificate_is_never_asked_about(run, certs, ari):
    result = run(certs / "expired" / "cert.pem", "--json", "--acme-directory", ari.directory)
    found = json.loads(result.out)[0]["renewal_window"]
    assert found["cause"] == "expired" and found["start"] is None
    assert ari.paths == []


def test_acme_directory_must_be_https(run):
    result = run("127.0.0.1", "--acme-directory", "http://acme.example.test/directory")
    assert result.rc == 2 and "--acme-directory" in result.err and "https://" in result.err


# ---------------------------------------------------------------- 3. acme2certifier

@pytest.fixture(scope="module")
def a2c_ca(tmp_path_factory):
    return CrlCA(tmp_path_factory.mktemp("a2c-ca"))


def _acme2certifier(tmp_path_factory, ca, name, renewal_lines):
    server = Acme2Certifier(tmp_path_factory.mktemp(name), ca, renewal_lines)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return server


@pytest.fixture(scope="module")
def a2c(tmp_path_factory, a2c_ca):
    server = _acme2certifier(tmp_path_factory, a2c_ca, "a2c",
                             "renewalthreshold_pctg: 85\nretry_after_timeout: 3600")
    yield server
    server.stop()


def _served(started, live):
    return started(TLSServer(os.path.join(live, "fullchain.pem"),
                             os.path.join(live, "privkey.pem")))


def test_acme2certifiers_window_for_a_certbot_certificate(run, a2c, a2c_ca, started, tmp_path):
    live = a2c.issue(tmp_path / "certbot")
    with open(os.path.join(live, "cert.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    issued, expires = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    result = run(_served(started, live).address, "-n", NAME, "--cafile", a2c_ca.root_pem,
                 "--acme-directory", a2c.directory, "--json")
    assert result.rc == 0, result.err
    found = json.loads(result.out)[0]["renewal_window"]
    start = time.mktime(time.strptime(found["start"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    end = time.mktime(time.strptime(found["end"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    # acme2certifier: from 85% of the lifetime to the end (its renewalthreshold_pctg)
    assert abs(start - (issued + 0.85 * (expires - issued))) < 120, (found, issued, expires)
    assert abs(end - expires) < 120 and found["cause"] is None
    check = run(_served(started, live).address, "-n", NAME, "--cafile", a2c_ca.root_pem,
                "--acme-directory", a2c.directory, "--check")
    assert check.rc == 0 and "renewal window %s to %s" % (found["start"], found["end"]) \
        in check.out, check.out
    assert "GET /acme/renewal-info/%s HTTP/1.1" % cert_id(live) in a2c.log_text(tail=None)


def test_acme2certifier_with_a_passed_window_is_critical(run, tmp_path_factory, a2c_ca, started,
                                                         tmp_path):
    """Configured to suggest a one-second window from the issue on: it has passed."""
    overdue = _acme2certifier(tmp_path_factory, a2c_ca, "a2c-overdue",
                              "renewalthreshold_pctg: 0\nrenewal_window_duration: 1s\n"
                              "retry_after_timeout: 3600")
    try:
        live = overdue.issue(tmp_path / "certbot")
        time.sleep(1.5)
        check = run(_served(started, live).address, "-n", NAME, "--cafile", a2c_ca.root_pem,
                    "--acme-directory", overdue.directory, "--check")
    finally:
        overdue.stop()
    assert check.rc == 2, check.out
    assert "renewal window ended" in check.out and "the renewing machine did not renew" in \
        check.out
