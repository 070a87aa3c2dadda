"""End to end with a real ACME CA (issue 11): a leader renews with certbot from pebble, over
HTTP-01 validated for real; followers keep their copies in sync with certgrab.

The module is a scenario, in order, on one leader (see acme.py for the machinery):
  1. three followers sync: the leader's files, the hook once each; a rerun changes nothing
  2. the leader renews with its key (--reuse-key): followers install the newer leaf, their
     hooks run once more, and --check --same over the leader and the followers' own nginx
     goes from CRITICAL (diverged) to OK
  3. the leader renews with a new key: followers holding the old key refuse it (exit 6) with
     the cause and the fix, their files and hooks untouched, and the monitoring says
     CRITICAL; once the new key is listed as a second --key-path, each follower installs the
     certificate with that key as privkey.pem, its hook runs once, and --check --same and
     --expect-file (whole chains) say OK again
  4. a copy of the leader's certbot lineage as a follower's --out-dir: certgrab replaces the
     archive/ files that certbot's live/ links point to, the links stay, and `certbot
     certificates` reads the new certificate through them
Each test first brings the followers up to date, so that it also runs on its own.
"""

import os
import shutil
import subprocess

import pytest

pytest.register_assert_rewrite("acme")  # before the import: acme is also a plugin (below)
import acme  # noqa: E402
from helpers import (CRITICAL, OK, OUT_FILES, REFUSED, assert_refused,  # noqa: E402
                     assert_verifies, entries, error_lines, files_ders, serial_hex, snapshot,
                     temp_files)
from make_certs import NAME, read_ders  # noqa: E402

pytest_plugins = ["acme"]

FOLLOWERS = 3
WITH_KEY = sorted(OUT_FILES + ["privkey.pem"])  # what --out-dir --privkey holds
REUSE_KEY_HINT = ("certgrab: hint: the renewing machine likely made a new key: renew there "
                  "with --reuse-key (certbot, lego), or copy its new key here and add it as "
                  "another --key-path (README: key rollover)")


@pytest.fixture(scope="module")
def followers(leader):
    """Machines that got a copy of the leader's key once, when they were set up."""
    key = acme.read_text(leader.certbot.live("privkey.pem"))
    return [acme.Follower(os.path.join(leader.workdir, "followers"), "follower%d" % i, key)
            for i in range(1, FOLLOWERS + 1)]


@pytest.fixture
def follower_nginx(run, followers, leader, pebble, started, request):
    """The followers brought up to date, then nginx serving each follower's installed
    fullchain.pem and privkey.pem, one port each."""
    sync_all(run, leader, pebble, followers)
    sites = [(f.file("fullchain.pem"), f.file("privkey.pem")) for f in followers]
    return started(acme.Nginx(leader.workdir, "nginx-" + request.node.name, sites=sites))


def sync_all(run, leader, pebble, followers):
    """Every follower's cron job once; each must succeed."""
    for follower in followers:
        result = run(*follower.sync_args(leader, pebble))
        assert result.rc == 0, (follower.dir, result.err)


def check_same(run, leader, pebble, follower_nginx):
    return run("--check", "--same", leader.address, *follower_nginx.addresses(),
               "-n", NAME, "--cafile", pebble.root_pem)


def assert_converged(run, leader, pebble, followers, follower_nginx):
    """Once the followers' nginx reloaded: --check --same is OK over the leader and the
    followers, and each follower's fullchain.pem is what the leader serves."""
    follower_nginx.reload()
    converged = check_same(run, leader, pebble, follower_nginx)
    assert converged.rc == OK, converged.out + converged.err
    for follower in followers:
        result = run(leader.address, "-n", NAME, "--cafile", pebble.root_pem,
                     "--check", "--expect-file", follower.file("fullchain.pem"))
        assert result.rc == OK, result.out + result.err
        assert result.out.startswith("CERTGRAB OK"), result.out


def test_followers_install_the_leaders_chain(run, leader, pebble, followers):
    assert leader.validations() >= 1, "pebble validated HTTP-01 against the leader"
    want = leader.files()
    assert want["chain.pem"][-1] == pebble.intermediate_der(), \
        "certbot's chain.pem ends with pebble's intermediate"
    assert read_ders(pebble.root_pem)[0] not in want["fullchain.pem"], "the root is not served"
    for follower in followers:
        result = run(*follower.sync_args(leader, pebble))
        assert result.rc == 0, result.err
        assert files_ders(follower.out) == want, "cert = leaf, chain = intermediate(s)"
        assert_verifies(pebble.root_pem, follower.out)
        assert entries(follower.out) == WITH_KEY and not temp_files(follower.out)
        assert acme.read_text(follower.file("privkey.pem")) == acme.read_text(follower.key)
        assert follower.hook_runs() == [follower.out], "the hook ran once, with the lineage"
    for follower in followers:
        before = snapshot(follower.out)
        again = run(*follower.sync_args(leader, pebble))
        assert again.rc == 0, again.err
        assert snapshot(follower.out) == before, "a rerun touches nothing"
        assert len(follower.hook_runs()) == 1, "and runs no hook"


