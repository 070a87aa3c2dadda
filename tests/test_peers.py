"""Peers as sources: fleet members fetch from the renewing machine and from each other.

Three followers each list the leader and the two other followers as SOURCEs. Each follower
serves what it has installed (servers.InstalledFilesServer reads its files at every
connection, as nginx reloaded by the deploy hook would). They start with ec1 installed; the
leader renews to ec1new (same key, issued a year later). What a fleet relies on:

  * with the leader up, every follower installs the leader's renewal: the newest valid
    chain wins over the peers' older one;
  * when the leader goes down after the first follower got the renewal, the other two
    still converge on it, from that peer; the dead leader is a warning, not a failure;
  * converged, `--check --same` over the three followers is OK, and reruns change nothing;
  * a peer serving a stale certificate never rolls anyone back: with only that peer
    reachable, a follower refuses (exit 6) and keeps its newer files.
"""

import shutil

import pytest

from helpers import REFUSED, assert_verifies, expected, files_ders, snapshot
from make_certs import NAME
from servers import InstalledFilesServer, TLSServer


class Follower(object):
    """A fleet member: its --out-dir, the key it was given once, and its TLS server."""

    def __init__(self, name, tmp_path, certs, started):
        self.name = name
        self.out_dir = tmp_path / name
        self.out_dir.mkdir()
        for part in ("cert.pem", "chain.pem", "fullchain.pem"):   # installed before: ec1
            shutil.copy(str(certs / "ec1" / part), str(self.out_dir / part))
        self.key = certs / "ec1" / "key.pem"
        self.server = started(InstalledFilesServer(self.out_dir / "fullchain.pem", self.key))

    def sync(self, run, certs, sources):
        """This follower's cron job: certgrab over sources, into its --out-dir."""
        return run(*[s.address for s in sources], "-n", NAME, "--cafile",
                   certs / "ec1" / "root.pem", "--key-path", self.key, "--out-dir",
                   self.out_dir, "--timeout", "2")


@pytest.fixture
def fleet(tmp_path, certs, started):
    """(leader, [three followers])."""
    leader = started(TLSServer(certs / "ec1new" / "fullchain.pem", certs / "ec1new" / "key.pem"))
    return leader, [Follower(name, tmp_path, certs, started) for name in ("f1", "f2", "f3")]


def sources_of(follower, leader, followers):
    return [leader] + [other.server for other in followers if other is not follower]


def test_followers_converge_on_the_leaders_renewal(run, certs, fleet):
    leader, followers = fleet
    for follower in followers:
        result = follower.sync(run, certs, sources_of(follower, leader, followers))
        assert result.rc == 0, result.err
        assert "installed the chain from %s" % leader.address in result.err
        assert files_ders(follower.out_dir) == expected(certs, "ec1new")
        assert_verifies(certs / "ec1new" / "root.pem", follower.out_dir)
    check = run("--check", "--same", "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                *[f.server.address for f in followers])
    assert check.rc == 0, check.out + check.err
    assert check.out.startswith("CERTGRAB OK")


def test_followers_converge_from_a_peer_when_the_leader_goes_down(run, certs, fleet):
    leader, followers = fleet
    first, rest = followers[0], followers[1:]
    assert first.sync(run, certs, sources_of(first, leader, followers)).rc == 0
    leader.stop()                                   # down for days, after f1 got the renewal
    for follower in rest:
        result = follower.sync(run, certs, sources_of(follower, leader, followers))
        assert result.rc == 0, result.err
        assert "installed the chain from %s" % first.server.address in result.err
        assert "certgrab: warning: %s: cannot connect" % leader.address in result.err
        assert files_ders(follower.out_dir) == expected(certs, "ec1new")
        assert_verifies(certs / "ec1new" / "root.pem", follower.out_dir)
    before = [snapshot(f.out_dir) for f in followers]
    for follower in followers:                      # converged: reruns change nothing
        assert follower.sync(run, certs, sources_of(follower, leader, followers)).rc == 0
    assert [snapshot(f.out_dir) for f in followers] == before
    check = run("--check", "--same", "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                *[f.server.address for f in followers])
    assert check.rc == 0, check.out + check.err


def test_a_stale_peer_never_rolls_a_follower_back(run, certs, fleet):
    leader, followers = fleet
    fresh, stale = followers[0], followers[1]
    assert fresh.sync(run, certs, [leader]).rc == 0
    before = snapshot(fresh.out_dir)
    result = fresh.sync(run, certs, [stale.server])   # the only source left serves ec1
    assert result.rc == REFUSED, result.err
    assert "not newer than the installed one" in result.err
    assert snapshot(fresh.out_dir) == before
    check = run("--check", "--same", "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                fresh.server.address, stale.server.address)
    assert check.rc == 2 and check.out.startswith("CERTGRAB CRITICAL"), check.out
