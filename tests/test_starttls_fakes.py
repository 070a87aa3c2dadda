"""STARTTLS against scriptable fake servers: the edge cases real daemons do not show.

The real daemons (postfix, dovecot, ...) are tested elsewhere; these fakes (tests/fakes.py)
play exact byte scripts, so each test can say precisely what the server did and what a user
of certgrab sees:

  - every protocol's happy path ends with exactly the served chain on stdout, and the fake saw
    the commands the protocol prescribes;
  - multi-line replies, unsolicited lines, greetings held back or trickled byte by byte work;
  - a server that does not offer the upgrade gets one line naming the protocol and quoting
    the reply, exit 3;
  - endless greetings, megabyte lines, silent and dripping servers end with exit 3 within
    --timeout + 1 s, one line, no traceback;
  - plaintext sent after the server agreed to TLS is refused (exit 3, nothing on stdout);
  - certgrab sends nothing before the greeting is complete;
  - seeded fuzzing of every dialogue: only certgrab's own errors, never a traceback, never a
    wait when the server has said all it will say.

Tests that must wait (held greetings, timeouts) run certgrab.py as child processes, all at
once, in one module fixture; each test then checks its own case.
Fuzz cases: CERTGRAB_FUZZ_CASES (conftest), seed: CERTGRAB_FUZZ_SEED (default 20240607).
"""

import binascii
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import types

import pytest

from helpers import CERTGRAB, FETCH, Result, assert_one_error, assert_refused, grab_args
from fakes import (FakeServer, close, drip, forever, hold, line, loopback_pair, mark, mutate,
                   pause, read, seeded, send, tagged, tls, trickle, until)
from make_certs import NAME, pem_ders, read_ders

CHAIN = "ec2"  # leaf and two intermediates: "exactly the served chain" means something
SEED = int(os.environ.get("CERTGRAB_FUZZ_SEED", "20240607"))
PROTOCOLS = ["smtp", "lmtp", "pop3", "imap", "ftp", "xmpp", "xmpp-server", "irc", "postgres",
             "postgres-direct", "mysql", "nntp", "sieve", "ldap"]
PLAINTEXT = [p for p in PROTOCOLS if p != "postgres-direct"]  # with a dialogue before TLS
SERVER_FIRST = ["smtp", "lmtp", "ftp", "pop3", "imap", "nntp", "sieve", "mysql"]


# What servers say ----------------------------------------------------------------------------

def mysql_packet(payload, seq=0):
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


MYSQL_CAPABILITIES = 0xDFFFFFFF  # MySQL 8.0: everything but CLIENT_REMEMBER_OPTIONS
MYSQL_CLIENT_SSL = 0x0800
MYSQL_PROTOCOL_41 = 0x0200


def mysql_greeting(capabilities=MYSQL_CAPABILITIES, version=b"8.0.36"):
    """The initial handshake packet, protocol version 10."""
    return mysql_packet(
        b"\x0a" + version + b"\0" + (42).to_bytes(4, "little") + b"abcdefgh\0"
        + (capabilities & 0xFFFF).to_bytes(2, "little") + b"\xff" + b"\x02\x00"
        + (capabilities >> 16).to_bytes(2, "little") + b"\x15" + bytes(10)
        + b"ijklmnopqrst\0" + b"caching_sha2_password\0")


def mysql_error(code, message):
    """An ERR packet sent before the client's capabilities are known: no '#' SQL state."""
    return mysql_packet(b"\xff" + code.to_bytes(2, "little") + message)


def ber(tag, content, long4=False):
    """One BER element with a definite length (long4: always 0x84 + 4 bytes, as Active
    Directory encodes every length)."""
    size = len(content)
    if long4:
        length = b"\x84" + size.to_bytes(4, "big")
    elif size < 0x80:
        length = bytes([size])
    elif size < 0x100:
        length = b"\x81" + bytes([size])
    else:
        length = b"\x82" + size.to_bytes(2, "big")
    return bytes([tag]) + length + content


LDAP_OID = b"1.3.6.1.4.1.1466.20037"
# ExtendedRequest [APPLICATION 23] { requestName [0] OID }, messageID 1 (RFC 4511 4.12, 4.14.1)
LDAP_REQUEST = ber(0x30, ber(0x02, b"\x01") + ber(0x77, ber(0x80, LDAP_OID)))


def ldap_response(code=0, text=b"", name=LDAP_OID, long4=False):
    """ExtendedResponse [APPLICATION 24] { resultCode, matchedDN, diagnosticMessage,
    responseName [10] }, messageID 1."""
    op = ber(0x0A, bytes([code]), long4) + ber(0x04, b"", long4) + ber(0x04, text, long4)
    if name:
        op += ber(0x8A, name, long4)
    return ber(0x30, ber(0x02, b"\x01", long4) + ber(0x78, op, long4), long4)


POSTGRES_SSL_REQUEST = struct.pack(">II", 8, 80877103)


def xmpp_open(kind=b"client"):
    return (b"<?xml version='1.0'?><stream:stream xmlns='jabber:" + kind + b"' "
            b"xmlns:stream='http://etherx.jabber.org/streams' id='c2s-4ff2a1' "
            b"from='example.test' version='1.0' xml:lang='en'>")


def xmpp_features(*items):
    return b"<stream:features>" + b"".join(items) + b"</stream:features>"


XMPP_TLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
XMPP_SASL = (b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN"
             b"</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms>")
XMPP_DIALBACK = b"<dialback xmlns='urn:xmpp:features:dialback'/>"
XMPP_PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
XMPP_CLIENT_OPENS = [until(b"<stream:stream"), until(b">")]  # the client's stream header
XMPP_CLIENT_STARTTLS = until(b"/>")

SMTP_GREETING = b"220 mail.example.test ESMTP Postfix (Debian/GNU)\r\n"
EHLO_REPLY = (b"250-mail.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n"
              b"250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
              b"250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")
IMAP_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED"
SIEVE_GREETING = (b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n'
                  b'"SIEVE" "fileinto reject envelope encoded-character vacation subaddress '
                  b'comparator-i;ascii-numeric relational regex imap4flags copy include"\r\n'
                  b'"NOTIFY" "mailto"\r\n"SASL" ""\r\n"STARTTLS"\r\n"VERSION" "1.0"\r\n'
                  b'OK "Dovecot ready."\r\n')
NNTP_CAPS = (b"101 Capability list:\r\nVERSION 2\r\nIMPLEMENTATION INN 2.7.1\r\nAUTHINFO\r\n"
             b"HDR\r\nLIST ACTIVE ACTIVE.TIMES COUNTS DISTRIB.PATS HEADERS NEWSGROUPS\r\n"
             b"NEWNEWS\r\nOVER\r\nPOST\r\nREADER\r\nSTARTTLS\r\n.\r\n")
POP3_CAPA = (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
             b"STLS\r\nSASL PLAIN\r\n.\r\n")
IRC_670 = b":irc.example.test 670 * :STARTTLS successful, proceed with TLS handshake\r\n"

