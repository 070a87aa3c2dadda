"""Real chat, directory and database daemons from Debian packages, for the STARTTLS tests.

Each class runs one daemon software on 127.0.0.1, on free high ports, with a chain made by
make_certs.py (its fullchain.pem as the certificate file, its key.pem as the key). Every file a
daemon writes (configuration, data, logs, pid files, sockets) lives under its work directory;
no configuration under /etc is read or written, apart from the LDAP schema slapd includes.
start() starts all of a class's processes, stop() ends them; `ports` maps a name to a port:

    Prosody    prosody 0.12, one process: xmpp (c2s STARTTLS), xmpp-server (s2s STARTTLS),
               xmpps (c2s direct TLS, c2s_direct_tls_ports). Virtual host www.example.test
               has TLS; host notls.example.test has mod_tls disabled, so a stream to it gets
               features without <starttls/>: the same daemon with TLS off.
    InspIRCd   inspircd 3, three instances: irc (STARTTLS: ssl_gnutls + starttls modules;
               greets with a NOTICE, as it looks up the client's name) and ircs (implicit
               TLS) in one; irc-plain (starttls module but no TLS provider: it
               answers "691 STARTTLS is not enabled"); irc-bare (no starttls module: InspIRCd
               ignores unknown commands before registration, so STARTTLS gets no answer)
    Postgres   PostgreSQL (Debian 12: 15), one initdb cluster copied into two data
               directories, two postmasters run as the postgres user: postgres (ssl=on) and
               postgres-plain (ssl=off, answers the SSLRequest with "N")
    MariaDB    mariadb 10.11, one mariadb-install-db datadir copied into two, two servers:
               mysql (--ssl-cert/--ssl-key), mysql-plain (--skip-ssl: no CLIENT_SSL)
    Slapd      slapd 2.5 (GnuTLS), two instances: ldap (StartTLS) + ldaps in one; ldap-plain
               (no TLS configured: StartTLS ends in resultCode 2)

start() raises DaemonMissing (a reason to skip) when a program is not installed or we are not
root, and DaemonFailed with the daemon's own logs when it does not listen within READY
seconds (after a second try on fresh ports). stop() signals each process group we started
and waits for it to be gone, so no process outlives the test session. etc_state(paths)
snapshots files under /etc to prove the run left them alone.

Debian 12 packages: prosody inspircd postgresql mariadb-server slapd (see PACKAGES).
PostgreSQL 15 has no direct TLS (17+), so `--starttls postgres-direct` is tested against
`openssl s_server -alpn postgresql` in the test module instead.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

READY = 20.0  # seconds; the longest a daemon may take to listen on all its ports
SETUP = 60.0  # seconds; the longest initdb or mariadb-install-db may take
STOP = 10.0  # seconds; the longest stop() waits for a process group to exit
PROBE = 0.2  # seconds; one connection attempt while waiting for a port
POLL = 0.05  # seconds; how often stop() looks whether a process group is gone
LOG_TAIL = 60  # lines of each log shown when a daemon fails
HOST = "127.0.0.1"
NAME = "www.example.test"  # the TLS virtual host / server name the leaf certificates carry
NOTLS_NAME = "notls.example.test"  # Prosody's virtual host without TLS
PACKAGES = "prosody inspircd postgresql mariadb-server slapd"
ETC_PATHS = ["/etc/prosody", "/etc/inspircd", "/etc/postgresql", "/etc/postgresql-common",
             "/etc/mysql", "/etc/ldap"]


class DaemonMissing(Exception):
    """The daemon cannot run here (not installed, not root): a reason to skip."""


class DaemonFailed(Exception):
    """The daemon was there but did not come up; the message carries its logs."""


def free_ports(count):
    """count distinct free TCP ports on HOST (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def etc_state(paths):
    """{file: (size, mtime_ns, mode)} of every file under paths (files or directories)."""
    state = {}
    for top in paths:
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                state[path] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return state


def postgres_bindir():
    """The bin directory of the newest PostgreSQL installed the Debian way, or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    found.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _tail(path, lines=LOG_TAIL):
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError as e:
        return "(%s)" % e
    return "\n".join(text) or "(empty)"


def _write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _as_user(user):
    """A preexec_fn that drops root to user (PostgreSQL refuses to run as root)."""
    entry = pwd.getpwnam(user)

    def drop():
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return drop


def _end_group(proc):
    """SIGTERM to the process group of proc (a child we started), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never looks empty
            if proc.returncode is not None and not _group_alive(proc.pid):
                return
            time.sleep(POLL)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Daemon(object):
    """Processes of one daemon software; subclasses write configs and start them."""

    name = "daemon"
    programs = ()  # absolute paths that must exist
    users = ()  # system users the package creates

    def __init__(self, workdir, chain):
        self.workdir = os.path.join(str(workdir), self.name)
        self.chain = str(chain)  # a make_certs.py chain directory
        self.ports = {}
        self.procs = []
        self.logs = []  # files shown when the daemon fails
        os.makedirs(self.workdir)
        os.chmod(self.workdir, 0o755)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def check_installed(self):
        if os.geteuid() != 0:
            raise DaemonMissing("%s: the daemon tests start daemons as root" % self.name)
        for program in self.programs:
            if not program or not os.access(program, os.X_OK):
                raise DaemonMissing("%s: %s is not installed (Debian packages: %s)"
                                    % (self.name, program or "the server", PACKAGES))
        for user in self.users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise DaemonMissing("%s: no user %r (is the package installed?)"
                                    % (self.name, user))

    def copy_chain(self, owner=None):
        """fullchain.pem and key.pem copied into workdir/chain (key 0600); their paths."""
        folder = self.path("chain")
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o755)
        files = []
        for name, mode in (("fullchain.pem", 0o644), ("key.pem", 0o600)):
            target = os.path.join(folder, name)
            shutil.copyfile(os.path.join(self.chain, name), target)
            os.chmod(target, mode)
            if owner:
                shutil.chown(target, owner, owner)
            files.append(target)
        return files

    def spawn(self, argv, output, user=None):
        """Start argv in its own process group, stdout and stderr to workdir/output."""
        log = self.path(output)
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=self.workdir, preexec_fn=_as_user(user) if user else None)
        self.procs.append(proc)
        return proc

    def prepare(self, argv, output, user=None):
        """Run a setup command (initdb, mariadb-install-db) to its end, or DaemonFailed."""
        log = self.path(output)
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=self.workdir, timeout=SETUP,
                                  preexec_fn=_as_user(user) if user else None)
        if proc.returncode != 0:
            raise self.failed("%s exited with status %d" % (" ".join(argv), proc.returncode))

    def start(self):
        """Start and wait until every port listens; a second try on fresh ports, since
        another process may take a port between free_ports() and the daemon's bind."""
        self.check_installed()
        for attempt in (1, 2):
            try:
                self.launch()
                self.wait_listening()
                return self
            except DaemonFailed:
                self.stop()
                if attempt == 2:
                    raise
                self._reset()
            except BaseException:
                self.stop()
                raise

    def _reset(self):
        shutil.rmtree(self.workdir)
        os.makedirs(self.workdir)
        os.chmod(self.workdir, 0o755)
        self.ports, self.logs = {}, []

    def launch(self):
        raise NotImplementedError

    def wait_listening(self):
        deadline = time.monotonic() + READY
        waiting = dict(self.ports)
        while waiting:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise self.failed("%s exited with status %s (ports %s)"
                                      % (" ".join(proc.args), proc.returncode, self.ports))
            for key, port in list(waiting.items()):
                try:
                    socket.create_connection((HOST, port), timeout=PROBE).close()
                    del waiting[key]
                except OSError:
                    pass
            if waiting and time.monotonic() > deadline:
                raise self.failed("not listening after %.0f s on %s" % (READY, waiting))
            if waiting:
                time.sleep(PROBE)

    def failed(self, why):
        parts = ["%s: %s" % (self.name, why)]
        for log in self.logs:
            parts.append("--- %s ---\n%s" % (log, _tail(log)))
        return DaemonFailed("\n".join(parts))

    def log_text(self):
        """Everything the daemon logged so far, all log files together."""
        text = []
        for log in self.logs:
            try:
                with open(log, errors="replace") as f:
                    text.append(f.read())
            except OSError:
                pass
        return "\n".join(text)

    def stop(self):
        for proc in self.procs:
            _end_group(proc)
        self.procs = []


