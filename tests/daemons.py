"""Running real daemons from Debian packages for the STARTTLS tests: the shared machinery.

daemons_mail.py (postfix, dovecot, vsftpd, INN) and daemons_other.py (prosody, inspircd,
postgresql, mariadb, slapd) subclass Daemon, one class per daemon software. A subclass names
the programs, system users and Debian packages it needs and writes its configuration in
launch(); everything else is here:

    check_installed  DaemonMissing (a reason to skip) when we are not root, or a program or a
                     system user of the package is missing
    copy_chain       the make_certs.py chain (fullchain.pem, key.pem 0600) into the work dir
    prepare          a setup command run to its end (initdb, makehistory ...), or DaemonFailed
    spawn            a daemon process in its own process group, output to a log in the work dir
    start            launch(), then wait until every port in `ports` listens (READY seconds);
                     DaemonFailed, with the tail of every log, if not; one more try on fresh
                     ports, since another process may take a port before the daemon binds it
    stop             ask_to_stop() (the daemon's own way, if any), then SIGTERM and, if need
                     be, SIGKILL to each process group, waiting until it is gone, so that no
                     process outlives the test session

Every file a daemon writes lives under its work directory, <root>/<name>. etc_state(ETC_PATHS)
snapshots the files the packages own under /etc, to prove the tests left them alone;
work_root(prefix, paths, what) is such a root, checked so at its end. start_or_skip(daemon)
starts a daemon, or skips the test with DaemonMissing's reason.
"""

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

READY = 20.0  # seconds; the longest a daemon may take to listen on all its ports
SETUP = 60.0  # seconds; the longest a setup command (initdb, mariadb-install-db) may take
STOP = 10.0  # seconds; the longest stop() waits for a process group to exit
PROBE = 0.2  # seconds; one connection attempt while waiting for a port
POLL = 0.05  # seconds; how often stop() looks whether a process group is gone
LOG_TAIL = 60  # lines of each log shown when a daemon fails
HOST = "127.0.0.1"

# /etc paths the daemon packages own: the tests must leave them exactly as they found them.
ETC_PATHS = ["/etc/postfix", "/etc/dovecot", "/etc/news", "/etc/vsftpd.conf",
             "/etc/prosody", "/etc/inspircd", "/etc/postgresql", "/etc/postgresql-common",
             "/etc/mysql", "/etc/ldap"]


class DaemonMissing(Exception):
    """The daemon cannot run here (not installed, not root): a reason to skip."""


class DaemonFailed(Exception):
    """The daemon was there but did not come up; the message carries its logs."""


def start_or_skip(daemon):
    """daemon.start() (a Daemon, or anything raising DaemonMissing), or the test is
    skipped with the reason it cannot run here. Returns daemon."""
    try:
        daemon.start()
    except DaemonMissing as e:
        pytest.skip(str(e))
    return daemon


@contextlib.contextmanager
def work_root(prefix, etc_paths, what):
    """A work directory their unprivileged users can reach (pytest's tmp is 0700), removed
    at the end; then the files under etc_paths must be exactly as they were before (what:
    who would have changed them, for the message)."""
    before = etc_state(etc_paths)
    root = tempfile.mkdtemp(prefix=prefix)
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    after = etc_state(etc_paths)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, "%s changed files under /etc: %s" % (what, changed)


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


def write_file(path, text, mode=0o644):
    """A configuration (or any other text) file with the given mode."""
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _tail(path, lines=LOG_TAIL):
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError as e:
        return "(%s)" % e
    return "\n".join(text) or "(empty)"


def _as_user(user):
    """A preexec_fn that drops root to user (PostgreSQL refuses to run as root; INN's tools
    must write their files as news)."""
    entry = pwd.getpwnam(user)

    def drop():
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return drop


class Daemon(object):
    """Processes of one daemon software; subclasses write configs and start them."""

    name = "daemon"
    programs = ()  # absolute paths that must exist (None: not found)
    users = ()  # system users the package creates
    packages = ""  # the Debian packages that install the programs, for the skip reason

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
                                    % (self.name, program or "the server", self.packages))
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

    def spawn(self, argv, output, user=None, env=None):
        """Start argv in its own process group, as user (default root), with env added to
        ours, in the work directory; stdout and stderr to workdir/output."""
        log = self.path(output)
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, **(env or {})), cwd=self.workdir,
                                    preexec_fn=_as_user(user) if user else None)
        self.procs.append(proc)
        return proc

    def prepare(self, argv, output, user=None, env=None):
        """Run a setup command to its end (SETUP seconds at most), or DaemonFailed. Should it
        hang, it stays in procs, and stop() ends its process group."""
        proc = self.spawn(argv, output, user=user, env=env)
        proc.wait(timeout=SETUP)
        self.procs.remove(proc)
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
