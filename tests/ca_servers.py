"""What a CA publishes, on loopback, for the revocation and renewal tests (issue 21).

    CrlCA(directory)        a root and an intermediate made with `openssl ca`; leaf(name, url)
                            issues an EC (or RSA) leaf whose CRL Distribution Point is url,
                            revoke(name, reason) revokes it in the intermediate's database,
                            (with intermediate_crl=URL the intermediate names the root's CRL
                            there, and revoke_intermediate(reason) revokes it in the root's),
                            crl(path, ...) writes the intermediate's CRL (`openssl ca
                            -gencrl`, DER or PEM, any lastUpdate/nextUpdate), and
                            forged_crl(path) one with the intermediate's name signed by
                            another key
    FileServer(directory)   Python's http.server in a thread serving directory's files;
                            `paths` lists every path asked for
    RawHttpServer(reply, mode)   a hostile HTTP server: after the request it sends reply and
                            then, by mode: "close"; "hold" (stays silent); "drip" (reply one
                            byte every `interval` seconds); "endless-chunks" (chunks forever);
                            "endless-body" (zeros forever)
    AriServer(certfile, keyfile)   an https ACME server written to RFC 9773: /directory names
                            /renewal-info, and renewal-info/<certID> answers from `answers`
                            (certID -> (status, body bytes, headers)); `paths` lists requests
    window(start, end, ...)  such an answer: a suggested window (WINDOW_START to WINDOW_END)
    cert_id(leaf_dir)       RFC 9773's certID of a leaf, computed by pyca/cryptography
    Acme2Certifier(workdir, ca, config)   the real acme2certifier (PyPI), its WSGI
                            application under wsgiref with TLS on a free loopback port, issuing
                            with the openssl CA handler from ca's intermediate;
                            issue(certbot_dir, name) runs Debian's certbot against it and
                            returns certbot's live directory

Everything listens on 127.0.0.1, port 0 or a free port, and is stopped by stop() (the
fixtures do it); waits are bounded.
"""

import base64
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

from cryptography import x509

import make_certs
import servers
from make_certs import NAME

HOST = "127.0.0.1"
READY = 30.0  # seconds acme2certifier may take to start (it imports a lot)
CERTBOT = "/usr/bin/certbot"
CERTBOT_TIMEOUT = 120.0  # seconds for one certbot run against acme2certifier (~5 s here)
A2C_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "a2c_server.py")

# make_certs' CA, which also numbers and dates the CRLs it makes, with its own extensions
CA_CONFIG = make_certs.CA_CONFIG.replace("[ policy_anything ]", """\
crlnumber = $dir/crlnumber
default_crl_days = 7
[ policy_anything ]""") + """\
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ intermediate_crl ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
crlDistributionPoints = ${{ENV::CRL_URL}}
[ leaf ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = ${{ENV::SANS}}
crlDistributionPoints = ${{ENV::CRL_URL}}
[ server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{name}, IP:127.0.0.1
"""


LEAF_SANS = "DNS:%s, IP:127.0.0.1" % NAME


def openssl(*args, **env):
    """openssl ARGS; env: variables for the config file (CRL_URL and SANS, which it always
    reads)."""
    env.setdefault("CRL_URL", "URI:http://unused.example.test/")
    env.setdefault("SANS", LEAF_SANS)
    return make_certs.openssl(*args, env=env)


