"""--starttls against real daemons from Debian: postfix, dovecot (+ pigeonhole), vsftpd, INN.

Each daemon is started once per session by daemons_mail.py on 127.0.0.1 high ports with a
generated chain, and serves every port the tests below use. What a user relies on:

  * `certgrab 127.0.0.1:PORT --starttls PROTO -n NAME --cafile root.pem` prints exactly the
    chain the daemon was given, for smtp, lmtp, imap, pop3, sieve, ftp and nntp; the
    implicit-TLS ports (smtps, imaps, pop3s, ftps, nntps) need no flag;
  * real server behaviour works: a greeting held back by postscreen, a multi-line FTP banner,
    IMAP untagged replies, POP3/NNTP capability lists;
  * the same daemon software with TLS off fails with exit 3 and one line naming the protocol
    and quoting what the server said, well within --timeout;
  * verification and the safe install (files, no-op rerun, deploy hook) work through STARTTLS.

Without the packages (or root) every test here skips with the reason; under CI=true the
conftest turns those skips into a failure, which is intended: CI installs the packages.
"""

import pytest

from conftest import daemon_fixture
from daemons import HOST
from daemons_mail import Dovecot, Nnrpd, Vsftpd
from helpers import (VERIFY, assert_one_error, assert_prints_served_chain, assert_verifies,
                     expected, explain, failed_fetch_line, files_ders, grab_daemon, hook_runs,
                     served_chain, snapshot)
from make_certs import NAME, pem_ders

TIMEOUT = 5  # seconds; --timeout of the negative tests, which must fail well within it


# Daemons: one instance of each per session, with the chain each serves --------------------

dovecot = daemon_fixture(Dovecot, "ec2")
vsftpd = daemon_fixture(Vsftpd, "rsa2")
nnrpd = daemon_fixture(Nnrpd, "ec2")


# The chain, through each dialogue and on each implicit-TLS port ----------------------------

STARTTLS = [  # (daemon fixture, port name, --starttls protocol)
    ("postfix", "smtp", "smtp"),
    ("dovecot", "lmtp", "lmtp"),
    ("dovecot", "imap", "imap"),
    ("dovecot", "pop3", "pop3"),
    ("dovecot", "sieve", "sieve"),
    ("vsftpd", "ftp", "ftp"),
    ("nnrpd", "nntp", "nntp"),
]

IMPLICIT = [  # (daemon fixture, port name)
    ("postfix", "smtps"),
    ("dovecot", "imaps"),
    ("dovecot", "pop3s"),
    ("vsftpd", "ftps"),
    ("nnrpd", "nntps"),
]


@pytest.mark.parametrize("daemon,port,protocol", STARTTLS,
                         ids=["%s-%s" % (d, p) for d, p, _ in STARTTLS])
def test_starttls_prints_exactly_the_served_chain(request, run, daemon, port, protocol):
    daemon = request.getfixturevalue(daemon)
    assert_prints_served_chain(daemon, grab_daemon(run, daemon, port, "--starttls", protocol))


@pytest.mark.parametrize("daemon,port", IMPLICIT, ids=["%s-%s" % d for d in IMPLICIT])
def test_implicit_tls_port_needs_no_flag(request, run, daemon, port):
    daemon = request.getfixturevalue(daemon)
    assert_prints_served_chain(daemon, grab_daemon(run, daemon, port))


def test_smtp_greeting_held_back_by_postscreen(run, postfix):
    """postscreen sends "220-", waits a second for clients that talk too early, then smtpd
    sends "220 ": a client that sends EHLO before the last greeting line is a PREGREET."""
    result = grab_daemon(run, postfix, "smtp-slow", "--starttls", "smtp")
    assert result.rc == 0, explain(postfix, result)
    assert pem_ders(result.out) == served_chain(postfix)
    log = postfix.log_text()
    assert "PASS NEW [127.0.0.1]" in log, explain(postfix, result)
    assert "PREGREET" not in log, explain(postfix, result)
    assert result.elapsed >= 0.9  # postscreen_greet_wait = 1s


def test_starttls_port_without_the_flag_fails_cleanly(run, postfix):
    result = grab_daemon(run, postfix, "smtp", "--timeout", TIMEOUT)
    failed_fetch_line(postfix, result, TIMEOUT)
    assert "STARTTLS" in result.err  # the hint names what was missing


