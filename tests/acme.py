"""A real ACME CA on loopback for the end-to-end tests: pebble, certbot and nginx (issue 11).

The leader renews its certificate the way production does: certbot (Debian's) asks pebble
(Let's Encrypt's test CA, Debian package `pebble`) for www.example.test; pebble's validation
authority resolves that name with pebble-challtestsrv (every A query answers 127.0.0.1) and
fetches the HTTP-01 token from the leader's nginx, which serves certbot's webroot on pebble's
`httpPort`. The same nginx serves certbot's live fullchain.pem and privkey.pem over TLS on
another loopback port: that is what the followers (certgrab) fetch.

    Pebble(root)             pebble + pebble-challtestsrv, each on fresh loopback ports; the
                             API has its own certificate made here with openssl (api.pem);
                             root.pem is the CA root from the management API (/roots/0), a
                             new one on every start: the followers' --cafile
    Certbot(workdir, pebble, webroot)
                             certbot with its config, work and logs directories under workdir;
                             certonly(), renew(), live(file), replace_key(pem)
    Nginx(root, name, http_port=None, webroot=None, sites=())
                             nginx (master + workers, so that it can reload) serving the
                             webroot over HTTP and a TLS site for each (fullchain, key) of
                             sites, on fresh ports; add_sites(), and reload() which waits
                             until the old workers are gone and every site hands out the leaf
                             of its fullchain file
    Leader(workdir, pebble)  Nginx + Certbot: the first certificate is issued while nginx
                             serves HTTP only, then the TLS site is added; renew(), files()
                             (the live certificates as --out-dir must hold them),
                             validations() (pebble's HTTP-01 requests in nginx's access log)
    Follower(root, name, key_pem)
                             a machine with a copy of the leader's key (key.pem), the files
                             certgrab writes (live/, privkey.pem included) and the lines its
                             deploy hook appends
    pem_fields(path)         serial, notBefore, sha256 and public key of a certificate, by
                             openssl (independent of certgrab's own DER reader)

Everything runs under a root directory the nginx workers can read (pytest's tmp is 0700);
processes are started through daemons.Daemon (own process group, log files, bounded waits,
logs in the failure message) and stopped at teardown. Nothing is written under /etc:
ETC_PATHS are snapshotted by the session fixture and must be unchanged at the end.

The fixtures at the end are a pytest plugin: test modules load them with
`pytest_plugins = ["acme"]`, so that pebble starts once per session however many modules
use it.
"""

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest

import daemons
from daemons import HOST, write_file
from helpers import OUT_FILES
from make_certs import NAME, ders_to_pem, openssl, pem_ders, read_ders
from servers import free_ports, nginx_config

CERTBOT = "/usr/bin/certbot"
NGINX = "/usr/sbin/nginx"
PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
CERTBOT_TIMEOUT = 90.0  # seconds; one certbot run (about 2.5 s here: account, order, HTTP-01)
MANAGEMENT_TIMEOUT = 10.0  # seconds; one GET from pebble's management API
RELOAD = 15.0  # seconds; the longest nginx may take to hand out a new leaf after SIGHUP
PROBE = 0.2  # seconds; one TLS connection attempt while waiting for a reload
NEXT_SECOND = 2.0  # seconds; the longest renew() waits for a notBefore newer than the last
API_DAYS = 2  # days; the validity of pebble's API certificate, which lives one session
ETC_PATHS = ["/etc/letsencrypt", "/etc/nginx"]  # certbot's and nginx's defaults: untouched
LOG_TAIL = 40  # lines of certbot's log shown when it fails
PEBBLE_AGENT = "LetsEncrypt-Pebble-VA"  # the User-Agent of pebble's HTTP-01 requests

# pebble's environment: no random sleeps before validating, no nonce rejected on purpose (a
# certbot run would retry, slowly), and no authorization reused, so that every renewal
# validates HTTP-01 against the leader for real.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
              "PEBBLE_AUTHZREUSE": "0"}

HTTP_SERVER = """\
    server {{
        listen {host}:{port};
        server_name {name};
        location /.well-known/acme-challenge/ {{ root {webroot}; }}
        location / {{ return 404; }}
    }}
"""

TLS_SERVER = """\
    server {{
        listen {host}:{port} ssl;
        server_name {name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate     {fullchain};
        ssl_certificate_key {key};
        return 204;
    }}
"""


