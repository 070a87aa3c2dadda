"""--starttls PROTOCOL brings its default port when SOURCE names none; -p and SOURCE win.

A listener on 127.0.0.77 (an address nothing else here uses) accepts the connection and
says nothing, so certgrab ends at its deadline; what matters is which port it dialled.
"""

import os
import socket
import threading

import pytest

from make_certs import NAME

HOST = "127.0.0.77"
DEFAULT_PORTS = {
    "smtp": 25, "lmtp": 24, "pop3": 110, "imap": 143, "ftp": 21, "xmpp": 5222,
    "xmpp-server": 5269, "irc": 6667, "postgres": 5432, "postgres-direct": 5432,
    "mysql": 3306, "nntp": 119, "sieve": 4190, "ldap": 389,
}


class Listener(object):
    """Accepts connections on HOST:port and records that one came."""

    def __init__(self, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.connections, self.stopping = 0, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def listen():
    if os.geteuid() != 0:
        pytest.skip("binding ports below 1024 needs root")
    listeners = []

    def start(port):
        listeners.append(Listener(port))
        return listeners[-1]
    yield start
    for listener in listeners:
        listener.close()


def test_the_table_is_the_one_certgrab_knows(certgrab):
    assert {name: port for name, (_, port) in certgrab.STARTTLS.items()} == DEFAULT_PORTS


@pytest.mark.parametrize("protocol", sorted(DEFAULT_PORTS))
def test_a_source_without_port_dials_the_protocols_default(run, listen, protocol):
    listener = listen(DEFAULT_PORTS[protocol])
    result = run(HOST, "--starttls", protocol, "-n", NAME, "--insecure",
                 "--timeout", "1")
    assert result.rc == 3, result.err
    assert listener.connections == 1, "nothing dialled %s:%d" % (HOST, DEFAULT_PORTS[protocol])


def test_port_option_and_source_port_win_over_the_default(run, listen):
    by_option, by_source = listen(2525), listen(2526)
    run(HOST, "--starttls", "smtp", "-p", "2525", "--insecure", "--timeout", "1")
    run("%s:2526" % HOST, "--starttls", "smtp", "-p", "2525", "--insecure", "--timeout", "1")
    assert (by_option.connections, by_source.connections) == (1, 1)
