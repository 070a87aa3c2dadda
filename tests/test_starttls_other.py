"""--starttls against real daemons from Debian: prosody, inspircd, postgresql, mariadb, slapd.

Each daemon is started once per session by daemons_other.py on 127.0.0.1 high ports with a
generated chain, and serves every port the tests below use. What a user relies on:

  * `certgrab 127.0.0.1:PORT --starttls PROTO -n NAME --cafile root.pem` prints exactly the
    chain the daemon was given, for xmpp, xmpp-server, irc, postgres, mysql and ldap; the
    implicit-TLS ports (XMPP direct TLS, ircs, ldaps) need no flag, and `--alpn xmpp-client`
    is accepted by a real XMPP server;
  * `--starttls postgres-direct` offers ALPN "postgresql". Debian 12 ships PostgreSQL 15,
    which has no direct TLS (17+), so the positive test talks to `openssl s_server -alpn
    postgresql`; against the real PostgreSQL 15 it fails cleanly;
  * the same daemon software with TLS off fails with exit 3 and one line naming the protocol
    and quoting what the server said, well within --timeout; an IRC server that ignores
    STARTTLS altogether ends in one line at --timeout;
  * talking the wrong protocol to a real daemon fails in one line, never with a traceback;
  * verification and the safe install work through a binary STARTTLS dialogue.

Without the packages (or root) every test here skips with the reason; under CI=true the
conftest turns those skips into a failure, which is intended: CI installs the packages.
"""

import re
import socket
import time

import pytest

from conftest import daemon_fixture
from daemons import HOST
from daemons_other import NOTLS_NAME, InspIRCd, MariaDB, Postgres, Prosody, Slapd
from helpers import (FETCH, VERIFY, assert_one_error, assert_prints_served_chain, assert_verifies,
                     expected, explain, failed_fetch_line, files_ders, grab_daemon, served_chain,
                     snapshot)
from make_certs import NAME, pem_ders, read_ders
from servers import OpenSSLServer

TIMEOUT = 5  # seconds; --timeout of the negative tests, which must fail well within it
SILENT_TIMEOUT = 2  # seconds; --timeout against a server that never answers STARTTLS
LATE = 1.5  # seconds; how long after --timeout a run that hit it may take to return


# Daemons: one instance of each per session, with the chain each serves --------------------

prosody = daemon_fixture(Prosody, "rsa2")
inspircd = daemon_fixture(InspIRCd, "ec2")
postgres = daemon_fixture(Postgres, "ec1")
mariadb = daemon_fixture(MariaDB, "rsa2")
slapd = daemon_fixture(Slapd, "rsa1")


# The chain, through each dialogue and on each implicit-TLS port ----------------------------

STARTTLS = [  # (daemon fixture, port name, --starttls protocol)
    ("prosody", "xmpp", "xmpp"),
    ("prosody", "xmpp-server", "xmpp-server"),
    ("inspircd", "irc", "irc"),
    ("postgres", "postgres", "postgres"),
    ("mariadb", "mysql", "mysql"),
    ("slapd", "ldap", "ldap"),
]

IMPLICIT = [  # (daemon fixture, port name, extra arguments)
    ("prosody", "xmpps", []),
    ("prosody", "xmpps", ["--alpn", "xmpp-client"]),
    ("inspircd", "ircs", []),
    ("slapd", "ldaps", []),
]


@pytest.mark.parametrize("daemon,port,protocol", STARTTLS,
                         ids=["%s-%s" % (d, p) for d, p, _ in STARTTLS])
def test_starttls_prints_exactly_the_served_chain(request, run, daemon, port, protocol):
    daemon = request.getfixturevalue(daemon)
    assert_prints_served_chain(daemon, grab_daemon(run, daemon, port, "--starttls", protocol))


@pytest.mark.parametrize("daemon,port,extra", IMPLICIT,
                         ids=["-".join([d, p] + e).replace("--", "") for d, p, e in IMPLICIT])