# TLS off, or the upgrade refused: one line, exit 3, the server's words -----------------------

REFUSED = [  # (daemon fixture, port name, protocol, words of the reply the error must quote)
    ("postfix", "smtp-plain", "smtp", "250-postfix.example.test"),
    ("dovecot", "lmtp-plain", "lmtp", "250-dovecot.example.test"),
    ("dovecot", "imap-plain", "imap", "* CAPABILITY IMAP4rev1"),
    ("dovecot", "pop3-plain", "pop3", "+OK\\x0aCAPA"),   # reply lines: \x0a between
    ("dovecot", "sieve-plain", "sieve", '"IMPLEMENTATION" "Dovecot'),
    ("vsftpd", "ftp-plain", "ftp", "530 Please login with USER and PASS."),
    # INN lists STARTTLS even without a certificate, then refuses the command itself.
    ("nnrpd", "nntp-plain", "nntp", "580 Error initializing TLS"),
]


@pytest.mark.parametrize("daemon,port,protocol,reply", REFUSED,
                         ids=["%s-%s" % (d, p) for d, p, _, _ in REFUSED])
def test_tls_off_fails_with_one_line_quoting_the_server(request, run, daemon, port, protocol,
                                                        reply):
    daemon = request.getfixturevalue(daemon)
    result = grab_daemon(run, daemon, port, "--starttls", protocol, "--timeout", TIMEOUT)
    line = failed_fetch_line(daemon, result, TIMEOUT)
    prefix = "certgrab: %s:%d: %s: the server " % (HOST, daemon.ports[port], protocol)
    assert line.startswith(prefix), line
    # capabilities without STARTTLS: "does not offer"; the command answered no: "refused"
    assert line[len(prefix):].startswith(("does not offer STARTTLS (reply: ",
                                          "refused to start TLS (reply: ")), line
    assert reply in line, line


def test_refused_ehlo_is_reported_with_the_name_sent(run, postfix):
    """--ehlo NAME is what the server sees: postfix rejects this one name at EHLO time."""
    result = grab_daemon(run, postfix, "smtp", "--starttls", "smtp",
                         "--ehlo", "refused.example.test", "--timeout", TIMEOUT)
    line = failed_fetch_line(postfix, result, TIMEOUT)
    assert line.startswith("certgrab: %s:%d: smtp: EHLO refused (reply: 554 5.7.1 "
                           "<refused.example.test>: Helo command rejected"
                           % (HOST, postfix.ports["smtp"])), line
    accepted = grab_daemon(run, postfix, "smtp", "--starttls", "smtp", "--ehlo", "ok.example.test")
    assert accepted.rc == 0, explain(postfix, accepted)


# Verification and the safe install through STARTTLS ----------------------------------------

def test_chain_is_verified_after_starttls(run, postfix, certs):
    """The rsa2 chain against the EC root: the upgrade succeeds, verification does not."""
    result = run("%s:%d" % (HOST, postfix.ports["smtp"]), "--starttls", "smtp", "-n", NAME,
                 "--cafile", certs / "ec1" / "root.pem")
    assert result.rc == VERIFY, explain(postfix, result)
    assert_one_error(result)
    assert result.out == ""


def test_safe_install_through_starttls(run, postfix, certs, tmp_path):
    out, log = tmp_path / "live", tmp_path / "hook.log"
    argv = ["--starttls", "smtp", "--out-dir", out, "--key-path", certs / "rsa2" / "key.pem",
            "--deploy-hook", "echo x >> %s" % log]
    first = grab_daemon(run, postfix, "smtp", *argv)
    assert first.rc == 0, explain(postfix, first)
    assert files_ders(out) == expected(certs, "rsa2")
    assert_verifies(certs / "rsa2" / "root.pem", out)
    assert hook_runs(log) == ["x"]
    before = snapshot(out)
    again = grab_daemon(run, postfix, "smtp", *argv)
    assert again.rc == 0, explain(postfix, again)
    assert snapshot(out) == before  # not even rewritten
    assert hook_runs(log) == ["x"]  # and the hook did not run again