# Each protocol's dialogue as a well-behaved server plays it, up to the upgrade point.
DIALOGUES = {
    "smtp": [send(SMTP_GREETING), line(), send(EHLO_REPLY), line(),
             send(b"220 2.0.0 Ready to start TLS\r\n")],
    "lmtp": [send(b"220 mail.example.test Dovecot ready.\r\n"), line(),
             send(b"250-mail.example.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                  b"250-STARTTLS\r\n250 PIPELINING\r\n"), line(),
             send(b"220 2.0.0 Begin TLS.\r\n")],
    "ftp": [send(b"220 (vsFTPd 3.0.3)\r\n"), line(), send(b"234 Proceed with negotiation.\r\n")],
    "pop3": [send(b"+OK Dovecot ready.\r\n"), line(), send(POP3_CAPA), line(),
             send(b"+OK Begin TLS negotiation now.\r\n")],
    "imap": [send(b"* OK [CAPABILITY " + IMAP_CAPS + b"] Dovecot ready.\r\n"), line(),
             send(tagged(b"OK Pre-login capabilities listed.\r\n",
                         before=b"* CAPABILITY " + IMAP_CAPS + b"\r\n")), line(),
             send(tagged(b"OK Begin TLS negotiation now.\r\n"))],
    "sieve": [send(SIEVE_GREETING), line(), send(b'OK "Begin TLS negotiation now."\r\n')],
    "nntp": [send(b"200 news.example.test InterNetNews NNRP server INN 2.7.1 ready "
                  b"(posting ok)\r\n"), line(), send(NNTP_CAPS), line(),
             send(b"382 Begin TLS negotiation now\r\n")],
    "xmpp": XMPP_CLIENT_OPENS + [send(xmpp_open() + xmpp_features(XMPP_TLS, XMPP_SASL)),
                                 XMPP_CLIENT_STARTTLS, send(XMPP_PROCEED)],
    "xmpp-server": XMPP_CLIENT_OPENS + [
        send(xmpp_open(b"server") + xmpp_features(XMPP_TLS, XMPP_DIALBACK)),
        XMPP_CLIENT_STARTTLS, send(XMPP_PROCEED)],
    "irc": [send(b":irc.example.test NOTICE * :*** Looking up your hostname...\r\n"), line(),
            send(IRC_670)],
    "postgres": [read(8), send(b"S")],
    "postgres-direct": [],
    "mysql": [send(mysql_greeting()), read(36)],
    "ldap": [read(len(LDAP_REQUEST)), send(ldap_response())],
}


def happy(proto):
    return DIALOGUES[proto] + [tls()]


def first_send(script):
    return next(i for i, step in enumerate(script) if step[0] == "send")


# Running certgrab ----------------------------------------------------------------------------

def starttls_args(certs, fake, proto, timeout, *extra):
    """grab_args for the fake, which serves CHAIN: --starttls PROTO --timeout TIMEOUT."""
    return grab_args(fake, certs / CHAIN, "--starttls", proto, "--timeout", str(timeout),
                     *extra)


def grab_starttls(run, certs, fake, proto, timeout=3, *extra):
    return run(*starttls_args(certs, fake, proto, timeout, *extra))


def assert_served_chain(result, certs):
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / CHAIN / "fullchain.pem")
    assert result.err == "", "a clean fetch is silent on stderr"


def assert_starttls_refused(result, fake, proto, *quotes):
    """The dialogue failed: exit 3, nothing on stdout, one line `certgrab: HOST:PORT: PROTO:
    ...` quoting the reply, and certgrab never started TLS."""
    message = assert_refused(result, FETCH)
    assert message.startswith("certgrab: %s: %s: " % (fake.address, proto)), message
    for quote in quotes:
        assert quote in message, "%r should quote %r" % (message, quote)
    assert fake.handshakes == 0
    return message


# The happy path, for every protocol ----------------------------------------------------------

CLIENT_LINES = {  # what the client must have said, line by line (full matches)
    "smtp": [rb"EHLO (\[[0-9.]+\]|\[IPv6:[0-9a-fA-F:.]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)",
             rb"STARTTLS"],
    "lmtp": [rb"LHLO (\[[0-9.]+\]|\[IPv6:[0-9a-fA-F:.]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)",
             rb"STARTTLS"],
    "ftp": [rb"AUTH TLS"],
    "pop3": [rb"CAPA", rb"STLS"],
    "imap": [rb"[A-Za-z0-9]+ CAPABILITY", rb"[A-Za-z0-9]+ STARTTLS"],
    "sieve": [rb"STARTTLS"],
    "nntp": [rb"CAPABILITIES", rb"STARTTLS"],
    "irc": [rb"STARTTLS"],
}