class CrlCA(object):
    """Root "CRL test root" and intermediate "CRL test intermediate", each its own
    `openssl ca` database under directory; with intermediate_crl, a URL, the intermediate's
    CRL Distribution Point names it (as Let's Encrypt's name their root's CRL)."""

    def __init__(self, directory, intermediate_crl=None):
        self.dir = str(directory)
        self.root = self._ca("root", "CRL test root", None, "root")
        self.intermediate = self._ca(
            "intermediate", "CRL test intermediate", self.root,
            "intermediate_crl" if intermediate_crl else "intermediate",
            "URI:%s" % intermediate_crl if intermediate_crl else "")
        self.root_pem = os.path.join(self.root, "cert.pem")

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def _config(self, ca_dir):
        config = os.path.join(ca_dir, "ca.cnf")
        if not os.path.exists(config):
            os.makedirs(ca_dir, exist_ok=True)
            with open(os.path.join(ca_dir, "index.txt"), "w"):
                pass
            with open(os.path.join(ca_dir, "crlnumber"), "w") as f:
                f.write("01\n")
            with open(config, "w") as f:
                f.write(CA_CONFIG.format(dir=ca_dir, name=NAME))
        return config

    def _issue(self, ca_dir, cn, issuer, extensions, out_dir, key="ec", crl_url="",
               sans=LEAF_SANS):
        """A key and a certificate in out_dir (cert.pem, key.pem), issued by issuer (a CA
        directory, or None: self-signed)."""
        os.makedirs(out_dir, exist_ok=True)
        config = self._config(ca_dir if issuer is None else issuer)
        keyfile, csr = os.path.join(out_dir, "key.pem"), os.path.join(out_dir, "req.csr")
        cert = os.path.join(out_dir, "cert.pem")
        openssl("req", "-new", "-config", config, "-subj", "/CN=%s" % cn[-60:], *(make_certs.KEY_OPTIONS[key] + [
            "-nodes", "-keyout", keyfile, "-out", csr]))
        signer = ["-selfsign", "-keyfile", keyfile] if issuer is None else [
            "-cert", os.path.join(issuer, "cert.pem"), "-keyfile", os.path.join(issuer, "key.pem")]
        openssl("ca", "-batch", "-notext", "-config", config, "-in", csr, "-out", cert,
                "-extfile", config, "-extensions", extensions, "-days", "3650",
                *signer, CRL_URL=crl_url or "URI:http://unused.example.test/", SANS=sans)
        return out_dir

    def _ca(self, name, cn, issuer, extensions, crl_url=""):
        ca_dir = self.path(name)
        self._config(ca_dir)
        return self._issue(ca_dir, cn, issuer, extensions, ca_dir, crl_url=crl_url)

    def leaf(self, name, url=None, key="ec", more_names=0):
        """Directory name/ with cert.pem, chain.pem, fullchain.pem, key.pem and root.pem of
        a leaf whose CRL Distribution Point is url (a list: several; None: no extension),
        with more_names DNS names beside www.example.test (a large certificate)."""
        out = self.path("leaves", name)
        urls = [url] if isinstance(url, str) else url
        extension = "leaf" if urls else "server"
        self._issue(None, "%s leaf" % name, self.intermediate, extension, out, key,
                    ",".join("URI:%s" % u for u in urls or ()), ", ".join(
                        [LEAF_SANS] + ["DNS:n%d.%s.example.test" % (n, "a-long-name" * 4)
                                       for n in range(more_names)]))
        with open(os.path.join(self.intermediate, "cert.pem")) as f:
            chain = f.read()
        with open(os.path.join(out, "cert.pem")) as f:
            leaf = f.read()
        for file, text in (("chain.pem", chain), ("fullchain.pem", leaf + chain)):
            with open(os.path.join(out, file), "w") as f:
                f.write(text)
        shutil.copy(self.root_pem, os.path.join(out, "root.pem"))
        return out

    def revoke(self, name, reason="keyCompromise"):
        config = self._config(self.intermediate)
        openssl("ca", "-config", config, "-revoke", self.path("leaves", name, "cert.pem"),
                "-crl_reason", reason, "-cert", os.path.join(self.intermediate, "cert.pem"),
                "-keyfile", os.path.join(self.intermediate, "key.pem"))

    def revoke_intermediate(self, reason="cACompromise"):
        """The root revokes the intermediate (write its CRL with crl(path, issuer=ca.root))."""
        config = self._config(self.root)
        openssl("ca", "-config", config, "-revoke", os.path.join(self.intermediate, "cert.pem"),
                "-crl_reason", reason, "-cert", os.path.join(self.root, "cert.pem"),
                "-keyfile", os.path.join(self.root, "key.pem"))

    def crl(self, path, last=None, next=None, der=True, issuer=None):
        """The intermediate's CRL (or issuer's: a CA directory) in path; last and next are
        openssl dates (YYYYMMDDHHMMSSZ) for lastUpdate and nextUpdate."""
        issuer = issuer or self.intermediate
        config = self._config(issuer)
        dates = (["-crl_lastupdate", last] if last else []) + \
            (["-crl_nextupdate", next] if next else [])
        pem = path + ".pem"
        openssl("ca", "-config", config, "-gencrl", "-out", pem, "-cert",
                os.path.join(issuer, "cert.pem"), "-keyfile", os.path.join(issuer, "key.pem"),
                *dates)
        if der:
            openssl("crl", "-in", pem, "-outform", "DER", "-out", path)
            os.unlink(pem)
        else:
            os.rename(pem, path)
        return path

    def forged_crl(self, path):
        """A CRL that names the intermediate as its issuer but is signed by another key."""
        forger = self.path("forger")
        if not os.path.exists(forger):
            self._issue(forger, "CRL test intermediate", None, "intermediate", forger)
        return self.crl(path, issuer=forger)