# Prosody ----------------------------------------------------------------------------------

PROSODY_CONFIG = """\
run_as_root = true
data_path = "{dir}/data"
certificates = "{dir}/certs"
plugin_paths = {{}}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {xmpp} }}
s2s_ports = {{ {xmpp-server} }}
c2s_direct_tls_ports = {{ {xmpps} }}
s2s_direct_tls_ports = {{}}
legacy_ssl_ports = {{}}
http_ports = {{}}
https_ports = {{}}
component_ports = {{}}
modules_enabled = {{ "tls"; "saslauth"; "disco"; "dialback" }}
modules_disabled = {{ "posix" }} -- posix would daemonize, syslog and write a pid file
log = {{ {{ levels = {{ min = "info" }}; to = "file"; filename = "{dir}/prosody.log" }} }}
ssl = {{ certificate = "{cert}"; key = "{key}" }}
s2s_secure_auth = false

VirtualHost "{name}"

VirtualHost "{notls}"
    modules_disabled = {{ "tls" }}
    c2s_require_encryption = false
    allow_unencrypted_plain_auth = true
"""


class Prosody(Daemon):
    name = "prosody"
    programs = ("/usr/bin/prosody",)

    def launch(self):
        cert, key = self.copy_chain()
        for folder in ("data", "certs"):
            os.makedirs(self.path(folder), exist_ok=True)
        self.ports = dict(zip(("xmpp", "xmpp-server", "xmpps"), free_ports(3)))
        values = dict(self.ports, dir=self.workdir, cert=cert, key=key, name=NAME,
                      notls=NOTLS_NAME)
        config = self.path("prosody.cfg.lua")
        _write(config, PROSODY_CONFIG.format(**values))
        self.logs.append(self.path("prosody.log"))
        self.spawn(["/usr/bin/prosody", "-F", "--config", config], "prosody.out")