def assert_client_spoke_the_protocol(proto, session):
    if proto in CLIENT_LINES:
        assert len(session.lines) == len(CLIENT_LINES[proto]), session.lines
        for pattern, said in zip(CLIENT_LINES[proto], session.lines):
            assert re.fullmatch(pattern, said), said
        if proto == "imap":
            tags = [said.split()[0] for said in session.lines]
            assert tags[0] != tags[1], "IMAP tags must differ: %r" % tags
    elif proto.startswith("xmpp"):
        kind = proto[5:] or "client"
        header = re.match(rb"(<\?xml[^>]*\?>)?<stream:stream [^>]*>", session.received)
        assert header, session.received
        assert b"xmlns='jabber:%s'" % kind.encode() in header.group(0)
        assert re.search(rb"\bto=['\"]%s['\"]" % NAME.encode(), header.group(0))
        assert re.search(rb"\bversion=['\"]1.0['\"]", header.group(0))
        assert session.received.endswith(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    elif proto == "postgres":
        assert session.received == POSTGRES_SSL_REQUEST
    elif proto == "ldap":
        assert session.received == LDAP_REQUEST
    elif proto == "mysql":
        request = session.received
        assert request[:4] == b"\x20\x00\x00\x01", "32-byte SSLRequest, sequence id 1"
        flags = int.from_bytes(request[4:8], "little")
        assert flags & MYSQL_CLIENT_SSL and flags & MYSQL_PROTOCOL_41
    elif proto == "postgres-direct":
        assert session.received == b"", "no plaintext at all"
        assert session.alpn == "postgresql"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_happy_path_prints_exactly_the_served_chain(run, certs, proto):
    alpn = ["postgresql"] if proto == "postgres-direct" else None
    with FakeServer(happy(proto), certs / CHAIN, alpn=alpn) as fake:
        result = grab_starttls(run, certs, fake, proto)
    assert_served_chain(result, certs)
    assert fake.handshakes == 1
    assert fake.server_names == [NAME]
    assert_client_spoke_the_protocol(proto, fake.sessions[0])
    assert result.elapsed < 2.0, "a prompt server gets a prompt fetch (%.1f s)" % result.elapsed


@pytest.mark.parametrize("proto", ["smtp", "lmtp"])
def test_ehlo_option_is_the_name_sent(run, certs, proto):
    with FakeServer(happy(proto), certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 5, "--ehlo", "mx1.example.test")
    assert_served_chain(result, certs)
    assert fake.sessions[0].lines[0][5:] == b"mx1.example.test"


@pytest.mark.parametrize("ehlo", ["mx1.example.test\r\nMAIL FROM:<a@b>", "a..b", "x" * 70],
                         ids=["CR LF", "empty label", "label of 70"])
def test_bad_ehlo_name_is_a_usage_error_not_a_command(run, certs, ehlo):
    """--ehlo goes into the SMTP command line: CR LF would smuggle commands, and a name
    that IDNA cannot encode must not end in a traceback."""
    with FakeServer(happy("smtp"), certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp", 5, "--ehlo", ehlo)
    assert result.rc == 2, result
    assert_one_error(result)
    assert all(not said.startswith(b"MAIL") for s in fake.sessions for said in s.lines)


# Multi-line replies, unsolicited lines, split packets: all must still work -------------------

def smtp_like(greeting, hello_reply, agree=b"220 2.0.0 Ready to start TLS\r\n"):
    return [send(greeting), line(), send(hello_reply), line(), send(agree), tls()]


VARIANTS = [
    ("smtp", "multi-line greeting", smtp_like(
        b"220-mail.example.test ESMTP\r\n220-No UCE, no bulk mail.\r\n220 ready\r\n",
        EHLO_REPLY)),
    ("smtp", "starttls lower case, mid-list", smtp_like(
        SMTP_GREETING, b"250-mail.example.test\r\n250-starttls\r\n250 SIZE 100\r\n")),
    ("smtp", "starttls last", smtp_like(
        SMTP_GREETING, b"250-mail.example.test Hello\r\n250 STARTTLS\r\n")),
    ("smtp", "bare LF line ends", smtp_like(
        b"220-mail.example.test\n220 ESMTP\n", b"250-mail.example.test\n250 STARTTLS\n",
        b"220 go ahead\n")),
    ("smtp", "greeting code only", smtp_like(b"220\r\n", b"250-x\r\n250 STARTTLS\r\n")),
    ("smtp", "multi-line 220 to STARTTLS", smtp_like(
        SMTP_GREETING, EHLO_REPLY, b"220-2.0.0 Ready\r\n220 2.0.0 start TLS\r\n")),
    ("lmtp", "multi-line greeting", [
        send(b"220-mail.example.test\r\n220-LMTP server\r\n220 ready\r\n"), line(),
        send(b"250-mail.example.test\r\n250 STARTTLS\r\n"), line(), send(b"220 go\r\n"),
        tls()]),
    ("ftp", "banner of several 220- lines and lines without codes", [
        send(b"220-Welcome to the example FTP service.\r\n220-\r\n"
             b"This line has no code at all\r\n   indented text, 500 words\r\n"
             b"220-Authorised users only.\r\n220 Ready\r\n"), line(),
        send(b"234 AUTH TLS OK.\r\n"), tls()]),
    ("ftp", "120 (ready in a minute) before the 220 greeting (RFC 959 5.4)", [
        send(b"120 Service ready in 1 minute.\r\n"), pause(0.2), send(b"220 FTP ready\r\n"),
        line(), send(b"234 Proceed\r\n"), tls()]),
    ("ftp", "multi-line 234", [
        send(b"220 FTP ready\r\n"), line(),
        send(b"234-Using authentication type TLS\r\n234 Proceed\r\n"), tls()]),
    ("imap", "untagged lines before the tagged OK", [
        send(b"* OK IMAP4rev1 ready\r\n"), line(),
        send(tagged(b"OK CAPABILITY completed\r\n",
                    before=b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n"
                           b"* OK [ALERT] System going down at 17:00\r\n")), line(),
        send(tagged(b"OK Begin TLS\r\n", before=b"* OK still here\r\n")), tls()]),
    ("imap", "capability list over two untagged lines", [
        send(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n"), line(),
        send(tagged(b"OK done\r\n", before=b"* CAPABILITY IMAP4rev1 ID\r\n"
                                           b"* CAPABILITY STARTTLS\r\n")), line(),
        send(tagged(b"OK go\r\n")), tls()]),
    ("pop3", "long capability list", [
        send(b"+OK ready\r\n"), line(),
        send(b"+OK Capability list follows\r\n"
             + b"".join(b"X-CAP-%d arg\r\n" % i for i in range(60)) + b"STLS\r\n.\r\n"),
        line(), send(b"+OK\r\n"), tls()]),
    ("pop3", "no CAPA command: STLS is tried anyway", [
        send(b"+OK ready\r\n"), line(), send(b"-ERR unknown command\r\n"), line(),
        send(b"+OK Begin TLS\r\n"), tls()]),
    ("nntp", "long capability list, 201 greeting", [
        send(b"201 news.example.test ready (no posting)\r\n"), line(),
        send(b"101 Capability list:\r\n"
             + b"".join(b"X-CAP-%d\r\n" % i for i in range(60)) + b"starttls\r\n.\r\n"),
        line(), send(b"382 Continue with TLS negotiation\r\n"), tls()]),
    ("sieve", "many capability lines", [
        send(b"".join(b'"X-CAP-%d" "value"\r\n' % i for i in range(80)) + b'"STARTTLS"\r\n'
             + b'"NOTIFY" "mailto"\r\nOK\r\n'), line(), send(b"OK\r\n"), tls()]),
    ("irc", "NOTICE and PING before 670", [
        send(b"NOTICE AUTH :*** Looking up your hostname...\r\n"), line(),
        send(b":irc.example.test NOTICE * :*** Found your hostname\r\nPING :A1B2C3\r\n"),
        line(),
        send(b":irc.example.test 020 * :Please wait while we process your connection.\r\n"
             + IRC_670), tls()]),
    ("irc", "PING with a server prefix", [
        line(), send(b":irc.example.test PING :A1B2C3\r\n"), line(), send(IRC_670), tls()]),
    ("xmpp", "stream header and features in separate packets", XMPP_CLIENT_OPENS + [
        send(xmpp_open()), pause(0.2), send(b"<stream:features><starttls xmlns='urn:ietf:"),
        pause(0.2), send(b"params:xml:ns:xmpp-tls'/>" + XMPP_SASL), pause(0.2),
        send(b"</stream:features>"), XMPP_CLIENT_STARTTLS, send(XMPP_PROCEED), tls()]),
    ("xmpp", "double quotes, starttls after other features", XMPP_CLIENT_OPENS + [
        send(xmpp_open().replace(b"'", b'"') + xmpp_features(
            XMPP_SASL, b'<register xmlns="http://jabber.org/features/iq-register"/>',
            b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"/>')),
        XMPP_CLIENT_STARTTLS, send(b'<proceed xmlns="urn:ietf:params:xml:ns:xmpp-tls"/>'),
        tls()]),
    ("xmpp-server", "features split over packets", XMPP_CLIENT_OPENS + [
        send(xmpp_open(b"server") + b"<stream:features>"), pause(0.2),
        send(XMPP_TLS + XMPP_DIALBACK + b"</stream:features>"), XMPP_CLIENT_STARTTLS,
        send(XMPP_PROCEED), tls()]),
    ("mysql", "handshake split over two packets", [
        send(mysql_greeting()[:20]), pause(0.3), send(mysql_greeting()[20:]), read(36), tls()]),
    ("mysql", "MariaDB version string", [
        send(mysql_greeting(version=b"5.5.5-10.11.6-MariaDB-0+deb12u1")), read(36), tls()]),
    ("ldap", "no responseName", [read(len(LDAP_REQUEST)), send(ldap_response(name=None)),
                                 tls()]),
    ("ldap", "long-form lengths (0x84, as Active Directory sends)", [
        read(len(LDAP_REQUEST)), send(ldap_response(long4=True)), tls()]),
    ("ldap", "response in two packets", [
        read(len(LDAP_REQUEST)), send(ldap_response()[:5]), pause(0.2),
        send(ldap_response()[5:]), tls()]),
    ("postgres", "S after a pause", [read(8), pause(0.3), send(b"S"), tls()]),
]


@pytest.mark.parametrize("proto, what, script", VARIANTS,
                         ids=["%s: %s" % (p, w) for p, w, _ in VARIANTS])
def test_variants_of_well_behaved_servers(run, certs, proto, what, script):
    with FakeServer(script, certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto)
    assert_served_chain(result, certs)
    assert fake.handshakes == 1
    if proto == "irc" and "PING" in what:
        assert fake.sessions[0].lines[1] == b"PONG :A1B2C3", fake.sessions[0].lines


# Servers that do not offer the upgrade -------------------------------------------------------

def ehlo_without(reply, greeting=SMTP_GREETING):
    return [send(greeting), line(), send(reply), hold()]


REFUSALS = [
    ("smtp", "EHLO without STARTTLS", ehlo_without(
        b"250-mail.example.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
     ["does not offer STARTTLS", "250 8BITMIME"]),
    ("smtp", "454 to STARTTLS", [
        send(SMTP_GREETING), line(), send(EHLO_REPLY), line(),
        send(b"454 4.7.0 TLS not available due to local problem\r\n"), hold()],
     ["454 4.7.0 TLS not available due to local problem"]),
    ("smtp", "554 greeting", [send(b"554 5.3.2 mail.example.test no SMTP service here\r\n"),
                              hold()],
     ["554 5.3.2 mail.example.test no SMTP service here"]),
    ("smtp", "EHLO refused", [send(SMTP_GREETING), line(),
                              send(b"502 5.5.2 Error: command not recognized\r\n"), hold()],
     ["502 5.5.2 Error: command not recognized"]),
    ("lmtp", "LHLO without STARTTLS", ehlo_without(
        b"250-mail.example.test\r\n250 PIPELINING\r\n", b"220 LMTP ready\r\n"),
     ["does not offer STARTTLS", "250 PIPELINING"]),
    ("ftp", "500 to AUTH TLS", [send(b"220 FTP ready\r\n"), line(),
                                send(b"500 AUTH not understood\r\n"), hold()],
     ["500 AUTH not understood"]),
    ("ftp", "530 to AUTH TLS", [send(b"220 FTP ready\r\n"), line(),
                                send(b"530 Please login with USER and PASS.\r\n"), hold()],
     ["530 Please login with USER and PASS."]),
    ("pop3", "CAPA without STLS", [send(b"+OK ready\r\n"), line(),
                                   send(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"), hold()],
     ["does not offer STARTTLS", "UIDL"]),
    ("pop3", "-ERR to STLS", [send(b"+OK ready\r\n"), line(), send(POP3_CAPA), line(),
                              send(b"-ERR TLS support not configured\r\n"), hold()],
     ["-ERR TLS support not configured"]),
    ("pop3", "-ERR greeting", [send(b"-ERR too many connections\r\n"), hold()],
     ["-ERR too many connections"]),
    ("imap", "no STARTTLS capability", [
        send(b"* OK ready\r\n"), line(),
        send(tagged(b"OK done\r\n", before=b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")),
        hold()],
     ["does not offer STARTTLS", "* CAPABILITY IMAP4rev1 AUTH=PLAIN"]),
    ("imap", "NO to STARTTLS", [
        send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"), line(),
        send(tagged(b"OK done\r\n", before=b"* CAPABILITY IMAP4rev1 STARTTLS\r\n")), line(),
        send(tagged(b"NO [UNAVAILABLE] TLS is not configured\r\n")), hold()],
     ["NO [UNAVAILABLE] TLS is not configured"]),
    ("imap", "BYE greeting", [send(b"* BYE Too many connections\r\n"), hold()],
     ["* BYE Too many connections"]),
    ("sieve", "no STARTTLS capability", [
        send(b'"IMPLEMENTATION" "Dovecot"\r\n"SASL" "PLAIN"\r\nOK "ready"\r\n'), hold()],
     ["does not offer STARTTLS", '"SASL" "PLAIN"']),
    ("sieve", "NO to STARTTLS", [send(SIEVE_GREETING), line(),
                                 send(b'NO "TLS unavailable"\r\n'), hold()],
     ['NO "TLS unavailable"']),
    ("nntp", "no STARTTLS capability", [
        send(b"200 ready\r\n"), line(), send(b"101 Capability list:\r\nVERSION 2\r\n"
                                             b"READER\r\n.\r\n"), hold()],
     ["does not offer STARTTLS", "READER"]),
    ("nntp", "502 to STARTTLS", [send(b"200 ready\r\n"), line(), send(NNTP_CAPS), line(),
                                 send(b"502 Command unavailable\r\n"), hold()],
     ["502 Command unavailable"]),
    ("nntp", "400 greeting", [send(b"400 Service temporarily unavailable\r\n"), hold()],
     ["400 Service temporarily unavailable"]),
    ("xmpp", "features without starttls", XMPP_CLIENT_OPENS + [
        send(xmpp_open() + xmpp_features(XMPP_SASL)), hold()],
     ["does not offer STARTTLS", "<stream:features>"]),
    ("xmpp", "failure to starttls", XMPP_CLIENT_OPENS + [
        send(xmpp_open() + xmpp_features(XMPP_TLS)), XMPP_CLIENT_STARTTLS,
        send(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"), hold()],
     ["<failure"]),
    ("xmpp", "empty features element", XMPP_CLIENT_OPENS + [
        send(xmpp_open() + b"<stream:features/>"), hold()],
     ["does not offer STARTTLS", "<stream:features/>"]),
    ("xmpp", "stream error", XMPP_CLIENT_OPENS + [
        send(xmpp_open() + b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:"
                           b"xmpp-streams'/></stream:error></stream:stream>"), hold()],
     ["host-unknown"]),
    ("xmpp-server", "features without starttls", XMPP_CLIENT_OPENS + [
        send(xmpp_open(b"server") + xmpp_features(XMPP_DIALBACK)), hold()],
     ["does not offer STARTTLS", "dialback"]),
    ("irc", "421 unknown command", [
        line(), send(b":irc.example.test 421 * STARTTLS :Unknown command\r\n"), hold()],
     ["does not offer STARTTLS", ":irc.example.test 421 * STARTTLS :Unknown command"]),
    ("irc", "691 STARTTLS failure", [
        line(), send(b":irc.example.test NOTICE * :*** hello\r\n"
                     b":irc.example.test 691 * :STARTTLS failure\r\n"), hold()],
     [":irc.example.test 691 * :STARTTLS failure"]),
    ("irc", "ERROR closing link", [line(), send(b"ERROR :Closing link: (unknown@127.0.0.1) "
                                                b"[Registration timeout]\r\n"), hold()],
     ["ERROR :Closing link"]),
    ("postgres", "N: TLS off", [read(8), send(b"N"), hold()], ["N"]),
    ("postgres", "E: a server too old for SSLRequest", [
        read(8), send(b"E\x00\x00\x00\x50SFATAL\x00Munsupported frontend protocol\x00\x00"),
        hold()], []),
    ("mysql", "no CLIENT_SSL", [send(mysql_greeting(MYSQL_CAPABILITIES & ~MYSQL_CLIENT_SSL,
                                                    b"5.7.44")), hold()],
     ["does not offer STARTTLS", "5.7.44", "CLIENT_SSL"]),
    ("mysql", "error packet: host not allowed", [
        send(mysql_error(1130, b"Host '127.0.0.1' is not allowed to connect to this MySQL "
                               b"server")), hold()],
     ["Host '127.0.0.1' is not allowed to connect"]),
    ("mysql", "error packet: too many connections", [
        send(mysql_error(1040, b"Too many connections")), hold()],
     ["Too many connections"]),
    ("ldap", "resultCode 2", [read(len(LDAP_REQUEST)),
                              send(ldap_response(2, b"unsupported extended operation")), hold()],
     ["unsupported extended operation", "2"]),
    ("ldap", "resultCode 52 unavailable", [
        read(len(LDAP_REQUEST)), send(ldap_response(52, b"TLS already started", name=None)),
        hold()], ["52", "TLS already started"]),
]


@pytest.mark.parametrize("proto, what, script, quotes", REFUSALS,
                         ids=["%s: %s" % (p, w) for p, w, _, _ in REFUSALS])
def test_refusal_is_one_line_naming_protocol_and_reply(run, certs, proto, what, script, quotes):
    with FakeServer(script, certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 3)
    assert_starttls_refused(result, fake, proto, *quotes)
    assert result.elapsed < 1.5, "the reply was clear; no need to wait (%.1f s)" % result.elapsed


def test_reply_cannot_write_terminal_escapes(run, certs):
    """The quoted reply is the server's text: control characters must arrive escaped."""
    script = [send(b"554 \x1b[2J\x1b]0;owned\x07 no service\x08\x08\r\n"), hold()]
    with FakeServer(script, certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp")
    message = assert_starttls_refused(result, fake, "smtp", "554 ", "no service")
    assert not re.search(r"[\x00-\x1f\x7f]", message), repr(message)


def test_reply_with_a_bar_never_writes_perfdata(run, certs):
    """--check over a server that refuses STARTTLS with "|" in its reply, and one that
    works: the status line's only "|" is certgrab's own, before certgrab's own perfdata;
    the quoted reply shows the bar as \\x7c and its line breaks as \\x0a, which no reply
    can forge, and no line after the first has a "|" (Nagios long output)."""
    reply = b"250-mail.example.test | 'expires_in evil'=999999999s;1:;1:\r\n250 8BITMIME\r\n"
    with FakeServer(ehlo_without(reply), certs / CHAIN) as bad, \
            FakeServer(happy("smtp"), certs / CHAIN) as good:
        result = run("--check", bad.address, good.address, "--starttls", "smtp", "-n", NAME,
                     "--cafile", certs / CHAIN / "root.pem", "--timeout", 3)
    assert result.rc == 2, result.out
    first, *rest = result.out.splitlines()
    assert first.count("|") == 1, first
    assert re.fullmatch(r"'expires_in {0}'=\d+s;\d+:;\d+: 'age {0}'=\d+s".format(
        re.escape(good.address)), first.split(" | ")[1]), first
    assert "(reply: 250-mail.example.test \\x7c 'expires_in evil'=999999999s;1:;1:\\x0a250 " \
        "8BITMIME)" in first, first
    assert rest[0].startswith("CRITICAL - %s: smtp: the server does not offer" % bad.address)
    assert not any("|" in line for line in rest), rest


def test_ldap_result_code_of_thousands_of_digits_is_malformed(run, certs):
    """An ExtendedResponse whose resultCode (an ENUMERATED, small in RFC 4511) is 5,000
    bytes long: "malformed LDAP response", never Python's int-to-text limit."""
    op = ber(0x0A, b"\x01" + b"\xff" * 4999) + ber(0x04, b"") + ber(0x04, b"no")
    response = ber(0x30, ber(0x02, b"\x01") + ber(0x78, op))
    with FakeServer([read(len(LDAP_REQUEST)), send(response), hold()], certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "ldap")
    assert_starttls_refused(result, fake, "ldap", "malformed LDAP response")


def test_quoted_reply_is_kept_short(run, certs):
    """A 150-line EHLO reply without STARTTLS: the error line quotes a part, not all."""
    reply = b"".join(b"250-X-EXTENSION-%03d %s\r\n" % (i, b"y" * 40) for i in range(150))
    with FakeServer(ehlo_without(reply + b"250 HELP\r\n"), certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp")
    message = assert_starttls_refused(result, fake, "smtp", "250-X-EXTENSION-000")
    assert len(message) < 1000, len(message)


# Plaintext injection: bytes after the server agreed ------------------------------------------

INJECTED = b"MAIL FROM:<attacker@example.test>\r\n"


def injected(proto):
    """The happy dialogue with extra bytes in the same packet as the server's agreement
    (MySQL: as its handshake packet, after which the client speaks and TLS starts)."""
    script = list(DIALOGUES[proto])
    last = max(i for i, step in enumerate(script) if step[0] == "send")
    data = script[last][1]
    script[last] = send((lambda s: data(s) + INJECTED) if callable(data) else data + INJECTED)
    return script + [tls()]


@pytest.mark.parametrize("proto", PLAINTEXT)
def test_plaintext_after_the_agreement_is_refused(run, certs, proto):
    with FakeServer(injected(proto), certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 3)
    assert_starttls_refused(result, fake, proto, "injection")


@pytest.mark.parametrize("proto", ["smtp", "mysql", "xmpp", "ldap"])
def test_injection_in_the_next_packet_never_succeeds(run, certs, proto):
    """Extra bytes sent right after the agreement, in a packet of their own: refused as
    injection when they are already pending, else the handshake fails on them; the chain
    must never be printed."""
    script = DIALOGUES[proto] + [send(INJECTED), tls()]
    with FakeServer(script, certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 3)
    assert result.rc == 3, result
    assert result.out == ""
    assert re.search(r"injection|TLS handshake failed", assert_one_error(result)), result.err


@pytest.mark.parametrize("proto", PLAINTEXT)
def test_server_hanging_up_after_agreeing_is_one_clean_error(run, certs, proto):
    with FakeServer(DIALOGUES[proto] + [close()], certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto)
    assert result.rc == 3 and result.out == "", result
    assert_one_error(result)
    assert result.elapsed < 1.5


def test_a_single_extra_line_end_is_injection_too(run, certs):
    script = [send(SMTP_GREETING), line(), send(EHLO_REPLY), line(),
              send(b"220 2.0.0 Ready to start TLS\r\n\r\n"), tls()]
    with FakeServer(script, certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp", 3)
    assert_starttls_refused(result, fake, "smtp", "injection")


# Fast hostile servers: limits, not the deadline, end these -----------------------------------

# Per protocol: the script up to where the server turns hostile, a unit that repeated never
# completes the reply being read, and how a megabytes-long line starts.
HOSTILE = {
    "smtp": ([], b"220-still greeting you\r\n", b"220-"),
    "lmtp": ([], b"220-still greeting you\r\n", b"220 "),
    "ftp": ([], b"220-Welcome, and welcome again\r\n", b"220-"),
    "pop3": ([send(b"+OK ready\r\n"), line(), send(b"+OK capabilities follow\r\n")],
             b"X-CAPABILITY\r\n", b"+OK "),
    "imap": ([send(b"* OK ready\r\n"), line()], b"* CAPABILITY IMAP4rev1 STARTTLS\r\n", b"* OK"),
    "sieve": ([], b'"SIEVE" "fileinto"\r\n', b'"SIEVE" "'),
    "nntp": ([send(b"200 ready\r\n"), line(), send(b"101 Capability list:\r\n")],
             b"X-CAPABILITY\r\n", b"200 "),
    "xmpp": (XMPP_CLIENT_OPENS + [send(xmpp_open() + b"<stream:features>")],
             b"<mechanism>PLAIN</mechanism>", b"<stream:features x='"),
    "xmpp-server": (XMPP_CLIENT_OPENS + [send(xmpp_open(b"server") + b"<stream:features>")],
                    b"<dialback/>", b"<stream:features x='"),
    "irc": ([line()], b":irc.example.test NOTICE * :*** still looking you up\r\n", b":irc "),
    "postgres": ([read(8)], b"E\x7f\xff\xff\xff", b"E\x7f\xff\xff\xff"),
    "postgres-direct": ([], b"\x15\x03\x03\x00\x02", b"\x16\x03\x03\xff\xff"),
    "mysql": ([send(b"\xff\xff\xff\x00\x0a")], b"\x00" * 64, b"8.0."),
    "ldap": ([read(len(LDAP_REQUEST)), send(b"\x30\x82\xff\x00")], b"\x04\x00", b"\x02\x01"),
}
MEGABYTES = 4 << 20


def assert_failed_cleanly(result, proto, timeout):
    """Exit 3 within --timeout + 1 s, one error line naming the protocol, nothing printed."""
    assert result.rc == 3, result
    assert result.out == ""
    assert result.elapsed < timeout + 1.0, "took %.1f s with --timeout %s" % (
        result.elapsed, timeout)
    message = assert_one_error(result)
    if proto != "postgres-direct":  # no plaintext: a plain TLS error
        assert re.search(r"\b%s\b" % re.escape(proto), message), message
    return message


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_endless_greeting_hits_a_limit(run, certs, proto):
    prefix, unit, _ = HOSTILE[proto]
    with FakeServer(prefix + [forever(unit)], certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 5)
    message = assert_failed_cleanly(result, proto, 5)
    assert result.elapsed < 2.0, "a limit should end this long before the deadline"
    assert "timed out" not in message


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_megabytes_long_line_hits_a_limit(run, certs, proto):
    prefix, _, start = HOSTILE[proto]
    with FakeServer(prefix + [send(start + b"x" * MEGABYTES), hold()], certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, proto, 5)
    message = assert_failed_cleanly(result, proto, 5)
    assert result.elapsed < 2.0, "a limit should end this long before the deadline"
    assert "timed out" not in message


def test_total_plaintext_is_bounded(run, certs, certgrab):
    """Lines under MAX_LINE, fewer than MAX_REPLY_LINES, but more than MAX_PLAINTEXT in all."""
    unit = b"220-" + b"x" * 2000 + b"\r\n"
    assert certgrab.MAX_PLAINTEXT // len(unit) + 1 < certgrab.MAX_REPLY_LINES
    with FakeServer([forever(unit)], certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp")
    message = assert_failed_cleanly(result, "smtp", 3)
    assert "%d bytes" % certgrab.MAX_PLAINTEXT in message


def test_line_of_exactly_max_line_bytes_is_accepted(run, certs, certgrab):
    banner = b"220-" + b"x" * (certgrab.MAX_LINE - 6) + b"\r\n"
    assert len(banner) == certgrab.MAX_LINE
    with FakeServer(smtp_like(banner + SMTP_GREETING, EHLO_REPLY), certs / CHAIN) as fake:
        result = grab_starttls(run, certs, fake, "smtp")
    assert_served_chain(result, certs)


# Timing: held greetings, trickles, silence, drips, early sends ------------------------------
# All of these wait, so they run as child processes, all at once, in one fixture.

PARALLEL = 12  # child processes at once
SLOW_OK = 8.0  # --timeout for cases that must succeed despite a slow server
SHORT = 1.0  # --timeout for cases that must time out
HELD = 1.5  # seconds a greeting is held back


def held(proto):
    script = happy(proto)
    at = first_send(script) if proto != "postgres-direct" else 0
    return script[:at] + [pause(HELD)] + script[at:]


def trickled(proto):
    """The server's first reply (bytes in every dialogue) one byte at a time, ~1 s in all."""
    script = happy(proto)
    at = first_send(script)
    data = script[at][1]
    script[at] = trickle(data, min(0.02, 1.0 / len(data)))
    return script


def dripping(proto):
    prefix, unit, _ = HOSTILE[proto]
    return prefix + [drip(unit, 0.05)]


def slow_endless(proto):
    prefix, unit, _ = HOSTILE[proto]
    return prefix + [forever(unit, 0.1)]


def greeting_in_parts(proto):
    """The greeting in parts 0.4 s apart, a mark just before its last part."""
    tail = happy(proto)[1:]
    parts = {
        "smtp": [b"220-mail.example.test ESMTP\r\n", b"220-be patient\r\n", b"220 ready\r\n"],
        "lmtp": [b"220-mail.example.test\r\n", b"220-LMTP\r\n", b"220 ready\r\n"],
        "ftp": [b"220-Welcome\r\n", b"no code on this line\r\n", b"220 ready\r\n"],
        "pop3": [b"+OK Dovecot ", b"ready", b".\r\n"],
        "imap": [b"* OK [CAPABILITY IMAP4rev1 ", b"STARTTLS] ", b"ready\r\n"],
        "nntp": [b"200 news.example.test ", b"ready ", b"(posting ok)\r\n"],
        "sieve": [b'"IMPLEMENTATION" "Dovecot"\r\n', b'"STARTTLS"\r\n', b'OK "ready"\r\n'],
        "mysql": [mysql_greeting()[:4], mysql_greeting()[4:30], mysql_greeting()[30:]],
    }[proto]
    return [send(parts[0]), pause(0.4), send(parts[1]), pause(0.4), mark("last part"),
            send(parts[2])] + tail


def ehlo_reply_in_parts():
    """SMTP: the EHLO reply's last line comes 0.5 s late; STARTTLS must wait for it."""
    return [send(SMTP_GREETING), line(), send(EHLO_REPLY[:-len(b"250 CHUNKING\r\n")]),
            pause(0.5), mark("last part"), send(b"250 CHUNKING\r\n"), line(),
            send(b"220 go\r\n"), tls()]


def timing_cases():
    """(key, proto, script, --timeout, expect_success)"""
    cases = []
    for proto in PROTOCOLS:
        cases.append((("held", proto), proto, held(proto), SLOW_OK, True))
        cases.append((("silent", proto), proto, [hold()], SHORT, False))
        cases.append((("dripping", proto), proto, dripping(proto), SHORT, False))
        cases.append((("slow endless", proto), proto, slow_endless(proto), SHORT, False))
        if proto in PLAINTEXT:
            cases.append((("trickled", proto), proto, trickled(proto), SLOW_OK, True))
    for proto in SERVER_FIRST:
        cases.append((("greeting in parts", proto), proto, greeting_in_parts(proto), SLOW_OK,
                      True))
    cases.append((("ehlo reply in parts", "smtp"), "smtp", ehlo_reply_in_parts(), SLOW_OK, True))
    cases.append((("slow handshake", "smtp"), "smtp", happy("smtp")[:-1] + [pause(5), tls()],
                  SHORT, False))
    return cases


# The child times certgrab.main itself and reports on a pipe: with dozens of children on a
# small machine, interpreter start-up waits for a CPU, and that is not certgrab's time.
# -I -S: certgrab needs only the standard library, and site-packages cost 100 ms a child.
CHILD = '''import os, sys, time
report, sys.path[:0] = int(sys.argv[1]), [os.path.dirname(sys.argv[2])]
start = time.monotonic()
import certgrab
rc = certgrab.main(sys.argv[3:])
sys.stdout.flush()
os.write(report, str(time.monotonic() - start).encode())
sys.exit(rc)
'''


def run_child(args, timeout):
    """certgrab.main(args) in a child process: Result with main's own elapsed time."""
    timing, report = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", CHILD, str(report), CERTGRAB]
                                + args,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True,
                                pass_fds=(report,))
        os.close(report)
        report = None
        out, err = proc.communicate(timeout=timeout + 30)
        elapsed = os.read(timing, 64)
    finally:
        os.close(timing)
        if report is not None:
            os.close(report)
    return Result(proc.returncode, out, err, float(elapsed) if elapsed else float("inf"))


def timing(scenario):
    """Mark a test as checking the timing case (scenario, its proto parameter)."""
    def mark_test(function):
        function.timing_scenario = scenario
        return function
    return mark_test


def selected_timing_keys(session):
    """The timing cases that the tests selected in this run will look at."""
    keys = set()
    for item in session.items:
        scenario = getattr(getattr(item, "function", None), "timing_scenario", None)
        if scenario:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            keys.add((scenario, params.get("proto", "smtp")))
    return keys


@pytest.fixture(scope="module")
def timed(certs, request):
    """key -> (Result, FakeServer) for every timing case a selected test needs, all run
    concurrently."""
    wanted = selected_timing_keys(request.session)
    cases = [case for case in timing_cases() if case[0] in wanted]
    outcomes, gate = {}, threading.Semaphore(PARALLEL)
    fakes = [FakeServer(script, certs / CHAIN,
                        alpn=["postgresql"] if proto == "postgres-direct" else None)
             for _, proto, script, _, _ in cases]

    def one(case, fake):
        key, proto, _, timeout, _ = case
        with gate:
            try:
                argv = starttls_args(certs, fake, proto, timeout)
                outcomes[key] = (run_child(argv, timeout), fake)
            except Exception:  # reported by the test of this case
                outcomes[key] = (traceback.format_exc(), fake)

    threads = []
    try:
        for case, fake in zip(cases, fakes):
            fake.start()
            threads.append(threading.Thread(target=one, args=(case, fake), daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join(60)
    finally:
        for fake in fakes:
            fake.stop()
    return outcomes


def timed_case(timed, key):
    result, fake = timed[key]
    assert not isinstance(result, str), result
    assert "Traceback" not in result.err, result.err
    return result, fake


@timing("held")
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_greeting_held_back_still_works(timed, certs, proto):
    result, fake = timed_case(timed, ("held", proto))
    assert_served_chain(result, certs)
    assert result.elapsed >= HELD


@timing("trickled")
@pytest.mark.parametrize("proto", PLAINTEXT)
def test_greeting_trickling_byte_by_byte_still_works(timed, certs, proto):
    result, fake = timed_case(timed, ("trickled", proto))
    assert_served_chain(result, certs)


@timing("silent")
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_silent_server_times_out(timed, proto):
    result, _ = timed_case(timed, ("silent", proto))
    assert "timed out" in assert_failed_cleanly(result, proto, SHORT)


@timing("dripping")
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_server_dripping_bytes_forever_meets_the_deadline(timed, proto):
    result, _ = timed_case(timed, ("dripping", proto))
    assert_failed_cleanly(result, proto, SHORT)


@timing("slow endless")
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_slow_endless_greeting_meets_the_deadline(timed, proto):
    result, _ = timed_case(timed, ("slow endless", proto))
    assert_failed_cleanly(result, proto, SHORT)


@timing("slow handshake")
def test_deadline_covers_the_tls_handshake(timed):
    """The server agrees at once but stalls its half of the handshake."""
    result, fake = timed_case(timed, ("slow handshake", "smtp"))
    assert result.rc == 3 and result.out == ""
    assert result.elapsed < SHORT + 1.0
    assert "timed out" in assert_one_error(result)
    assert fake.sessions[0].lines[-1] == b"STARTTLS"


@timing("greeting in parts")
@pytest.mark.parametrize("proto", SERVER_FIRST)
def test_nothing_is_sent_before_the_greeting_is_complete(timed, certs, proto):
    result, fake = timed_case(timed, ("greeting in parts", proto))
    session = fake.sessions[0]
    when, _ = session.marks["last part"]
    assert session.seen_by(when) == 0, "the client spoke %.2f s before the greeting ended" % (
        when - session.first_byte_at)
    assert session.first_byte_at is not None and session.first_byte_at > when
    assert_served_chain(result, certs)


@timing("ehlo reply in parts")
def test_starttls_waits_for_the_last_line_of_the_ehlo_reply(timed, certs):
    result, fake = timed_case(timed, ("ehlo reply in parts", "smtp"))
    session = fake.sessions[0]
    when, read_by_then = session.marks["last part"]
    assert session.seen_by(when) == read_by_then, "STARTTLS was sent before the reply ended"
    assert_served_chain(result, certs)


# Fuzzing: every dialogue, seeded mutations of its replies ------------------------------------

FUZZ_DEADLINE = 5.0  # seconds; never reached: the fuzz server has said all and closed
FUZZ_CASE_LIMIT = 1.0  # seconds one case may take; the data is all there, then end of stream
FUZZ_MAX_BYTES = 256 << 10  # bytes a mutated script may grow to
BINARY = {"postgres", "mysql", "ldap"}

# More replies worth mutating besides each protocol's DIALOGUES: refusals and variants.
EXTRA_CORPUS = {
    "smtp": [[b"220-a\r\n220 b\r\n", b"250-x\r\n250 STARTTLS\r\n", b"220 go\r\n"]],
    "ftp": [[b"220-a\r\nno code\r\n220 b\r\n", b"234-x\r\n234 y\r\n"]],
    "imap": [[b"* OK [CAPABILITY STARTTLS] x\r\n", b"* x\r\nc1 OK\r\n", b"* y\r\nc2 OK\r\n"]],
    "irc": [[b"PING :x\r\n:s NOTICE * :y\r\n", b":s 670 * :go\r\n"], [b":s 691 * :no\r\n"]],
    "postgres": [[b"N"], [b"E\x00\x00\x00\x08SFATAL\x00\x00"]],
    "mysql": [[mysql_error(1040, b"Too many connections")],
              [mysql_greeting(MYSQL_CAPABILITIES & ~MYSQL_CLIENT_SSL)]],
    "ldap": [[ldap_response(long4=True)], [ldap_response(2, b"no", name=None)]],
    "xmpp": [[xmpp_open() + b"<stream:features/>"], [xmpp_open(), xmpp_features(XMPP_TLS),
                                                     b"<failure/>"]],
}


def server_replies(proto):
    """Each send() of the happy dialogue as bytes; IMAP's tags as certgrab's first two."""
    replies, tag = [], 0
    for step in DIALOGUES[proto]:
        if step[0] == "send":
            data = step[1]
            if callable(data):
                tag += 1
                data = data(types.SimpleNamespace(lines=[b"c%d X" % tag]))
            replies.append(data)
    return replies


def fuzz_input(rng, corpus, binary):
    """One case: a corpus entry with 1 to 3 mutations; returns (mutations, bytes)."""
    replies = list(rng.choice(corpus))
    done = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(replies))
        kind, replies[i] = mutate(rng, replies[i], binary)
        done.append("%s@%d" % (kind, i))
    return done, b"".join(replies)[:FUZZ_MAX_BYTES]


def play_dialogue(certgrab, proto, data, listener):
    """Run certgrab's dialogue for proto against data already sent, then end of stream.
    Returns "agreed" or the CertgrabError raised; any other exception propagates."""
    client, server = loopback_pair(data, listener)
    try:
        port = client.getpeername()[1]
        source = certgrab.Source("127.0.0.1:%d" % port, "127.0.0.1", port, NAME)
        talk = certgrab.Plaintext(client, source, proto, time.monotonic() + FUZZ_DEADLINE,
                                  ehlo="client.example.test")
        try:
            certgrab.STARTTLS[proto][0](talk)
            talk.finish()
        except certgrab.CertgrabError as exc:
            return exc
        return "agreed"
    finally:
        client.close()
        server.close()


@pytest.mark.fuzz
@pytest.mark.parametrize("proto", PLAINTEXT)
def test_fuzz_dialogue_ends_in_agreement_or_one_clean_error(certgrab, proto, fuzz_cases):
    corpus = [server_replies(proto)] + EXTRA_CORPUS.get(proto, [])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    failures, outcomes = {}, {}
    try:
        for case in range(fuzz_cases):
            rng = seeded(SEED, proto, case)
            mutations, data = fuzz_input(rng, corpus, proto in BINARY)
            start = time.monotonic()
            try:
                outcome = play_dialogue(certgrab, proto, data, listener)
                problem = fuzz_problem(certgrab, outcome, time.monotonic() - start)
            except Exception:
                outcome, problem = None, traceback.format_exc()
            kind = "agreed" if outcome == "agreed" else "error"
            outcomes[kind] = outcomes.get(kind, 0) + 1
            if problem and problem.splitlines()[-1] not in failures:
                failures[problem.splitlines()[-1]] = (
                    "%s case %d (CERTGRAB_FUZZ_SEED=%d), mutations %s\nserver sent %s\n%s" % (
                        proto, case, SEED, mutations, binascii.hexlify(data[:600]).decode(),
                        problem))
    finally:
        listener.close()
    assert not failures, "\n\n".join(failures.values())
    assert outcomes.get("error"), "no mutation was refused: the fuzzer is not reaching anything"


def fuzz_problem(certgrab, outcome, elapsed):
    """What is wrong with one case's outcome, or None."""
    if elapsed > FUZZ_CASE_LIMIT:
        return "took %.2f s although the server had closed: a read waits for nothing" % elapsed
    if outcome == "agreed":
        return None
    message = str(outcome)
    if outcome.exit_code != 3:
        return "exit code %d for %r" % (outcome.exit_code, message)
    if "\n" in message or "\r" in message:
        return "error message is not one line: %r" % message
    if "timed out" in message:
        return "timed out although the server had closed: %r" % message
    return None


@pytest.mark.fuzz
@pytest.mark.parametrize("proto", PLAINTEXT)
def test_fuzz_whole_fetch_through_the_fake_exits_0_or_3(run, certs, proto, fuzz_cases):
    """Fewer cases (fuzz_cases / 30, at most 100), through certgrab.main and a real fake
    server in lock step: the fake waits at most 0.2 s for each client message, then hangs
    up, so no case waits for the deadline."""
    timeout = 2.0
    sends = [i for i, step in enumerate(DIALOGUES[proto]) if step[0] == "send"]
    with FakeServer([], certs / CHAIN, patience=0.2) as fake:
        for case in range(max(5, min(100, fuzz_cases // 30))):
            rng = seeded(SEED, "main", proto, case)
            script, mutations = list(DIALOGUES[proto]), []
            for i in rng.sample(sends, rng.randint(1, len(sends))):
                kind, data = mutate(rng, server_replies(proto)[sends.index(i)], proto in BINARY)
                script[i] = send(data)
                mutations.append("%s@%d" % (kind, i))
            fake.script = script + [tls()]  # the next connection plays this
            result = grab_starttls(run, certs, fake, proto, timeout)
            where = "%s case %d (seed %d), mutations %s" % (proto, case, SEED, mutations)
            assert result.rc in (0, 3), (where, result)
            assert result.elapsed < timeout + 1.0, (where, result)
            if result.rc == 0:
                assert_served_chain(result, certs)
            else:
                assert result.out == "", where
                assert_one_error(result)