class _HttpThread(object):
    """An http.server (self.httpd, which the subclass makes) serving in a thread of its own."""

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": servers.POLL})
        self.thread.daemon = True
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(servers.JOIN)


class FileServer(_HttpThread):
    """http.server (HTTP/1.1) serving directory's files on loopback, in a thread."""

    def __init__(self, directory):
        self.directory, self.paths = str(directory), []
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *args, **kwargs):
                super(Handler, self).__init__(*args, directory=served.directory, **kwargs)

            def do_GET(self):
                served.paths.append(self.path)
                super(Handler, self).do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = None

    def url(self, path):
        return "http://%s:%d/%s" % (HOST, self.port, path.lstrip("/"))


class RawHttpServer(servers.ThreadedServer):
    """Reads a request, then sends reply and behaves as mode says (see the module's
    docstring). `requests` counts the requests read."""

    def __init__(self, reply=b"", mode="close", interval=0.2):
        servers.ThreadedServer.__init__(self, HOST)
        self.reply, self.mode, self.interval, self.requests = reply, mode, interval, 0

    def url(self, path="crl"):
        return "http://%s:%d/%s" % (HOST, self.port, path)

    def handle(self, conn):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = self.read_some(conn)
            if not chunk:
                return
            request += chunk
        self.requests += 1
        if self.mode == "drip":
            for byte in self.reply:
                if self._stop.wait(self.interval):
                    return
                conn.sendall(bytes([byte]))
            return
        conn.sendall(self.reply)
        if self.mode == "hold":
            self.hold_until_closed(conn)
        elif self.mode in ("endless-chunks", "endless-body"):
            piece = b"1000\r\n" + b"\0" * 4096 + b"\r\n" if self.mode == "endless-chunks" \
                else b"\0" * 65536
            deadline = time.monotonic() + servers.HOLD
            while not self._stop.is_set() and time.monotonic() < deadline:
                conn.sendall(piece)


WINDOW_START, WINDOW_END = "2026-01-02T04:00:00Z", "2099-01-03T04:00:00Z"


def window(start=WINDOW_START, end=WINDOW_END, explanation=None, retry_after=None):
    """An AriServer answer: (status, body, headers)."""
    body = {"suggestedWindow": {"start": start, "end": end}}
    if explanation:
        body["explanationURL"] = explanation
    return 200, json.dumps(body).encode(), {"Retry-After": retry_after} if retry_after else {}