# InspIRCd ---------------------------------------------------------------------------------

INSPIRCD_COMMON = """\
<server name="irc.example.test" description="certgrab test" network="certgrabtest">
<admin name="certgrab" nick="certgrab" email="root@example.test">
<path configdir="{dir}" datadir="{dir}" logdir="{dir}">
<pid file="{dir}/{instance}.pid">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{dir}/{instance}.log">
<connect allow="*" timeout="60" resolvehostnames="{resolve}" useident="no" localmax="100"
         globalmax="100">
<dns server="127.0.0.1" timeout="1">
"""

INSPIRCD_TLS = """\
<module name="ssl_gnutls">
<module name="starttls">
<sslprofile name="certgrab" provider="gnutls" certfile="{cert}" keyfile="{key}" hash="sha256"
            requestclientcert="no">
<starttls provider="certgrab">
<bind address="127.0.0.1" port="{irc}" type="clients">
<bind address="127.0.0.1" port="{ircs}" type="clients" sslprofile="certgrab">
"""

INSPIRCD_PLAIN = """\
<module name="starttls">
<bind address="127.0.0.1" port="{irc-plain}" type="clients">
"""

INSPIRCD_BARE = """\
<bind address="127.0.0.1" port="{irc-bare}" type="clients">
"""


class InspIRCd(Daemon):
    name = "inspircd"
    programs = ("/usr/sbin/inspircd",)

    def launch(self):
        cert, key = self.copy_chain()
        self.ports = dict(zip(("irc", "ircs", "irc-plain", "irc-bare"), free_ports(4)))
        for instance, body in (("tls", INSPIRCD_TLS), ("plain", INSPIRCD_PLAIN),
                               ("bare", INSPIRCD_BARE)):
            # The TLS instance looks up each client's name, as by default, and so greets with
            # "NOTICE * :*** Looking up your hostname..." (the lookup asks 127.0.0.1, where
            # no DNS server answers, so it fails after <dns timeout>).
            resolve = "yes" if instance == "tls" else "no"
            values = dict(self.ports, dir=self.workdir, instance=instance, cert=cert, key=key,
                          resolve=resolve)
            config = self.path(instance + ".conf")
            _write(config, (INSPIRCD_COMMON + body).format(**values))
            self.logs.append(self.path(instance + ".log"))
            self.spawn(["/usr/sbin/inspircd", "--config=" + config, "--nofork", "--runasroot"],
                       instance + ".out")


