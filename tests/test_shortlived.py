"""Short-lived certificates (issue 14): thresholds that scale with the lifetime, hours in the
messages, and leaves like the 2026 profiles' (no CN, no SKID, only an IP SAN, P-384 above).

    1. --check at issue, at certbot's renewal point and past it, for 6, 45 and 90-day leaves,
       with the default thresholds (docs/certificates.md's table of them: test_docs.py)
    2. --warn/--crit as durations and shares, the --warn-days/--crit-days forms, bad values
    3. hours and ages in --check, --text, perfdata in seconds, --json lifetime and seconds left
    4. a no-CN, IP-only leaf under a P-384 chain: fetched, installed, checked and described
"""

import json
import re

import pytest

from helpers import CRITICAL, OK, WARNING, assert_verifies
from make_certs import DAY, HOUR
from profiles import make_profile_chain, renewal_left
from servers import TLSServer

PROFILES = {"6-day (shortlived)": 6 * DAY, "160-hour (shortlived, exact)": 160 * HOUR,
            "45-day (tlsserver)": 45 * DAY, "90-day (classic)": 90 * DAY}
STATUS = {"OK": OK, "WARNING": WARNING, "CRITICAL": CRITICAL}


def check(run, directory, *options):
    """--check on the chain's fullchain.pem: (exit code, status line of the source)."""
    result = run("--check", directory / "fullchain.pem", *options)
    assert len(result.out.splitlines()) == 2, result.out + result.err
    return result.rc, result.out.splitlines()[1]


# ---------------------------------------------------------------- 1. defaults per lifetime

@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_fresh_from_its_ca_is_ok(run, tmp_path, profile):
    lifetime = PROFILES[profile]
    rc, line = check(run, make_profile_chain(tmp_path, lifetime, lifetime - 60))
    assert rc == 0, line
    assert "the leaf issued 1 minute ago" in line


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_ok_at_and_just_past_the_renewal_point(run, tmp_path, profile):
    """certbot renews at a third of the lifetime left (half under 10 days); a run or two
    late is still no alarm."""
    lifetime = PROFILES[profile]
    for left in (renewal_left(lifetime), renewal_left(lifetime) - lifetime * 0.05):
        rc, line = check(run, make_profile_chain(tmp_path / str(left), lifetime, left))
        assert rc == 0, line


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_overdue_renewal_warns_then_goes_critical(run, tmp_path, profile, certgrab):
    lifetime = PROFILES[profile]
    for share, status in ((certgrab.WARN_SHARE, "WARNING"), (certgrab.CRIT_SHARE, "CRITICAL")):
        rc, line = check(run, make_profile_chain(tmp_path / status, lifetime,
                                                 lifetime * share - 120))
        assert (rc, line.split(" - ")[0]) == (STATUS[status], status), line


def test_6_day_certificate_with_12_hours_left_is_critical(run, tmp_path):
    rc, line = check(run, make_profile_chain(tmp_path, 6 * DAY, 12 * HOUR))
    assert rc == 2
    assert re.search(r"the leaf expires in 11 hours \(\S+\), chain of 2 not verified, "
                     r"the leaf issued 5 days 12 hours ago$", line), line


def test_expired_short_lived_leaf_says_hours_ago(run, tmp_path):
    rc, line = check(run, make_profile_chain(tmp_path, 6 * DAY, -3 * HOUR - 60))
    assert rc == 2
    assert "the leaf EXPIRED 3 hours ago" in line


# ---------------------------------------------------------------- 2. forms and bad values

@pytest.mark.parametrize("left, status", [(40 * HOUR, "OK"), (30 * HOUR, "WARNING"),
                                          (12 * HOUR, "CRITICAL")])
def test_warn_as_a_duration_crit_as_a_share(run, tmp_path, left, status):
    """6 days: --crit 10% is 14.4 hours."""
    rc, line = check(run, make_profile_chain(tmp_path, 6 * DAY, left), "--warn", "36h",
                     "--crit", "10%")
    assert (rc, line.split(" - ")[0]) == (STATUS[status], status), line


@pytest.mark.parametrize("options, status", [
    (["--warn-days", "14"], "WARNING"),                 # 10 days left of 90; crit 10% = 9 days
    (["--warn-days", "14", "--crit-days", "11"], "CRITICAL"),
    (["--warn", "2d", "--crit", "90m"], "OK"),
    (["--warn", "241h"], "WARNING"),
    (["--crit", "14401m"], "CRITICAL"),
    (["--warn", "12%", "--crit", "864001s"], "CRITICAL"),
])
def test_old_and_new_forms(run, tmp_path, options, status):
    rc, line = check(run, make_profile_chain(tmp_path, 90 * DAY, 10 * DAY), *options)
    assert (rc, line.split(" - ")[0]) == (STATUS[status], status), line


