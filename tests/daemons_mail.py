"""Real mail, FTP and news daemons from Debian packages, for the STARTTLS tests.

Each class runs one daemon software on 127.0.0.1, on free high ports, with a chain made by
make_certs.py (its fullchain.pem as the certificate file, its key.pem as the key). Every file a
daemon writes (configuration, queue, state, logs, pid files, sockets) lives under its work
directory; nothing under /etc is read for configuration or written. Each class starts all of
its processes in start() and ends them in stop(); `ports` maps a name to a port:

    Postfix   postfix 3.x, one master:  smtp (STARTTLS), smtps (implicit TLS),
              smtp-plain (no TLS), smtp-slow (postscreen: "220-", then ~1 s, then "220 ");
              EHLO refused.example.test is rejected at once (554), any other name accepted
    Dovecot   dovecot 2.3 + pigeonhole, two instances: imap, pop3, lmtp, sieve (STARTTLS),
              imaps, pop3s (implicit TLS); imap-plain, pop3-plain, lmtp-plain, sieve-plain
              (an instance with ssl = no)
    Vsftpd    vsftpd 3.0, three instances: ftp (AUTH TLS, a three-line banner), ftps
              (implicit_ssl=YES), ftp-plain (ssl_enable=NO)
    Nnrpd     INN 2.7 nnrpd -D, three instances: nntp (STARTTLS), nntps (-S), nntp-plain (no
              certificate configured: INN still lists STARTTLS, then answers 580)

Starting, waiting for the ports, the logs on failure and stopping are daemons.py's Daemon:
start() raises DaemonMissing (a reason to skip) or DaemonFailed (with the daemon's logs).

Debian packages: postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved
vsftpd inn2 (see .ci/run for the inn2 postinst workaround on hosts without a domain name).
"""

import os
import shutil
import subprocess

from daemons import HOST, STOP, Daemon, write_file
from servers import free_ports