def test_renewal_with_the_same_key_reaches_every_follower(run, leader, pebble, followers,
                                                           follower_nginx):
    assert check_same(run, leader, pebble, follower_nginx).rc == OK
    hooks = [len(f.hook_runs()) for f in followers]
    key = acme.read_text(leader.certbot.live("privkey.pem"))
    old = acme.pem_fields(leader.certbot.live("cert.pem"))
    validations = leader.validations()

    leader.renew("--reuse-key")

    assert leader.validations() > validations, "pebble fetched a new HTTP-01 token"

    assert acme.read_text(leader.certbot.live("privkey.pem")) == key, "certbot kept the key"
    new = acme.pem_fields(leader.certbot.live("cert.pem"))
    assert new["serial"] != old["serial"] and new["not_before"] > old["not_before"]
    diverged = check_same(run, leader, pebble, follower_nginx)
    assert diverged.rc == CRITICAL, diverged.out
    for follower, runs in zip(followers, hooks):
        result = run(*follower.sync_args(leader, pebble))
        assert result.rc == 0, result.err
        assert files_ders(follower.out) == leader.files()
        assert_verifies(pebble.root_pem, follower.out)
        assert acme.pem_fields(follower.file("cert.pem"))["sha256"] == new["sha256"]
        assert len(follower.hook_runs()) == runs + 1, "the hook ran once more"
        again = run(*follower.sync_args(leader, pebble))
        assert again.rc == 0 and len(follower.hook_runs()) == runs + 1, again.err
    assert_converged(run, leader, pebble, followers, follower_nginx)


def test_renewal_with_a_new_key_is_refused_by_followers(run, leader, pebble, followers,
                                                        follower_nginx):
    old_key = acme.read_text(leader.certbot.live("privkey.pem"))

    # certbot 2.1 keeps reuse_key = True in the renewal configuration once given; --new-key
    # makes one new key anyway (--no-reuse-key would also unset the setting).
    leader.renew("--new-key")

    assert acme.read_text(leader.certbot.live("privkey.pem")) != old_key, "a new key"
    new = acme.pem_fields(leader.certbot.live("cert.pem"))
    for follower in followers:
        before, runs = snapshot(follower.out), follower.hook_runs()
        result = run(*follower.sync_args(leader, pebble))
        line = assert_refused(result, REFUSED)
        assert line.startswith("certgrab: %s: refused the leaf serial %s issued " % (
            leader.address, serial_hex(new["serial"]))), line
        assert error_lines(result.err) + [REUSE_KEY_HINT] == result.err.splitlines()
        assert snapshot(follower.out) == before, "the files are unchanged"
        assert follower.hook_runs() == runs, "no hook"
    result = check_same(run, leader, pebble, follower_nginx)
    assert result.rc == CRITICAL, result.out
    for follower in followers:
        result = run(leader.address, "-n", NAME, "--cafile", pebble.root_pem,
                     "--check", "--expect-file", follower.file("fullchain.pem"))
        assert result.rc == CRITICAL, result.out + result.err

    # The fix the message gives: the new key, copied to every follower, listed as well.
    new_key = acme.read_text(leader.certbot.live("privkey.pem"))
    for follower in followers:
        runs = len(follower.hook_runs())
        listed = os.path.join(follower.dir, "next.pem")
        acme.write_file(listed, new_key, mode=0o600)
        result = run(*follower.sync_args(leader, pebble, "--key-path", listed))
        assert result.rc == 0, result.err
        assert files_ders(follower.out) == leader.files()
        assert_verifies(pebble.root_pem, follower.out)
        assert acme.read_text(follower.file("privkey.pem")) == new_key, "the matching key"
        assert len(follower.hook_runs()) == runs + 1, "the hook ran once"
    assert_converged(run, leader, pebble, followers, follower_nginx)


def test_a_certbot_lineage_as_the_output_keeps_its_links(run, leader, pebble, tmp_path):
    """A machine that renewed with certbot and now follows: --out-dir is certbot's live/
    directory, whose files are links into archive/ (issue 19: links root owns, in
    directories only root can change, are followed). The archive files the links point to
    get the new certificate, the links stay, and certbot itself reads the lineage."""
    config = str(tmp_path / "config")
    shutil.copytree(leader.certbot.dir("config"), config, symlinks=True)
    renewal = os.path.join(config, "renewal", NAME + ".conf")
    acme.write_file(renewal, acme.read_text(renewal).replace(leader.certbot.dir("config"),
                                                              config))
    live, archive = (os.path.join(config, part, NAME) for part in ("live", "archive"))
    links = dict((name, os.readlink(os.path.join(live, name)))
                 for name in OUT_FILES + ["privkey.pem"])
    archived = sorted(os.listdir(archive))
    leader.renew("--reuse-key")
    new = acme.pem_fields(leader.certbot.live("cert.pem"))

    result = run(leader.address, "-n", NAME, "--cafile", pebble.root_pem, "--out-dir", live,
                 "--key-path", os.path.join(live, "privkey.pem"), "--privkey")
    assert result.rc == 0, result.err
    assert files_ders(live) == leader.files()
    assert dict((name, os.readlink(os.path.join(live, name))) for name in links) == links
    assert entries(archive) == archived, "the linked files replaced, nothing added"
    certbot = subprocess.run([acme.CERTBOT, "certificates", "--config-dir", config,
                              "--work-dir", str(tmp_path / "work"), "--logs-dir",
                              str(tmp_path / "logs")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert certbot.returncode == 0, certbot.stdout
    assert "Serial Number: %x" % new["serial"] in certbot.stdout, certbot.stdout
    assert "INVALID" not in certbot.stdout, certbot.stdout
