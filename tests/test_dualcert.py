"""Dual-certificate servers (RSA and ECDSA on one name): --key-path picks the chain.

A server with both certificates hands out one of them by default (the client's signature
algorithms decide); when it is not the one for --key-path, certgrab asks again with cipher
suites of the key's type. Tested against nginx (Debian package `nginx`) and against
`openssl s_server -dcert/-dkey`.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest

import servers
from helpers import OUT_FILES, assert_verifies, entries, expected, files_ders, hook_runs
from make_certs import NAME, pem_ders, read_ders

READY = 10.0  # seconds nginx may take to listen

NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate     {rsa}/fullchain.pem;
        ssl_certificate_key {rsa}/key.pem;
        ssl_certificate     {ec}/fullchain.pem;
        ssl_certificate_key {ec}/key.pem;
        return 204;
    }}
"""


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Nginx(object):
    """nginx in the foreground with a config of our own in a temporary directory."""

    def __init__(self, directory, certs):
        self.dir, self.certs, self.proc, self.port = directory, certs, None, None
        self.host = "127.0.0.1"

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def start(self):
        for attempt in range(3):  # the free port may be taken between probe and listen
            self.port = servers.free_ports(1)[0]
            config = self.dir / "nginx.conf"
            config.write_text(servers.nginx_config(self.dir, NGINX_SERVER.format(
                port=self.port, name=NAME, rsa=self.certs / "rsa1", ec=self.certs / "ec1"),
                master=False))
            self.proc = subprocess.Popen(
                [shutil.which("nginx"), "-p", str(self.dir), "-c", str(config),
                 "-e", str(self.dir / "error.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + READY
            while time.monotonic() < deadline and self.proc.poll() is None:
                if listening(self.port):
                    return
                time.sleep(0.02)
            self.stop()
        raise RuntimeError("nginx did not start:\n" + self.log())

    def log(self):
        try:
            return (self.dir / "error.log").read_text()
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        servers.stop_process(self.proc, 5)
        self.proc = None


@pytest.fixture(scope="module")
def both_roots(certs, tmp_path_factory):
    path = tmp_path_factory.mktemp("roots") / "roots.pem"
    path.write_text((certs / "rsa1" / "root.pem").read_text()
                    + (certs / "ec1" / "root.pem").read_text())
    return path


@pytest.fixture(scope="module")
def nginx(certs, tmp_path_factory):
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (Debian package: nginx)")
    server = Nginx(tmp_path_factory.mktemp("nginx"), certs)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def openssl_dual(certs):
    """openssl s_server with RSA (rsa1) as -cert and ECDSA (ec1) as -dcert."""
    server = servers.OpenSSLServer(certs / "rsa1" / "cert.pem", certs / "rsa1" / "key.pem",
                                   certs / "rsa1" / "chain.pem", tls="any")
    server.args += ["-dcert", str(certs / "ec1" / "cert.pem"),
                    "-dkey", str(certs / "ec1" / "key.pem"),
                    "-dcert_chain", str(certs / "ec1" / "chain.pem")]
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["nginx", "openssl_dual"])
def dual(request):
    return request.getfixturevalue(request.param)


def default_chain(run, server, certs, roots):
    """Which chain the server hands out to a client that asks for nothing in particular."""
    result = run(server.address, "-n", NAME, "--cafile", roots)
    assert result.rc == 0, result.err
    for chain in ("rsa1", "ec1"):
        if pem_ders(result.out) == read_ders(certs / chain / "fullchain.pem"):
            return chain
    raise AssertionError("neither chain served: " + result.out)


@pytest.mark.parametrize("chain", ["rsa1", "ec1"])
def test_key_type_picks_the_chain(run, dual, certs, both_roots, tmp_path, chain):
    out, log = tmp_path / "out", tmp_path / "hook.log"
    result = run(dual.address, "-n", NAME, "--cafile", both_roots, "--out-dir", out,
                 "--key-path", certs / chain / "key.pem",
                 "--deploy-hook", 'echo "$RENEWED_DOMAINS" >> %s' % log, "-v")
    assert result.rc == 0, result.err
    assert files_ders(out) == expected(certs, chain), "the %s chain, exactly" % chain
    assert_verifies(certs / chain / "root.pem", out)
    asked_again = "asked again" in result.err
    assert asked_again == (chain != default_chain(run, dual, certs, both_roots)), \
        "certgrab asks a second time exactly when the default chain is the other one"
    assert entries(out) == OUT_FILES
    assert hook_runs(log) == ["www.example.test example.test"]
    again = run(dual.address, "-n", NAME, "--cafile", both_roots, "--out-dir", out,
                "--key-path", certs / chain / "key.pem",
                "--deploy-hook", 'echo "$RENEWED_DOMAINS" >> %s' % log)
    assert again.rc == 0 and len(hook_runs(log)) == 1, "idempotent on a dual server too"


@pytest.mark.parametrize("chain", ["rsa1", "ec1"])
def test_key_type_picks_the_chain_on_stdout(run, dual, certs, both_roots, chain):
    """--key-path without files: the gate picks the chain printed, as served."""
    result = run(dual.address, "-n", NAME, "--cafile", both_roots,
                 "--key-path", certs / chain / "key.pem")
    assert result.rc == 0, result.err
    assert pem_ders(result.out) == read_ders(certs / chain / "fullchain.pem")


def test_a_key_of_neither_certificate_is_refused(run, dual, certs, both_roots, tmp_path):
    result = run(dual.address, "-n", NAME, "--cafile", both_roots,
                 "--out-dir", tmp_path / "out", "--key-path", certs / "rsa2" / "key.pem")
    assert result.rc == 6, result.err
    assert not (tmp_path / "out").exists() or os.listdir(str(tmp_path / "out")) == []


def test_without_key_path_the_default_chain_is_taken(run, nginx, certs, both_roots):
    result = run(nginx.address, "-n", NAME, "--cafile", both_roots)
    assert result.rc == 0, result.err
    assert pem_ders(result.out) in (read_ders(certs / "rsa1" / "fullchain.pem"),
                                    read_ders(certs / "ec1" / "fullchain.pem"))


def test_encrypted_rsa_key_picks_the_rsa_chain(run, dual, certs, both_roots, tmp_path):
    """An encrypted key's type is not known before the handshake: OpenSSL decides the match,
    and the mismatch still leads to asking again."""
    key, password = tmp_path / "rsa.key", tmp_path / "password"
    password.write_text("pw\n")
    subprocess.run(["openssl", "pkcs8", "-topk8", "-in", str(certs / "rsa1" / "key.pem"),
                    "-out", str(key), "-v2", "aes-128-cbc", "-passout", "pass:pw"], check=True)
    for chain, keyfile in (("rsa1", key), ("ec1", certs / "ec1" / "key.pem")):
        out = tmp_path / chain
        extra = ["--key-password-file", password] if chain == "rsa1" else []
        result = run(dual.address, "-n", NAME, "--cafile", both_roots, "--out-dir", out,
                     "--key-path", keyfile, *extra)
        assert result.rc == 0, result.err
        assert files_ders(out) == expected(certs, chain)
        assert_verifies(certs / chain / "root.pem", out)


@pytest.mark.parametrize("chain, other", [("rsa1", "ec2"), ("ec1", "rsa2")])
def test_a_rollover_across_key_types_asks_for_the_listed_keys_type(run, dual, certs,
                                                                   both_roots, tmp_path,
                                                                   chain, other):
    """Two --key-path (issue 11): one matches a chain of the dual server, the other (of the
    other type) matches neither. Whichever chain the server hands out first, the one for a
    listed key is installed, with that key as privkey.pem."""
    out = tmp_path / "out"
    result = run(dual.address, "-n", NAME, "--cafile", both_roots, "--out-dir", out,
                 "--privkey", "--key-path", certs / other / "key.pem",
                 "--key-path", certs / chain / "key.pem")
    assert result.rc == 0, result.err
    assert files_ders(out) == expected(certs, chain)
    assert_verifies(certs / chain / "root.pem", out)
    assert (out / "privkey.pem").read_bytes() == (certs / chain / "key.pem").read_bytes()