def test_implicit_tls_port_needs_no_flag(request, run, daemon, port, extra):
    daemon = request.getfixturevalue(daemon)
    assert_prints_served_chain(daemon, grab_daemon(run, daemon, port, *extra))


def test_irc_notices_before_the_reply_are_skipped(run, inspircd):
    """InspIRCd greets every client with a NOTICE while it looks up the client's name, before
    (or while) it reads STARTTLS: the 670 reply comes after lines certgrab must pass over."""
    with socket.create_connection((HOST, inspircd.ports["irc"]), timeout=TIMEOUT) as sock:
        with sock.makefile("rb") as replies:
            first = replies.readline()
    assert b" NOTICE * :*** Looking up your hostname" in first, first  # what we test with
    result = grab_daemon(run, inspircd, "irc", "--starttls", "irc")
    assert result.rc == 0, explain(inspircd, result)
    assert pem_ders(result.out) == served_chain(inspircd)


def test_postgres_direct_offers_alpn_postgresql(run, certs):
    """PostgreSQL 17 accepts direct TLS only with ALPN "postgresql"; Debian 12's PostgreSQL 15
    has no direct TLS, so openssl s_server stands in for it and says what was negotiated."""
    chain = certs / "ec2"
    server = OpenSSLServer(chain / "cert.pem", chain / "key.pem", chain / "chain.pem", tls="any")
    server.args += ["-alpn", "postgresql"]
    with server:
        result = run(server.address, "--starttls", "postgres-direct", "-n", NAME,
                     "--cafile", chain / "root.pem")
        log = _wait_for_output(server, "ALPN protocols selected")
    assert result.rc == 0, result.err + log
    assert pem_ders(result.out) == read_ders(chain / "fullchain.pem")
    assert "ALPN protocols selected: postgresql" in log, log


def _wait_for_output(server, text, seconds=5.0):
    """s_server's output once it holds text (it prints after the handshake), or at seconds."""
    deadline = time.monotonic() + seconds
    while True:
        output = server.output().decode(errors="replace")
        if text in output or time.monotonic() > deadline:
            return output
        time.sleep(0.05)


def test_postgres_direct_against_postgresql_15_fails_cleanly(run, postgres):
    """PostgreSQL 15 reads the ClientHello as a startup packet and hangs up."""
    result = grab_daemon(run, postgres, "postgres", "--starttls", "postgres-direct",
                         "--timeout", TIMEOUT)
    failed_fetch_line(postgres, result, TIMEOUT)


def test_xmpp_stream_is_addressed_to_the_servername(run, prosody):
    """--servername is the stream's to= domain: Prosody answers from that virtual host
    (notls.example.test, which offers no STARTTLS; www.example.test does)."""
    notls = grab_daemon(run, prosody, "xmpp", "--starttls", "xmpp", "--timeout", TIMEOUT,
                        name=NOTLS_NAME)
    assert notls.rc == FETCH, explain(prosody, notls)
    assert OFFERS_NO_STARTTLS in notls.err, notls.err
    tls = grab_daemon(run, prosody, "xmpp", "--starttls", "xmpp", "--timeout", TIMEOUT, name=NAME)
    assert tls.rc == 0, explain(prosody, tls)


# TLS off, or the upgrade refused: one line, exit 3, the server's words -----------------------

OFFERS_NO_STARTTLS = "the server does not offer STARTTLS"
REFUSED_TLS = "the server refused to start TLS"

REFUSED = [  # (daemon fixture, port name, protocol, -n, what certgrab says, the server's words)
    ("prosody", "xmpp", "xmpp", NOTLS_NAME, OFFERS_NO_STARTTLS, "<stream:features>"),
    ("prosody", "xmpp-server", "xmpp-server", NOTLS_NAME, OFFERS_NO_STARTTLS,
     "<stream:features>"),
    ("inspircd", "irc-plain", "irc", NAME, REFUSED_TLS,
     ":irc.example.test 691 * :STARTTLS is not enabled"),
    ("postgres", "postgres-plain", "postgres", NAME, OFFERS_NO_STARTTLS, "N: TLS is off"),
    ("mariadb", "mysql-plain", "mysql", NAME, OFFERS_NO_STARTTLS, "MariaDB"),
    ("slapd", "ldap-plain", "ldap", NAME, REFUSED_TLS, "resultCode 2 "),
]