def new_key(path):
    """A new EC P-256 private key (certbot 2's default key type) in path, mode 0600."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", path)
    os.chmod(str(path), 0o600)
    return path


def public_key_of_key(path):
    """The DER SubjectPublicKeyInfo of the private key in path."""
    return openssl("pkey", "-in", path, "-pubout", "-outform", "DER")


def pem_fields(path):
    """{"serial": int, "not_before": epoch seconds, "sha256": hex, "public_key": DER} of the
    first certificate in the PEM file path."""
    der = read_ders(path)[0]
    pem = ders_to_pem([der]).encode()
    text = openssl("x509", "-noout", "-serial", "-startdate", input=pem).decode()
    fields = dict(line.split("=", 1) for line in text.splitlines())
    public = openssl("x509", "-noout", "-pubkey", input=pem)
    return {"serial": int(fields["serial"], 16),
            "not_before": ssl.cert_time_to_seconds(fields["notBefore"]),
            "sha256": hashlib.sha256(der).hexdigest(),
            "public_key": openssl("pkey", "-pubin", "-outform", "DER", input=public)}


def served_leaf(port, timeout=PROBE):
    """The DER leaf a TLS server on HOST:port hands out for NAME (not verified), or None
    when nothing answers yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=NAME) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def _tail(path, lines=LOG_TAIL):
    try:
        with open(str(path), errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError as e:
        return "(%s)" % e


def _children(pid):
    """The process ids of pid's children (Linux /proc; empty where the kernel lacks it)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return set(int(p) for p in f.read().split())
    except OSError:
        return set()


class Pebble(daemons.Daemon):
    """pebble and pebble-challtestsrv on fresh loopback ports, under root/pebble."""

    name = "pebble"
    programs = (PEBBLE, CHALLTESTSRV)
    packages = "pebble"

    def __init__(self, root):
        super(Pebble, self).__init__(root, chain=None)
        self.http_port = None  # where pebble's VA fetches HTTP-01 tokens: the leader's nginx

    @property
    def directory_url(self):
        return "https://%s:%d/dir" % (HOST, self.ports["api"])

    @property
    def api_cert(self):
        """The API's certificate: certbot's REQUESTS_CA_BUNDLE."""
        return self.path("api.pem")

    @property
    def root_pem(self):
        """Pebble's root CA (new on every start): the followers' --cafile."""
        return self.path("root.pem")

    def launch(self):
        api, management, dns, dns_management, http, tls = free_ports(6)
        self.ports = {"api": api, "management": management, "dns": dns,
                      "dns-management": dns_management}
        self.http_port = http
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", self.path("api.key"), "-out", self.api_cert,
                "-days", API_DAYS, "-subj", "/CN=pebble API",
                "-addext", "subjectAltName=IP:%s,DNS:localhost" % HOST)
        config = {"pebble": {
            "listenAddress": "%s:%d" % (HOST, api),
            "managementListenAddress": "%s:%d" % (HOST, management),
            "certificate": self.api_cert, "privateKey": self.path("api.key"),
            "httpPort": http, "tlsPort": tls, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        write_file(self.path("pebble.json"), json.dumps(config, indent=2))
        # Only the DNS server: A queries answer 127.0.0.1, AAAA nothing (so the VA dials
        # IPv4); challtestsrv's own HTTP-01/TLS-ALPN-01 responders are off.
        self.spawn([CHALLTESTSRV, "-defaultIPv4", HOST, "-defaultIPv6", "",
                    "-dns01", "%s:%d" % (HOST, dns), "-http01", "", "-https01", "",
                    "-tlsalpn01", "", "-management", "%s:%d" % (HOST, dns_management)],
                   "challtestsrv.log")
        self.spawn([PEBBLE, "-config", self.path("pebble.json"),
                    "-dnsserver", "%s:%d" % (HOST, dns)], "pebble.log", env=PEBBLE_ENV)

    def wait_listening(self):
        super(Pebble, self).wait_listening()
        write_file(self.root_pem, self.management("/roots/0"))

    def management(self, path):
        """GET path from the management API (verified with the API's certificate)."""
        context = ssl.create_default_context(cafile=self.api_cert)
        url = "https://%s:%d%s" % (HOST, self.ports["management"], path)
        try:
            with urllib.request.urlopen(url, context=context,
                                        timeout=MANAGEMENT_TIMEOUT) as response:
                return response.read().decode()
        except OSError as e:
            raise self.failed("GET %s: %s" % (url, e))

    def intermediate_der(self):
        """The intermediate pebble signs leaves with (the one its root issued)."""
        return pem_ders(self.management("/intermediates/0"))[0]


class Certbot(object):
    """Debian's certbot with everything under workdir, talking to pebble."""

    def __init__(self, workdir, pebble, webroot):
        self.workdir, self.pebble, self.webroot = str(workdir), pebble, str(webroot)

    def dir(self, name):
        return os.path.join(self.workdir, name)

    def live(self, name):
        """A file of the lineage's live directory (cert.pem, chain.pem, fullchain.pem,
        privkey.pem), through certbot's symbolic link."""
        return os.path.join(self.dir("config"), "live", NAME, name)

    def run(self, *args):
        """certbot ARGS..., which must succeed: the CompletedProcess, or AssertionError with
        its output and the tail of its log."""
        argv = [CERTBOT, "--config-dir", self.dir("config"), "--work-dir", self.dir("work"),
                "--logs-dir", self.dir("logs"), "--non-interactive"] + list(args)
        env = dict(os.environ, REQUESTS_CA_BUNDLE=self.pebble.api_cert)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env, timeout=CERTBOT_TIMEOUT,
                              universal_newlines=True)
        assert proc.returncode == 0, (
            "%s exited with %d:\n%s\n--- letsencrypt.log ---\n%s\n%s"
            % (" ".join(argv), proc.returncode, proc.stdout,
               _tail(os.path.join(self.dir("logs"), "letsencrypt.log")),
               self.pebble.failed("(pebble's logs)")))
        return proc

    def certonly(self, *extra):
        """The first certificate for NAME, validated through the webroot."""
        return self.run("certonly", "--server", self.pebble.directory_url, "--agree-tos",
                        "--register-unsafely-without-email", "--webroot",
                        "-w", self.webroot, "-d", NAME, *extra)

    def renew(self, *extra):
        """Renew now, whatever the expiry date: renew --force-renewal EXTRA..."""
        return self.run("renew", "--force-renewal", "--no-random-sleep-on-renew", *extra)

    def replace_key(self, pem):
        """Swap the lineage's current private key for pem (text), so that the next
        `renew --reuse-key` requests a certificate for that key. certbot 2.1 cannot be handed
        an existing key for a lineage; its archive file is what --reuse-key reads."""
        target = os.path.realpath(self.live("privkey.pem"))
        write_file(target, pem, mode=0o600)


class Nginx(daemons.Daemon):
    """nginx with a master process (so that it reloads), serving the webroot over HTTP on
    http_port (if given) and a TLS site for each (fullchain, key) of sites and add_sites()."""

    programs = (NGINX,)
    packages = "nginx"

    def __init__(self, root, name, http_port=None, webroot=None, sites=()):
        self.name = name
        super(Nginx, self).__init__(root, chain=None)
        self.http_port, self.webroot = http_port, webroot
        self.sites = [(None, fullchain, key) for fullchain, key in sites]  # (TLS port, ...)

    def launch(self):
        tls_ports = free_ports(len(self.sites))
        self.sites = [(port, fullchain, key)
                      for port, (_, fullchain, key) in zip(tls_ports, self.sites)]
        self.ports = dict(("tls%d" % i, port) for i, (port, _, _) in enumerate(self.sites))
        if self.http_port:
            self.ports["http"] = self.http_port
        self._write_config()
        self.spawn([NGINX, "-p", self.workdir, "-c", self.path("nginx.conf"),
                    "-e", self.path("error.log")], "nginx.out")
        self.logs.append(self.path("error.log"))

    def _write_config(self):
        servers = []
        if self.http_port:
            servers.append(HTTP_SERVER.format(host=HOST, port=self.http_port, name=NAME,
                                              webroot=self.webroot))
        for port, fullchain, key in self.sites:
            servers.append(TLS_SERVER.format(host=HOST, port=port, name=NAME,
                                             fullchain=fullchain, key=key))
        write_file(self.path("nginx.conf"), nginx_config(
            self.workdir, "".join(servers), access_log=os.path.join(self.workdir, "access.log")))

    def addresses(self):
        return ["%s:%d" % (HOST, port) for port, _, _ in self.sites]

    def add_sites(self, files):
        """Serve one more TLS site for each (fullchain, key) in files, on fresh ports."""
        ports = free_ports(len(files))
        self.sites += [(port, fullchain, key) for port, (fullchain, key) in zip(ports, files)]
        self.reload()

    def reload(self):
        """Rewrite the configuration, SIGHUP the master and wait until every TLS site hands
        out the leaf of its fullchain file (RELOAD seconds at most)."""
        self._write_config()
        master = self.procs[0]
        old_workers = _children(master.pid)
        os.kill(master.pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD
        while old_workers & _children(master.pid):  # an old worker may still accept
            if master.poll() is not None or time.monotonic() > deadline:
                raise self.failed("the old workers %s still run %.0f s after the reload"
                                  % (sorted(old_workers), RELOAD))
            time.sleep(PROBE / 4)
        for port, fullchain, _ in self.sites:
            want = read_ders(fullchain)[0]
            while served_leaf(port) != want:
                if self.procs[0].poll() is not None or time.monotonic() > deadline:
                    raise self.failed("port %d does not serve the leaf of %s %.0f s after "
                                      "the reload" % (port, fullchain, RELOAD))
                time.sleep(PROBE)


class Leader(object):
    """The machine that renews: nginx serving certbot's webroot and its live certificate."""

    def __init__(self, workdir, pebble):
        self.workdir = str(workdir)
        os.makedirs(self.workdir)
        os.chmod(self.workdir, 0o755)
        webroot = os.path.join(self.workdir, "webroot")
        os.makedirs(webroot)
        os.chmod(webroot, 0o755)
        self.nginx = Nginx(self.workdir, "nginx", http_port=pebble.http_port, webroot=webroot)
        self.certbot = Certbot(os.path.join(self.workdir, "certbot"), pebble, webroot)

    @property
    def address(self):
        return self.nginx.addresses()[0]

    def start(self):
        """nginx on HTTP only, the first certificate (key reused on renewals, as a fleet
        sharing one key needs), then the TLS site serving it."""
        self.nginx.start()
        try:
            self.certbot.certonly("--reuse-key")
            self.nginx.add_sites([(self.certbot.live("fullchain.pem"),
                                   self.certbot.live("privkey.pem"))])
        except BaseException:
            self.nginx.stop()
            raise
        return self

    def renew(self, *extra):
        """certbot renew --force-renewal EXTRA..., then nginx reloaded and serving the new
        leaf. Waits first until the wall clock is a second past the current leaf's
        notBefore, so that the new one is strictly newer (X.509 times are in seconds)."""
        not_before = pem_fields(self.certbot.live("cert.pem"))["not_before"]
        time.sleep(min(max(0.0, not_before + 1.0 - time.time()), NEXT_SECOND))
        self.certbot.renew(*extra)
        self.nginx.reload()

    def files(self):
        """{file: [DER, ...]} of certbot's live cert.pem, chain.pem and fullchain.pem."""
        return dict((name, read_ders(self.certbot.live(name))) for name in OUT_FILES)

    def validations(self):
        """How many HTTP-01 requests pebble's validation authority made to this leader."""
        log = read_text(os.path.join(self.nginx.workdir, "access.log"))
        return sum(1 for line in log.splitlines()
                   if "/.well-known/acme-challenge/" in line and PEBBLE_AGENT in line)

    def stop(self):
        self.nginx.stop()


class Follower(object):
    """A machine running certgrab from cron: its copy of the leader's key, the files
    certgrab writes and its deploy hook's log."""

    def __init__(self, root, name, key_pem):
        self.dir = os.path.join(str(root), name)
        os.makedirs(self.dir)
        self.key = os.path.join(self.dir, "key.pem")
        write_file(self.key, key_pem, mode=0o600)
        self.out = os.path.join(self.dir, "live")
        self.hook_log = os.path.join(self.dir, "hook.log")

    def file(self, name):
        return os.path.join(self.out, name)

    def hook(self):
        """A deploy hook appending the lineage certgrab passes, one line per run."""
        return 'echo "$RENEWED_LINEAGE" >> %s' % self.hook_log

    def hook_runs(self):
        try:
            with open(self.hook_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def sync_args(self, leader, pebble, *extra):
        """The argv of the cron job: fetch from the leader, verify against pebble's root,
        check the leaf against the key, install (with the key as privkey.pem, which the
        follower's own nginx serves) and run the hook."""
        return [leader.address, "-n", NAME, "--cafile", pebble.root_pem,
                "--out-dir", self.out, "--key-path", self.key, "--privkey",
                "--deploy-hook", self.hook()] + list(extra)


def read_text(path):
    with open(str(path)) as f:
        return f.read()


# Fixtures (a pytest plugin: test modules say `pytest_plugins = ["acme"]`) ---------------------

@pytest.fixture(scope="session")
def acme_root():
    """A work directory the nginx workers can read; at the end of the session nothing under
    ETC_PATHS has changed (certbot and nginx were kept to their own directories)."""
    with daemons.work_root("certgrab-acme-", ETC_PATHS, "the ACME tests") as root:
        yield root


@pytest.fixture(scope="session")
def pebble(acme_root):
    """pebble + challtestsrv, started once per session (skips locally where not installed or
    not root; CI installs the packages and runs as root)."""
    for program in (CERTBOT, NGINX):
        if not os.access(program, os.X_OK):
            pytest.skip("%s is not installed (Debian packages: certbot, nginx)" % program)
    server = daemons.start_or_skip(Pebble(acme_root))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def leader(acme_root, pebble, request):
    """A leader with its first certificate, per test module (each module has its own certbot
    lineage; they take turns on pebble's HTTP port)."""
    server = Leader(os.path.join(acme_root, "leader-" + request.module.__name__), pebble)
    server.start()
    yield server
    server.stop()
