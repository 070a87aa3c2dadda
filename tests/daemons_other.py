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

Starting, waiting for the ports, the logs on failure and stopping are daemons.py's Daemon:
start() raises DaemonMissing (a reason to skip) or DaemonFailed (with the daemon's logs).

Debian 12 packages: prosody inspircd postgresql mariadb-server slapd.
PostgreSQL 15 has no direct TLS (17+), so `--starttls postgres-direct` is tested against
`openssl s_server -alpn postgresql` in the test module instead.
"""

import glob
import os
import shutil

from daemons import HOST, Daemon, write_file
from make_certs import NAME
from servers import free_ports

NOTLS_NAME = "notls.example.test"  # Prosody's virtual host without TLS


def postgres_bindir():
    """The bin directory of the newest PostgreSQL installed the Debian way, or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    found.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


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
    packages = "prosody"

    def launch(self):
        cert, key = self.copy_chain()
        for folder in ("data", "certs"):
            os.makedirs(self.path(folder), exist_ok=True)
        self.ports = dict(zip(("xmpp", "xmpp-server", "xmpps"), free_ports(3)))
        values = dict(self.ports, dir=self.workdir, cert=cert, key=key, name=NAME,
                      notls=NOTLS_NAME)
        config = self.path("prosody.cfg.lua")
        write_file(config, PROSODY_CONFIG.format(**values))
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
    packages = "inspircd"

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
            write_file(config, (INSPIRCD_COMMON + body).format(**values))
            self.logs.append(self.path(instance + ".log"))
            self.spawn(["/usr/sbin/inspircd", "--config=" + config, "--nofork", "--runasroot"],
                       instance + ".out")


# PostgreSQL -------------------------------------------------------------------------------

class Postgres(Daemon):
    name = "postgres"
    users = ("postgres",)
    packages = "postgresql"

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
    packages = "mariadb-server"

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
    packages = "slapd"

    def launch(self):
        cert, key = self.copy_chain()
        self.ports = dict(zip(("ldap", "ldaps", "ldap-plain"), free_ports(3)))
        urls = {"tls": "ldap://%s:%d/ ldaps://%s:%d/" % (HOST, self.ports["ldap"], HOST,
                                                          self.ports["ldaps"]),
                "plain": "ldap://%s:%d/" % (HOST, self.ports["ldap-plain"])}
        for instance, body in (("tls", SLAPD_CONFIG + SLAPD_TLS), ("plain", SLAPD_CONFIG)):
            config = self.path(instance + ".conf")
            write_file(config, body.format(dir=self.workdir, instance=instance, cert=cert, key=key))
            # -d keeps slapd in the foreground and logs to stderr (connections, operations)
            self.spawn(["/usr/sbin/slapd", "-d", "stats", "-h", urls[instance], "-f", config],
                       instance + ".log")