# Postfix ----------------------------------------------------------------------------------

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/postfix.log
maillog_file_prefixes = {dir}
myhostname = postfix.example.test
mydomain = example.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtputf8_enable = no
biff = no
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_security_level = may
smtpd_delay_reject = no
smtpd_helo_restrictions = check_helo_access inline:{{ {{ refused.example.test = REJECT certgrab test }} }}
postscreen_greet_banner = $smtpd_banner
postscreen_greet_wait = 1s
postscreen_greet_ttl = 1s
postscreen_greet_action = enforce
postscreen_dnsbl_sites =
postscreen_access_list =
postscreen_cache_map = btree:{dir}/data/postscreen_cache
"""

# Every smtpd runs unchrooted (its files are in the work directory, not under a chroot).
POSTFIX_MASTER = """\
{ip}:{smtp} inet n - n - - smtpd
{ip}:{smtps} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
{ip}:{plain} inet n - n - - smtpd -o smtpd_tls_security_level=none
{ip}:{slow} inet n - n - 1 postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Daemon):
    """`postfix -c WORKDIR/conf start-fg`: one master serving four ports."""

    name = "postfix"
    programs = ("/usr/sbin/postfix", "/usr/lib/postfix/sbin/master")
    users = ("postfix",)
    packages = "postfix"

    def launch(self):
        cert, key = self.copy_chain()
        smtp, smtps, plain, slow = free_ports(4)
        self.ports = {"smtp": smtp, "smtps": smtps, "smtp-plain": plain, "smtp-slow": slow}
        for sub in ("conf", "queue", "data"):
            os.makedirs(self.path(sub))
        shutil.chown(self.path("data"), "postfix", "postfix")  # master.lock, caches
        write_file(self.path("conf", "main.cf"),
               POSTFIX_MAIN.format(dir=self.workdir, key=key, cert=cert))
        write_file(self.path("conf", "master.cf"),
               POSTFIX_MASTER.format(ip=HOST, smtp=smtp, smtps=smtps, plain=plain, slow=slow))
        self.logs.append(self.path("postfix.log"))
        self.spawn(["/usr/sbin/postfix", "-c", self.path("conf"), "start-fg"], "start-fg.out")

    def ask_to_stop(self):
        if self.procs:
            subprocess.run(["/usr/sbin/postfix", "-c", self.path("conf"), "stop"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=STOP)


# Dovecot ----------------------------------------------------------------------------------

DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = certgrab-test-{instance}
log_path = {dir}/dovecot.log
protocols = imap pop3 lmtp sieve
listen = {ip}
hostname = dovecot.example.test
{tls}
mail_location = maildir:{dir}/mail/%u
passdb {{
  driver = static
  args = password=unused
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={dir}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
{imaps}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
{pop3s}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {lmtp}
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    port = {sieve}
  }}
}}
"""

DOVECOT_IMPLICIT = """\
  inet_listener {name} {{
    port = {port}
    ssl = yes
  }}"""


class Dovecot(Daemon):
    """Two `dovecot -F -c CONF` masters: one with TLS, one with ssl = no."""

    name = "dovecot"
    programs = ("/usr/sbin/dovecot", "/usr/lib/dovecot/imap-login", "/usr/lib/dovecot/pop3-login",
                "/usr/lib/dovecot/lmtp", "/usr/lib/dovecot/managesieve-login")
    users = ("dovecot", "dovenull")
    packages = "dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved"

    def launch(self):
        cert, key = self.copy_chain()
        ports = free_ports(10)
        tls = dict(zip(("imap", "pop3", "lmtp", "sieve", "imaps", "pop3s"), ports[:6]))
        plain = dict(zip(("imap", "pop3", "lmtp", "sieve"), ports[6:]))
        self.ports = dict(tls)
        self.ports.update(("%s-plain" % k, v) for k, v in plain.items())
        self._instance("tls", "ssl = yes\nssl_cert = <%s\nssl_key = <%s" % (cert, key),
                       tls, implicit=True)
        self._instance("plain", "ssl = no", plain, implicit=False)

    def _instance(self, instance, tls, ports, implicit):
        folder = self.path(instance)
        os.makedirs(folder)
        os.chmod(folder, 0o755)
        extra = {}
        for name in ("imaps", "pop3s"):
            extra[name] = DOVECOT_IMPLICIT.format(name=name, port=ports[name]) if implicit else ""
        conf = os.path.join(folder, "dovecot.conf")
        write_file(conf, DOVECOT_CONF.format(dir=folder, instance=instance, ip=HOST, tls=tls,
                                         imap=ports["imap"], pop3=ports["pop3"],
                                         lmtp=ports["lmtp"], sieve=ports["sieve"], **extra))
        self.logs.append(os.path.join(folder, "dovecot.log"))
        self.spawn(["/usr/sbin/dovecot", "-F", "-c", conf], "%s.out" % instance)


# vsftpd -----------------------------------------------------------------------------------

VSFTPD_CONF = """\
listen=YES
listen_ipv6=NO
listen_address={ip}
listen_port={port}
background=NO
anonymous_enable=YES
anon_root={dir}/empty
ftp_username=nobody
local_enable=NO
write_enable=NO
pasv_enable=NO
secure_chroot_dir={dir}/empty
vsftpd_log_file={dir}/{instance}.log
xferlog_enable=YES
xferlog_std_format=NO
log_ftp_protocol=YES
seccomp_sandbox=NO
isolate=NO
isolate_network=NO
"""

VSFTPD_TLS = """\
ssl_enable=YES
rsa_cert_file={cert}
rsa_private_key_file={key}
"""

# A banner of several lines: the client must read to the "220 " line before AUTH TLS.
VSFTPD_BANNER = "certgrab test server\nthree lines of banner\nthen AUTH TLS\n"


class Vsftpd(Daemon):
    """Three `vsftpd CONF` listeners: AUTH TLS, implicit TLS, and no TLS."""

    name = "vsftpd"
    programs = ("/usr/sbin/vsftpd",)
    users = ("nobody",)
    packages = "vsftpd"

    def launch(self):
        cert, key = self.copy_chain()
        os.makedirs(self.path("empty"))  # must exist, not writable by the ftp user
        write_file(self.path("banner"), VSFTPD_BANNER)
        tls = VSFTPD_TLS.format(cert=cert, key=key)
        instances = [("ftp", tls + "banner_file=%s\n" % self.path("banner")),
                     ("ftps", tls + "implicit_ssl=YES\n"),
                     ("ftp-plain", "ssl_enable=NO\n")]
        for (instance, extra), port in zip(instances, free_ports(len(instances))):
            self.ports[instance] = port
            conf = self.path("%s.conf" % instance)
            write_file(conf, VSFTPD_CONF.format(ip=HOST, port=port, dir=self.workdir,
                                            instance=instance) + extra, mode=0o600)
            self.logs.append(self.path("%s.log" % instance))
            self.spawn(["/usr/sbin/vsftpd", conf], "%s.out" % instance)


# INN nnrpd --------------------------------------------------------------------------------

INN_CONF = """\
pathhost: news.example.test
domain: example.test
mta: "/bin/false %s"
hismethod: hisv6
ovmethod: tradindexed
readerswhenstopped: true
pathnews: /usr/lib/news
pathbin: /usr/lib/news/bin
pathetc: {dir}/etc
pathrun: {dir}/run
pathlog: {dir}/log
pathdb: {dir}/db
pathtmp: {dir}/tmp
pathspool: {dir}/spool
patharticles: {dir}/spool/articles
pathoverview: {dir}/spool/overview
pathincoming: {dir}/spool/incoming
pathoutgoing: {dir}/spool/outgoing
patharchive: {dir}/spool/archive
"""

INN_TLS = "tlscertfile: {cert}\ntlskeyfile: {key}\n"

INN_READERS = """\
auth "local" {
    hosts: "127.0.0.1"
    default: "<local>"
}
access "local" {
    users: "<local>"
    newsgroups: "*"
    access: R
}
"""

INN_STORAGE = "method timehash {\n    newsgroups: *\n    class: 0\n}\n"
INN_ACTIVE = "junk 0000000000 0000000001 y\n"
INN_BIN = "/usr/lib/news/bin"


class Nnrpd(Daemon):
    """Three `nnrpd -D -f` listeners sharing one INN tree (no innd): STARTTLS, -S, no TLS.

    nnrpd logs only to syslog, so a failure shows `innconfval -C` (the config check) and
    nnrpd's own output. It needs an overview database and a storage.conf to greet at all,
    and it refuses a key that is not owned by news with mode 0600.
    """

    name = "nnrpd"
    programs = (INN_BIN + "/nnrpd", INN_BIN + "/makehistory", INN_BIN + "/innconfval")
    users = ("news",)
    packages = "inn2"

    def launch(self):
        cert, key = self.copy_chain(owner="news")
        for sub in ("etc", "run", "log", "db", "tmp", "spool/articles", "spool/overview",
                    "spool/incoming", "spool/outgoing", "spool/archive"):
            os.makedirs(self.path(sub))
        base = INN_CONF.format(dir=self.workdir)
        tls_conf, plain_conf = self.path("etc", "inn.conf"), self.path("etc", "inn-plain.conf")
        write_file(tls_conf, base + INN_TLS.format(cert=cert, key=key))
        write_file(plain_conf, base)
        write_file(self.path("etc", "readers.conf"), INN_READERS)
        write_file(self.path("etc", "storage.conf"), INN_STORAGE)
        write_file(self.path("db", "active"), INN_ACTIVE)
        write_file(self.path("db", "newsgroups"), "")
        subprocess.run(["chown", "-R", "news:news", self.workdir], check=True)
        self._prepare(tls_conf)
        instances = [("nntp", tls_conf, []), ("nntps", tls_conf, ["-S"]),
                     ("nntp-plain", plain_conf, [])]
        for (instance, conf, flags), port in zip(instances, free_ports(len(instances))):
            self.ports[instance] = port
            self.spawn([INN_BIN + "/nnrpd", "-D", "-f", "-n", "-b", HOST, "-p", str(port)]
                       + flags, "%s.out" % instance, env={"INNCONF": conf})

    def _prepare(self, conf):
        """Check the config, then create the (empty) overview database as news."""
        env = {"INNCONF": conf}
        self.prepare([INN_BIN + "/innconfval", "-C"], "innconfval.out", user="news", env=env)
        self.prepare([INN_BIN + "/makehistory", "-O", "-x", "-F"], "makehistory.out",
                     user="news", env=env)