def cert_id(leaf_dir):
    """RFC 9773's certID of the leaf in leaf_dir, computed by pyca/cryptography."""
    with open(os.path.join(leaf_dir, "cert.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    serial = cert.serial_number.to_bytes(cert.serial_number.bit_length() // 8 + 1, "big")
    return ".".join(base64.urlsafe_b64encode(part).decode().rstrip("=")
                    for part in (aki.key_identifier, serial))


class AriServer(_HttpThread):
    """An ACME server's ARI side, written to RFC 9773, over https on loopback."""

    def __init__(self, certfile, keyfile):
        self.answers, self.paths = {}, []
        self.directory_body = None      # bytes: the directory to serve instead of the default
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                served.paths.append(self.path)
                if self.path == "/directory":
                    body = served.directory_body or (
                        '{"newNonce": "%s/nonce", "renewalInfo": "%s/renewal-info"}' % (
                            served.base, served.base)).encode()
                    status, headers = 200, {}
                else:
                    cert_id = self.path.rsplit("/", 1)[-1]
                    status, body, headers = served.answers.get(
                        cert_id, (404, b'{"type": "urn:ietf:params:acme:error:malformed"}', {}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certfile), str(keyfile))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base = "https://%s:%d" % (HOST, self.port)
        self.directory = self.base + "/directory"
        self.thread = None


A2C_CONFIG = """\
[DEFAULT]
debug: False
[Nonce]
nonce_check_disable: False
[CAhandler]
handler_module: acme2certifier.cahandlers.openssl_ca_handler
issuing_ca_key: {ca}/key.pem
issuing_ca_cert: {ca}/cert.pem
issuing_ca_crl: {dir}/issued.crl
cert_save_path: {dir}/issued
ca_cert_chain_list: ["{root}"]
cert_validity_days: 30
[DBhandler]
handler: wsgi
dbfile: {dir}/acme_srv.db
[Challenge]
challenge_validation_disable: True
[Order]
tnauthlist_support: False
[Renewalinfo]
{renewal}
"""


class Acme2Certifier(object):
    """acme2certifier's WSGI application over TLS (the API's certificate issued by ca's
    root for 127.0.0.1), run by tests/a2c_server.py with the test venv's Python.
    renewal: the lines of its [Renewalinfo] section."""

    def __init__(self, workdir, ca, renewal="renewalthreshold_pctg: 85\nretry_after_timeout: 3600"):
        self.dir, self.ca = str(workdir), ca
        os.makedirs(os.path.join(self.dir, "issued"), exist_ok=True)
        self.config = os.path.join(self.dir, "acme_srv.cfg")
        with open(self.config, "w") as f:
            f.write(A2C_CONFIG.format(ca=ca.intermediate, dir=self.dir, root=ca.root_pem,
                                      renewal=renewal))
        self.api = ca.leaf("a2c-api-%s" % os.path.basename(self.dir))
        self.port, self.proc = servers.free_ports(1)[0], None
        self.log = os.path.join(self.dir, "server.log")
        self.directory = "https://%s:%d/directory" % (HOST, self.port)

    def start(self):
        env = dict(os.environ, ACME_SRV_CONFIGFILE=self.config,
                   ACME2CERTIFIER_I_KNOW_THE_RISK="1")   # challenge validation off: no DNS here
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", A2C_SERVER, HOST, str(self.port),
                 os.path.join(self.api, "fullchain.pem"), os.path.join(self.api, "key.pem")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.dir)
        deadline = time.monotonic() + READY
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection((HOST, self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("acme2certifier did not start:\n%s" % self.log_text())

    def log_text(self, tail=4000):
        """The server's output (its last tail characters; None: all of it)."""
        with open(self.log, "rb") as f:
            text = f.read().decode(errors="replace")
        return text[-tail:] if tail else text

    def stop(self):
        if self.proc is not None:
            servers.stop_process(self.proc)

    def issue(self, certbot_dir, name=NAME):
        """certbot certonly NAME against this server (--standalone on a free port, which
        nothing connects to: challenge validation is off); certbot's live directory."""
        certbot_dir = str(certbot_dir)
        argv = [CERTBOT, "--config-dir", os.path.join(certbot_dir, "config"), "--work-dir",
                os.path.join(certbot_dir, "work"), "--logs-dir", os.path.join(certbot_dir, "logs"),
                "--non-interactive", "certonly", "--server", self.directory, "--agree-tos",
                "-m", "admin@example.test", "--standalone",
                "--http-01-port", str(servers.free_ports(1)[0]), "--http-01-address", HOST,
                "-d", name]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=CERTBOT_TIMEOUT,
                              universal_newlines=True,
                              env=dict(os.environ, REQUESTS_CA_BUNDLE=self.ca.root_pem))
        assert proc.returncode == 0, "certbot failed:\n%s\nacme2certifier:\n%s" % (
            proc.stdout, self.log_text())
        return os.path.join(certbot_dir, "config", "live", name)