@pytest.mark.parametrize("daemon,port,protocol,name,says,reply", REFUSED,
                         ids=["%s-%s" % (r[0], r[1]) for r in REFUSED])
def test_tls_off_fails_with_one_line_quoting_the_server(request, run, daemon, port, protocol,
                                                        name, says, reply):
    daemon = request.getfixturevalue(daemon)
    result = grab_daemon(run, daemon, port, "--starttls", protocol, "--timeout", TIMEOUT, name=name)
    line = failed_fetch_line(daemon, result, TIMEOUT)
    prefix = "certgrab: %s:%d: %s: %s (reply: " % (HOST, daemon.ports[port], protocol, says)
    assert line.startswith(prefix), line
    assert reply in line, line


def test_irc_server_that_ignores_starttls_ends_at_the_timeout(run, inspircd):
    """Without its starttls module InspIRCd silently drops unknown commands from clients that
    have not registered: nothing comes back, and certgrab gives up at --timeout."""
    result = grab_daemon(run, inspircd, "irc-bare", "--starttls", "irc",
                         "--timeout", SILENT_TIMEOUT)
    line = failed_fetch_line(inspircd, result, SILENT_TIMEOUT + LATE)
    assert line.startswith("certgrab: %s:%d: " % (HOST, inspircd.ports["irc-bare"])), line
    assert "irc" in line and "timed out" in line, line
    assert result.elapsed > SILENT_TIMEOUT - 0.2


# The wrong protocol for the port: real bytes the dialogue does not expect --------------------

WRONG = [  # (daemon fixture, port name, --starttls protocol spoken to it)
    ("mariadb", "mysql", "ldap"),  # the MySQL handshake read as an LDAP message
    ("mariadb", "mysql", "postgres"),  # ... as the answer to an SSLRequest
    ("prosody", "xmpp", "irc"),  # Prosody's stream error for "STARTTLS\r\n"
    ("slapd", "ldap", "postgres"),  # slapd hangs up on an SSLRequest
]


@pytest.mark.parametrize("daemon,port,protocol", WRONG,
                         ids=["%s-to-%s" % (w[2], w[0]) for w in WRONG])
def test_wrong_protocol_fails_in_one_line(request, run, daemon, port, protocol):
    daemon = request.getfixturevalue(daemon)
    result = grab_daemon(run, daemon, port, "--starttls", protocol, "--timeout", TIMEOUT)
    line = failed_fetch_line(daemon, result, TIMEOUT)
    assert re.match(r"certgrab: %s:%d: " % (re.escape(HOST), daemon.ports[port]), line), line


# Verification and the safe install through a binary dialogue --------------------------------

def test_chain_is_verified_after_starttls(run, mariadb, certs):
    """The rsa2 chain against the EC root: the upgrade succeeds, verification does not."""
    result = run("%s:%d" % (HOST, mariadb.ports["mysql"]), "--starttls", "mysql", "-n", NAME,
                 "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == VERIFY, explain(mariadb, result)
    assert_one_error(result)
    assert result.out == ""


def test_safe_install_through_starttls(run, postgres, certs, tmp_path):
    out = tmp_path / "live"
    argv = ["--starttls", "postgres", "--out-dir", out, "--key-path", certs / "ec1" / "key.pem"]
    first = grab_daemon(run, postgres, "postgres", *argv)
    assert first.rc == 0, explain(postgres, first)
    assert files_ders(out) == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", out)
    before = snapshot(out)
    again = grab_daemon(run, postgres, "postgres", *argv)
    assert again.rc == 0, explain(postgres, again)
    assert snapshot(out) == before  # not even rewritten