@pytest.mark.parametrize("options", [
    ["--warn", "36"], ["--warn", "x"], ["--crit=-1h"], ["--crit", "101%"], ["--warn", "h"],
    ["--warn", "nan%"], ["--crit", "1e999d"], ["--warn", "%"], ["--warn", "3w"],
    ["--warn", "36h", "--warn-days", "2"], ["--crit-days", "soon"], ["--crit-days=-1"],
])
def test_bad_thresholds_are_usage_errors(run, tmp_path, options):
    chain = make_profile_chain(tmp_path, 6 * DAY, 3 * DAY)
    result = run("--check", chain / "fullchain.pem", *options)
    assert result.rc == 3
    flag = options[0].split("=")[0]
    assert result.out.startswith("CERTGRAB UNKNOWN - %s" % flag), result.out
    assert result.err.startswith("certgrab: %s" % flag)
    result = run("--text", chain / "fullchain.pem", *options)
    assert result.rc == 2, result.err


def test_bad_threshold_message_says_what_is_accepted(run, tmp_path):
    result = run("--check", "x.pem", "--warn", "36")
    assert "certgrab: --warn 36: give a duration such as 36h, 2d or 90m, or a share of the " \
           "certificate's lifetime such as 25%\n" in result.err


def test_intermediate_judged_by_its_own_lifetime(run, tmp_path, certgrab):
    """Shares apply to each certificate's own lifetime: with --warn 60%, the intermediate
    (half of its 10 years left) warns and is named, though the leaf (two thirds of its 90
    days left) expires first."""
    chain = make_profile_chain(tmp_path, 90 * DAY, 60 * DAY + 60)
    rc, line = check(run, chain)
    assert rc == 0, line
    assert "the leaf expires in 60 days" in line     # the intermediates last years here
    rc, line = check(run, chain, "--warn", "60%")
    assert rc == 1 and "intermediate O=certgrab tests Y, CN=certgrab test YE1" in line, line


# ---------------------------------------------------------------- 3. hours, perfdata, JSON

@pytest.mark.parametrize("seconds, text", [
    (8435 * DAY + 5 * HOUR, "8435 days"), (7 * DAY + 5 * HOUR, "7 days"),
    (2 * DAY + 5 * HOUR + 59, "2 days 5 hours"), (DAY + HOUR, "1 day 1 hour"),
    (3 * DAY + 59, "3 days"), (14 * HOUR + 3599, "14 hours"), (35 * 60 + 1, "35 minutes"),
    (59, "0 minutes"), (-3 * HOUR, "3 hours"),
])
def test_spans_for_people(certgrab, seconds, text):
    assert certgrab.format_span(seconds) == text


def test_perfdata_in_seconds_with_the_leaf_age(run, tmp_path):
    chain = make_profile_chain(tmp_path, 6 * DAY, 2 * DAY)
    result = run("--check", chain / "fullchain.pem", "--warn", "36h")
    label = str(chain / "fullchain.pem")
    match = re.search(r" \| 'expires_in %s'=(\d+)s;129600:;51840: 'age %s'=(\d+)s$"
                      % (re.escape(label), re.escape(label)), result.out.splitlines()[0])
    assert match, result.out
    assert abs(int(match.group(1)) - 2 * DAY) <= 2 and abs(int(match.group(2)) - 4 * DAY) <= 2


def test_text_shows_age_and_hours(run, tmp_path):
    chain = make_profile_chain(tmp_path, 6 * DAY, 2 * DAY + 5 * HOUR + 30)
    out = run("--text", chain / "fullchain.pem").out
    assert re.search(r"from +\S+ \(issued 3 days 18 hours ago\)", out), out
    assert re.search(r"until +\S+ \(expires in 2 days 5 hours\)", out), out


def test_json_gains_lifetime_and_seconds_left(run, tmp_path):
    chain = make_profile_chain(tmp_path, 6 * DAY, 14 * HOUR)
    leaf = json.loads(run("--json", chain / "fullchain.pem").out)[0]["chain"][0]
    assert leaf["lifetime_seconds"] == 6 * DAY
    assert abs(leaf["seconds_left"] - 14 * HOUR) <= 2
    assert list(leaf)[:13] == ["subject", "issuer", "serial", "sans", "key", "key_bits",
                               "signature_algorithm", "not_before", "not_after", "sha256",
                               "spki_sha256", "spki_pin", "is_ca"], "existing fields unchanged"


