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

start() raises DaemonMissing (a reason to skip) when a program is not installed or we are not
root, and DaemonFailed with the daemon's own logs when it does not listen within READY
seconds. stop() asks the daemon to stop, then signals its process group, so that no process
outlives the test session. etc_state(paths) snapshots /etc files to prove they were left alone.

Debian packages: postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved
vsftpd inn2 (see .ci/run for the inn2 postinst workaround on hosts without a domain name).
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

READY = 20.0  # seconds; the longest a daemon may take to listen on all its ports
STOP = 10.0  # seconds; the longest stop() waits for a process group to exit
PROBE = 0.2  # seconds; one connection attempt while waiting for a port
POLL = 0.05  # seconds; how often stop() looks whether a process group is gone
LOG_TAIL = 60  # lines of each log shown when a daemon fails
HOST = "127.0.0.1"
NAME = "www.example.test"


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
        if os.path.isfile(top):
            walk = [(os.path.dirname(top), [], [os.path.basename(top)])]
        else:
            walk = os.walk(top)
        for folder, _, files in walk:
            for name in files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                state[path] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return state


def _tail(path, lines=LOG_TAIL):
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError as e:
        return "(%s)" % e
    return "\n".join(text) or "(empty)"


def _write(path, text, mode=0o644, owner=None):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    if owner:
        shutil.chown(path, owner, owner)


def _as_user(user):
    """A preexec_fn that drops root to user (for tools that must run as a daemon's user)."""
    entry = pwd.getpwnam(user)

    def drop():
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return drop


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
            if not os.access(program, os.X_OK):
                raise DaemonMissing("%s: %s is not installed (Debian packages: %s)"
                                    % (self.name, program, PACKAGES))
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
            with open(os.path.join(self.chain, name)) as f:
                _write(os.path.join(folder, name), f.read(), mode, owner)
            files.append(os.path.join(folder, name))
        return files

    def spawn(self, argv, output, env=None):
        """Start argv in its own process group, stdout and stderr to workdir/output."""
        log = self.path(output)
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, **(env or {})), cwd=self.workdir)
        self.procs.append(proc)
        return proc

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

    def ask_to_stop(self):
        """The daemon's own way to stop (before its process groups are signalled)."""

    def stop(self):
        try:
            self.ask_to_stop()
        finally:
            for proc in self.procs:
                _end_group(proc)
            self.procs = []


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

    def launch(self):
        cert, key = self.copy_chain()
        smtp, smtps, plain, slow = free_ports(4)
        self.ports = {"smtp": smtp, "smtps": smtps, "smtp-plain": plain, "smtp-slow": slow}
        for sub in ("conf", "queue", "data"):
            os.makedirs(self.path(sub))
        shutil.chown(self.path("data"), "postfix", "postfix")  # master.lock, caches
        _write(self.path("conf", "main.cf"),
               POSTFIX_MAIN.format(dir=self.workdir, key=key, cert=cert))
        _write(self.path("conf", "master.cf"),
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
        _write(conf, DOVECOT_CONF.format(dir=folder, instance=instance, ip=HOST, tls=tls,
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

    def launch(self):
        cert, key = self.copy_chain()
        os.makedirs(self.path("empty"))  # must exist, not writable by the ftp user
        _write(self.path("banner"), VSFTPD_BANNER)
        tls = VSFTPD_TLS.format(cert=cert, key=key)
        instances = [("ftp", tls + "banner_file=%s\n" % self.path("banner")),
                     ("ftps", tls + "implicit_ssl=YES\n"),
                     ("ftp-plain", "ssl_enable=NO\n")]
        for (instance, extra), port in zip(instances, free_ports(len(instances))):
            self.ports[instance] = port
            conf = self.path("%s.conf" % instance)
            _write(conf, VSFTPD_CONF.format(ip=HOST, port=port, dir=self.workdir,
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

    def launch(self):
        cert, key = self.copy_chain(owner="news")
        for sub in ("etc", "run", "log", "db", "tmp", "spool/articles", "spool/overview",
                    "spool/incoming", "spool/outgoing", "spool/archive"):
            os.makedirs(self.path(sub))
        base = INN_CONF.format(dir=self.workdir)
        tls_conf, plain_conf = self.path("etc", "inn.conf"), self.path("etc", "inn-plain.conf")
        _write(tls_conf, base + INN_TLS.format(cert=cert, key=key))
        _write(plain_conf, base)
        _write(self.path("etc", "readers.conf"), INN_READERS)
        _write(self.path("etc", "storage.conf"), INN_STORAGE)
        _write(self.path("db", "active"), INN_ACTIVE)
        _write(self.path("db", "newsgroups"), "")
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
        env = dict(os.environ, INNCONF=conf)
        for argv in ([INN_BIN + "/innconfval", "-C"], [INN_BIN + "/makehistory", "-O", "-x", "-F"]):
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, preexec_fn=_as_user("news"),
                                  cwd=self.workdir, timeout=READY)
            if proc.returncode != 0:
                raise self.failed("%s failed:\n%s" % (" ".join(argv),
                                                     proc.stdout.decode(errors="replace")))


PACKAGES = ("postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved "
            "vsftpd inn2")

# /etc paths the packages own: the tests must leave them exactly as they found them.
ETC_PATHS = ["/etc/postfix", "/etc/dovecot", "/etc/news", "/etc/vsftpd.conf"]