# PostgreSQL -------------------------------------------------------------------------------

class Postgres(Daemon):
    name = "postgres"
    users = ("postgres",)

    def __init__(self, workdir, chain):
        Daemon.__init__(self, workdir, chain)
        self.bindir = postgres_bindir()
        self.programs = (self.bindir and os.path.join(self.bindir, "postgres"),)

    def launch(self):
        shutil.chown(self.workdir, "postgres", "postgres")
        cert, key = self.copy_chain(owner="postgres")  # the key must be the server's, 0600
        self.ports = dict(zip(("postgres", "postgres-plain"), free_ports(2)))
        initdb = os.path.join(self.bindir, "initdb")
        self.prepare([initdb, "-D", self.path("data"), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C"], "initdb.log", user="postgres")
        self.prepare(["cp", "-a", self.path("data"), self.path("data-plain")], "copy.log")
        tls = ["-c", "ssl=on", "-c", "ssl_cert_file=" + cert, "-c", "ssl_key_file=" + key]
        for port, data, options in (("postgres", "data", tls),
                                    ("postgres-plain", "data-plain", ["-c", "ssl=off"])):
            self.spawn([os.path.join(self.bindir, "postgres"), "-D", self.path(data),
                        "-c", "listen_addresses=" + HOST, "-c", "port=%d" % self.ports[port],
                        "-c", "unix_socket_directories=" + self.workdir, "-c", "fsync=off",
                        "-c", "logging_collector=off"] + options, port + ".log", user="postgres")


# MariaDB ----------------------------------------------------------------------------------

class MariaDB(Daemon):
    name = "mariadb"
    programs = ("/usr/sbin/mariadbd", "/usr/bin/mariadb-install-db")

    def launch(self):
        cert, key = self.copy_chain()
        self.ports = dict(zip(("mysql", "mysql-plain"), free_ports(2)))
        self.prepare(["/usr/bin/mariadb-install-db", "--no-defaults", "--user=root",
                      "--datadir=" + self.path("data"), "--auth-root-authentication-method=normal",
                      "--skip-test-db", "--skip-name-resolve"], "install-db.log")
        self.prepare(["cp", "-a", self.path("data"), self.path("data-plain")], "copy.log")
        for port, data, tls in (("mysql", "data", ["--ssl-cert=" + cert, "--ssl-key=" + key]),
                                ("mysql-plain", "data-plain", ["--skip-ssl"])):
            self.spawn(["/usr/sbin/mariadbd", "--no-defaults", "--user=root",
                        "--datadir=" + self.path(data), "--port=%d" % self.ports[port],
                        "--bind-address=" + HOST, "--socket=" + self.path(port + ".sock"),
                        "--pid-file=" + self.path(port + ".pid"), "--tmpdir=" + self.workdir,
                        "--log-error=" + self.path(port + ".err"), "--skip-name-resolve",
                        "--skip-log-bin", "--innodb-buffer-pool-size=16M"] + tls, port + ".out")
            self.logs.append(self.path(port + ".err"))


# slapd ------------------------------------------------------------------------------------

SLAPD_CONFIG = """\
include /etc/ldap/schema/core.schema
pidfile {dir}/{instance}.pid
argsfile {dir}/{instance}.args
"""

SLAPD_TLS = """\
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
"""


class Slapd(Daemon):
    name = "slapd"
    programs = ("/usr/sbin/slapd",)

    def launch(self):
        cert, key = self.copy_chain()
        self.ports = dict(zip(("ldap", "ldaps", "ldap-plain"), free_ports(3)))
        urls = {"tls": "ldap://%s:%d/ ldaps://%s:%d/" % (HOST, self.ports["ldap"], HOST,
                                                          self.ports["ldaps"]),
                "plain": "ldap://%s:%d/" % (HOST, self.ports["ldap-plain"])}
        for instance, body in (("tls", SLAPD_CONFIG + SLAPD_TLS), ("plain", SLAPD_CONFIG)):
            config = self.path(instance + ".conf")
            _write(config, body.format(dir=self.workdir, instance=instance, cert=cert, key=key))
            # -d keeps slapd in the foreground and logs to stderr (connections, operations)
            self.spawn(["/usr/sbin/slapd", "-d", "stats", "-h", urls[instance], "-f", config],
                       instance + ".log")