# ---------------------------------------------------------------- 4. the profiles' leaves

@pytest.fixture
def ip_leaf(tmp_path, started):
    """A 6-day IP-only leaf, issued an hour ago, served on 127.0.0.1 with its P-384 chain."""
    chain = make_profile_chain(tmp_path / "chain", 6 * DAY, 6 * DAY - HOUR + 60)
    server = started(TLSServer(chain / "fullchain.pem", chain / "key.pem"))
    return chain, server


def test_ip_leaf_is_fetched_verified_and_described(run, ip_leaf):
    chain, server = ip_leaf
    result = run(server.address, "--cafile", chain / "root.pem")
    assert result.rc == 0, result.err
    assert result.out == (chain / "fullchain.pem").read_text()
    text = run(server.address, "--cafile", chain / "root.pem", "--text").out
    assert "verification: OK" in text
    assert "[0] subject  (empty: see SANs)\n" in text and "SANs     127.0.0.1\n" in text
    assert "key      EC P-384 (384 bits)" in text, "the intermediate's P-384 key"
    data = json.loads(run(server.address, "--cafile", chain / "root.pem", "--json").out)[0]
    assert (data["verified"], data["chain"][0]["subject"], data["chain"][0]["sans"]) == \
        (True, "", ["127.0.0.1"])


def test_ip_leaf_is_checked(run, ip_leaf):
    chain, server = ip_leaf
    result = run("--check", server.address, "--cafile", chain / "root.pem")
    assert result.rc == 0, result.out
    assert re.match(r"OK - %s: the leaf expires in 5 days 23 hours \(\S+\), chain of 2 "
                    r"verified, the leaf issued 59 minutes ago$" % server.address,
                    result.out.splitlines()[1]), result.out
    result = run("--same", server.address, chain / "fullchain.pem", "--cafile",
                 chain / "root.pem")
    assert result.rc == 0, result.out


def test_ip_leaf_is_installed_with_its_ip_for_the_hook(run, ip_leaf, tmp_path):
    chain, server = ip_leaf
    live, env_file = tmp_path / "live", tmp_path / "hook-env"
    result = run(server.address, "--cafile", chain / "root.pem", "--key-path",
                 chain / "key.pem", "--out-dir", live, "--deploy-hook", 'env > "%s"' % env_file)
    assert result.rc == 0, result.err
    assert (live / "fullchain.pem").read_text() == (chain / "fullchain.pem").read_text()
    assert_verifies(chain / "root.pem", live)
    assert re.search(r"^certgrab: installed the chain from %s \(serial \w+ issued \S+, "
                     r"expires \S+; expires in 5 days 23 hours\): " % server.address,
                     result.err, re.M), result.err
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert env["RENEWED_DOMAINS"] == "127.0.0.1"


def test_ip_leaf_named_by_its_san_where_a_subject_would_be(run, ip_leaf, tmp_path):
    """-v lists each certificate by name; an out-of-order extra names the leaf by its SAN."""
    chain, server = ip_leaf
    result = run("-v", server.address, "--cafile", chain / "root.pem")
    assert "0 (no subject) SAN 127.0.0.1 (issuer O=certgrab tests Y, CN=certgrab test YE1)" \
        in result.err, result.err
    leaf = (chain / "cert.pem").read_text()
    odd = tmp_path / "odd.pem"
    odd.write_text((chain / "chain.pem").read_text() + leaf + leaf)
    result = run("--text", odd)
    assert "unrelated or duplicate certificate(s) were included: (no subject) SAN 127.0.0.1" \
        in result.out, result.out


def test_chain_order_without_key_identifiers(certgrab, tmp_path):
    """The leaf has no SKID; the path is built from names (and AKIs where both exist)."""
    chain = make_profile_chain(tmp_path, 6 * DAY, DAY)
    ders = certgrab.pem_to_ders((chain / "chain.pem").read_text()
                                + (chain / "cert.pem").read_text())
    certs = certgrab.parse_chain(list(reversed(ders)), "test")
    assert certs[0].ski is None
    path, problems = certgrab.chain_from_names(certs)
    assert [c.der for c in path] == [c.der for c in certs]
    assert problems == []
