"""Key rollover across a fleet (issue 11), end to end with pebble and certbot (see acme.py).

Issue 11's key rollover:
  - --key-path may be given twice (the current key and the next one): the leaf must match
    one of them, and with --out-dir and --privkey the matching key is installed as
    privkey.pem (0600) in the same atomic set as cert.pem, chain.pem and fullchain.pem
    (privkey.pem is written on request only; several --key-path need --privkey or
    --combined-path when installing);
  - a leaf matching neither key is refused (exit 6) with a message that says the leader
    "likely" renewed with a new key, names the refused leaf (serial) and suggests
    --reuse-key (certbot, lego).

The scenario: every follower holds the leader's current key and, ahead of time, the next
key. The leader then renews with the next key (certbot 2.1 cannot be handed a key for a
lineage: the archive file its live/privkey.pem points to is swapped, then `renew
--reuse-key` requests a certificate for it), and the followers install the new certificate
together with the next key. Last, the leader renews with a key nobody has (--new-key).
"""

import os
import stat

import pytest

pytest.register_assert_rewrite("acme")  # before the import: acme is also a plugin (below)
import acme  # noqa: E402
from helpers import (OUT_FILES, REFUSED, assert_verifies, entries, snapshot,  # noqa: E402
                     temp_files)
from make_certs import read_ders  # noqa: E402

pytest_plugins = ["acme"]

FOLLOWERS = 3
WITH_KEY = sorted(OUT_FILES + ["privkey.pem"])


@pytest.fixture(scope="module")
def next_key(leader):
    """The key the leader will renew with next, made ahead of time (PEM text)."""
    return acme.read_text(acme.new_key(os.path.join(leader.workdir, "next.pem")))


@pytest.fixture(scope="module")
def followers(leader, next_key):
    """Followers with a copy of the leader's current key (key.pem) and of the next key
    (next.pem)."""
    current = acme.read_text(leader.certbot.live("privkey.pem"))
    fleet = []
    for i in range(1, FOLLOWERS + 1):
        follower = acme.Follower(os.path.join(leader.workdir, "followers"),
                                 "follower%d" % i, current)
        acme.write_file(os.path.join(follower.dir, "next.pem"), next_key, mode=0o600)
        fleet.append(follower)
    return fleet


def sync_args(follower, leader, pebble):
    """The cron job of a follower during a rollover: both keys, and --privkey (privkey.pem
    is written on request only; several --key-path need it)."""
    return follower.sync_args(leader, pebble, "--key-path",
                              os.path.join(follower.dir, "next.pem"), "--privkey")


def assert_installed(follower, leader, key_pem):
    """The follower holds the leader's certificates and key_pem as privkey.pem (0600)."""
    assert entries(follower.out) == WITH_KEY and not temp_files(follower.out)
    for name, ders in leader.files().items():
        assert read_ders(follower.file(name)) == ders, name
    assert_verifies(leader.certbot.pebble.root_pem, follower.out)
    assert acme.read_text(follower.file("privkey.pem")) == key_pem, "the matching key"
    mode = stat.S_IMODE(os.stat(follower.file("privkey.pem")).st_mode)
    assert mode == 0o600, oct(mode)


def out_state(follower):
    """The output directory as it is (None while it does not exist)."""
    return snapshot(follower.out) if os.path.isdir(follower.out) else None


def test_the_next_key_is_installed_with_the_certificate_it_matches(run, leader, pebble,
                                                                   followers, next_key):
    current = acme.read_text(leader.certbot.live("privkey.pem"))
    for follower in followers:
        result = run(*sync_args(follower, leader, pebble))
        assert result.rc == 0, result.err
        assert_installed(follower, leader, current)
        assert len(follower.hook_runs()) == 1

    leader.certbot.replace_key(next_key)
    leader.renew("--reuse-key")

    leaf = acme.pem_fields(leader.certbot.live("cert.pem"))
    assert leaf["public_key"] == acme.public_key_of_key(os.path.join(leader.workdir,
                                                                     "next.pem"))
    for follower in followers:
        result = run(*sync_args(follower, leader, pebble))
        assert result.rc == 0, result.err
        assert_installed(follower, leader, next_key)
        assert len(follower.hook_runs()) == 2, "the hook ran once more"
        before = snapshot(follower.out)
        again = run(*sync_args(follower, leader, pebble))
        assert again.rc == 0, again.err
        assert snapshot(follower.out) == before and len(follower.hook_runs()) == 2
    laggard = acme.Follower(os.path.join(leader.workdir, "followers"), "laggard", current)
    result = run(*laggard.sync_args(leader, pebble))
    assert result.rc == REFUSED, "a follower with only the old key refuses: " + result.err


def test_a_leaf_for_neither_key_is_refused_with_a_hint(run, leader, pebble, followers):
    states = [(out_state(f), f.hook_runs()) for f in followers]

    leader.renew("--new-key")

    leaf = acme.pem_fields(leader.certbot.live("cert.pem"))
    names = ("%x" % leaf["serial"], str(leaf["serial"]), leaf["sha256"])
    for follower, (state, runs) in zip(followers, states):
        result = run(*sync_args(follower, leader, pebble))
        assert result.rc == REFUSED, result.err
        assert out_state(follower) == state, "the files are unchanged"
        assert follower.hook_runs() == runs, "no hook"
        message = result.err.lower()
        assert "likely" in message, result.err
        assert "--reuse-key" in message, result.err
        assert any(name in message.replace(":", "") for name in names), \
            "names the refused leaf by serial %s or sha256 %s: %s" % (names[0], names[2],
                                                                     result.err)
