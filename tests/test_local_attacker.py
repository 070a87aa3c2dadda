"""Neighbours on the same machine (issue 19): certgrab runs as root, and a real unprivileged
user (nobody:nogroup, through setpriv, with no supplementary groups) tries to make it write,
leak or wait.

    plants in a directory nobody may write    refused before connecting (exit 6), the fix
                                              named; the link's target, the dangling link's
                                              target, nobody's privkey.pem untouched
    a sticky directory (/tmp)                 only entries root owns are passed through;
                                              outputs directly in it are refused
    a plant during the handshake              nothing, where the directories are safe; in a
                                              sticky parent, the directory made meanwhile is
                                              found when certgrab makes its own
    locks                                     nobody can lock neither the lock file nor
                                              anything that delays the install; a lock held
                                              too long names its holder
    FIFOs                                     refused at once, never waited on
    --config, the hook                        a file another user could change is refused;
                                              relative paths are the file's directory's; the
                                              hook runs in /, RENEWED_DOMAINS only valid names
    core dumps                                off once a key was read (RLIMIT_CORE 0)

The work directory is a fresh 0755 directory in /tmp (pytest's tmp_path is root's 0700, so
nobody could not reach it); the files nobody must not reach (the "victim") are in tmp_path.
"""

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import (LOCK, OUT_FILES, REFUSED, WRITE, assert_refused, completed, entries,
                     error_lines, expected, files_ders, grab, grab_args, popen, run_subprocess,
                     which)
from make_certs import NAME, make_dated_chain, read_ders
from servers import DelayedTLSServer, TLSServer

SETPRIV = which("setpriv")
PRECIOUS = "root's own file: nobody may make certgrab write here\n"
HANDSHAKE_DELAY = 2.0  # seconds the server holds each connection before its handshake


@pytest.fixture
def shared():
    """A directory nobody can reach and read, root's, 0755, removed at the end."""
    if os.geteuid() != 0 or SETPRIV is None:
        pytest.skip("needs root and setpriv (util-linux) to act as nobody")
    root = tempfile.mkdtemp(prefix="certgrab-local-")
    os.chmod(root, 0o755)
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def victim(tmp_path):
    """A file of root's that no one else can reach."""
    path = tmp_path / "victim.txt"
    path.write_text(PRECIOUS)
    return path


@pytest.fixture
def victim_cert(tmp_path, certs):
    """A certificate file of root's that no one else can reach, with an older leaf than
    ec1new's: a run that followed a link to it would replace it."""
    path = tmp_path / "other-site.pem"
    path.write_bytes((certs / "ec1" / "cert.pem").read_bytes())
    return path


def as_nobody(*argv, **kw):
    """argv run as nobody:nogroup without supplementary groups, in /: CompletedProcess."""
    return subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups"] +
                          [str(a) for a in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, cwd="/",
                          timeout=30, **kw)


def plant(*argv):
    """What nobody does and may do."""
    done = as_nobody(*argv)
    assert done.returncode == 0, done.stdout


def cannot(*argv):
    """What nobody tries and must fail to do."""
    done = as_nobody(*argv)
    assert done.returncode != 0, "nobody could: %s" % " ".join(map(str, argv))


def nobodys(path):
    """A directory of nobody's, as one they made themselves."""
    path.mkdir()
    os.chown(str(path), 65534, 65534)
    return path


def install_argv(certs, server, out, *extra):
    return grab_args(server, certs / "ec1", "--out-dir", out,
                     "--key-path", certs / "ec1" / "key.pem", "--privkey", *extra)


def refused_line(proc):
    """The one error line of a refused child process (exit 6), nothing on stdout."""
    return assert_refused(completed(proc), REFUSED)


# Plants in an output directory another user may write -------------------------------------

PLANTS = {
    # name: (what nobody plants in OUT, what must hold afterwards)
    "link to root's file": (lambda out, victim: ["ln", "-s", victim, out / "cert.pem"],
                            lambda out, victim: os.path.islink(str(out / "cert.pem"))),
    "dangling link": (lambda out, victim: ["ln", "-s", victim.parent / "made.pem",
                                           out / "fullchain.pem"],
                      lambda out, victim: not (victim.parent / "made.pem").exists()),
    "privkey.pem of theirs": (lambda out, victim: ["touch", out / "privkey.pem"],
                              lambda out, victim: (out / "privkey.pem").read_bytes() == b""),
    "FIFO": (lambda out, victim: ["mkfifo", out / "chain.pem"],
             lambda out, victim: stat.S_ISFIFO(os.lstat(str(out / "chain.pem")).st_mode)),
    "directory with a temp name": (
        lambda out, victim: ["mkdir", out / ".fullchain.pem.certgrab-tmp-0123456789ab"],
        lambda out, victim: (out / ".fullchain.pem.certgrab-tmp-0123456789ab").is_dir()),
}


@pytest.mark.parametrize("plant_name", sorted(PLANTS))
@pytest.mark.parametrize("directory", ["nobody's", "world-writable"])
def test_a_directory_another_user_may_write_is_refused_before_connecting(
        served, certs, shared, victim_cert, directory, plant_name):
    out = shared / "out"
    if directory == "nobody's":
        nobodys(out)
        why, fix = "the directory %s belongs to nobody" % out, "hint: chown root %s" % out
    else:
        out.mkdir()
        out.chmod(0o777)
        why = "the directory %s is writable by group or others (mode 0777)" % out
        fix = "hint: chmod go-w %s" % out
    planted, holds = PLANTS[plant_name]
    plant(*planted(out, victim_cert))
    server = served("ec1new")
    result = run_subprocess(install_argv(certs, server, out))
    line = refused_line(result)
    assert line.startswith("certgrab: cannot write %s: %s" % (out / "cert.pem", why)), line
    assert fix in result.stderr, result.stderr
    assert server.connections == 0, "refused before connecting"
    assert holds(out, victim_cert), "what nobody planted did not make certgrab write or leak"
    assert victim_cert.read_bytes() == (certs / "ec1" / "cert.pem").read_bytes()


# A sticky directory, as /tmp ---------------------------------------------------------------

def test_in_a_sticky_directory_only_what_root_owns_is_passed(run, served, certs, shared,
                                                             victim_cert):
    sticky = shared / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    server = served("ec1new")

    directly = grab(run, server, certs / "ec1", "--fullchain-path", sticky / "fullchain.pem")
    assert directly.rc == REFUSED, directly.err
    assert error_lines(directly.err) == [
        "certgrab: cannot write %s: other users may create files in %s; one could take the "
        "name of the file, or of its lock, first" % (sticky / "fullchain.pem", sticky)]
    assert "hint: write into a directory that only root can write" in directly.err
    assert not (sticky / "fullchain.pem").exists()

    plant("mkdir", sticky / "theirs")
    plant("ln", "-s", victim_cert, sticky / "theirs" / "cert.pem")
    theirs = run(*install_argv(certs, server, sticky / "theirs"))
    assert theirs.rc == REFUSED, theirs.err
    assert error_lines(theirs.err) == [
        "certgrab: cannot write %s: %s, in the sticky directory %s, belongs to nobody" % (
            sticky / "theirs" / "cert.pem", sticky / "theirs", sticky)]
    assert server.connections == 0
    assert victim_cert.read_bytes() == (certs / "ec1" / "cert.pem").read_bytes()

    ours = sticky / "ours"
    assert run(*install_argv(certs, server, ours)).rc == 0
    assert files_ders(ours) == expected(certs, "ec1new")
    cannot("mv", ours, sticky / "moved")           # sticky: root's entry stays where it is
    cannot("ln", "-s", victim_cert, ours / "x.pem")
    assert stat.S_IMODE(ours.stat().st_mode) == 0o755


# A plant while certgrab waits for the server --------------------------------------------------

@pytest.fixture
def slow_server(certs, started):
    """ec1new from a server that holds each connection HANDSHAKE_DELAY seconds first."""
    return started(DelayedTLSServer(certs / "ec1new" / "fullchain.pem",
                                    certs / "ec1new" / "key.pem", HANDSHAKE_DELAY))


def during_the_handshake(server, argv, plants):
    """Start certgrab (a child), and once the server holds its connection, let nobody
    try plants (functions, each asserting what nobody could or could not do); the result."""
    child = popen(argv)
    deadline = time.monotonic() + HANDSHAKE_DELAY * 5
    while server.waiting == 0 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.waiting == 1, child.communicate(timeout=30)
    for each in plants:
        each()
    stdout, stderr = child.communicate(timeout=30)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def test_a_plant_during_the_handshake_finds_nothing_to_change(certs, shared, victim,
                                                              slow_server):
    """The directories were checked before connecting: no other user can change them, so
    between that check and the write there is nothing nobody can do."""
    out = shared / "live"
    out.mkdir()
    result = during_the_handshake(slow_server, install_argv(certs, slow_server, out), [
        lambda: cannot("ln", "-s", victim, out / "cert.pem"),
        lambda: cannot("mkfifo", out / "fullchain.pem"),
        lambda: cannot("touch", out / "privkey.pem"),
        lambda: cannot("touch", out / LOCK),
        lambda: cannot("mv", out, shared / "moved"),
        lambda: cannot("ln", "-s", victim.parent, shared / "live2")])
    assert result.returncode == 0, result.stderr
    assert files_ders(out) == expected(certs, "ec1new")
    assert entries(out) == sorted(OUT_FILES + ["privkey.pem"])
    assert victim.read_text() == PRECIOUS


def test_a_directory_made_during_the_handshake_in_a_sticky_parent_is_refused(
        certs, shared, victim_cert, slow_server):
    """tmp/new/live does not exist when certgrab checks; while it waits for the server,
    nobody makes it, with a link to root's file inside. certgrab checks again once it made
    (here: found) the directories, before it writes or locks anything in them."""
    sticky = shared / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    out = sticky / "new" / "live"
    result = during_the_handshake(slow_server, install_argv(certs, slow_server, out), [
        lambda: plant("mkdir", "-p", out),
        lambda: plant("ln", "-s", victim_cert, out / "cert.pem")])
    line = refused_line(result)
    assert line == "certgrab: cannot write %s: %s, in the sticky directory %s, belongs to " \
        "nobody" % (out / "cert.pem", sticky / "new", sticky), line
    assert victim_cert.read_bytes() == (certs / "ec1" / "cert.pem").read_bytes()
    assert sorted(os.listdir(str(out))) == ["cert.pem"], "no lock, no temp file in it"


# Locks --------------------------------------------------------------------------------------

def test_a_neighbour_cannot_delay_an_install_by_locking(run, served, certs, shared):
    """nobody holds a flock on the output directory (anyone who can read it can) and tries
    the lock file: the renewal goes in at once. (Before issue 19, certgrab locked the
    directory itself and waited --hook-timeout + --timeout + 30 s, then failed.)"""
    out = shared / "live"
    assert run(*install_argv(certs, served("ec1"), out)).rc == 0
    cannot("flock", "--nonblock", out / LOCK, "true")
    holder = subprocess.Popen([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "flock", str(out), "-c", "echo held; exec sleep 60"],
                              stdout=subprocess.PIPE, universal_newlines=True, cwd="/")
    try:
        assert holder.stdout.readline() == "held\n"
        result = run(*install_argv(certs, served("ec1new"), out, "--timeout", "2",
                                   "--hook-timeout", "1", "--deploy-hook", "true"))
        assert result.rc == 0, result.err
        assert files_ders(out) == expected(certs, "ec1new")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_held_too_long_names_its_holder(run, served, certs, tmp_path, certgrab,
                                               monkeypatch):
    """Another run (here flock(1), as root) holds the lock file past the wait: exit 5, and
    the message says which process holds it (from /proc/locks)."""
    monkeypatch.setattr(certgrab, "LOCK_SLACK", 0.5)     # seconds: the test need not wait 30
    out = tmp_path / "live"
    server = served("ec1")
    assert run(*install_argv(certs, server, out)).rc == 0
    holder = subprocess.Popen(["flock", str(out / LOCK), "-c", "echo held; exec sleep 60"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = run(*install_argv(certs, served("ec1new"), out, "--timeout", "1",
                                   "--hook-timeout", "0.5"))
    finally:
        holder.kill()
        holder.wait()
    assert result.rc == WRITE, result.err
    assert error_lines(result.err) == [
        "certgrab: another certgrab run holds %s for too long; held by process %d "
        "(flock %s -c echo held; exec sleep 60)" % (out / LOCK, holder.pid, out / LOCK)]
    assert files_ders(out) == expected(certs, "ec1")


# FIFOs, umask ---------------------------------------------------------------------------------

def test_a_fifo_is_refused_at_once_never_waited_on(served, certs, tmp_path):
    """A FIFO at an output path in root's own directory: an open would wait for a writer
    while the run holds the lock. Refused at once instead, before connecting."""
    out = tmp_path / "live"
    out.mkdir()
    os.mkfifo(str(out / "fullchain.pem"))
    server = served("ec1")
    result = run_subprocess(install_argv(certs, server, out), timeout=20)
    line = refused_line(result)
    assert line == "certgrab: cannot write %s: it is a FIFO, not a regular file" % (
        out / "fullchain.pem"), line
    assert "hint: remove it: certgrab replaces regular files only" in result.stderr
    assert server.connections == 0


def test_a_fifo_at_the_metrics_file_is_replaced_never_waited_on(served, certs, tmp_path):
    """A failing run reads the last sync time from the previous metrics file: never from
    a FIFO (it would wait for a writer forever). The rename replaces it."""
    prom = tmp_path / "certgrab.prom"
    os.mkfifo(str(prom))
    result = run_subprocess(grab_args(served("ec1"), certs / "ec1", "--out-dir", tmp_path / "live",
                                      "--key-path", certs / "rsa1" / "key.pem",
                                      "--prometheus", prom), timeout=20)
    assert result.returncode == REFUSED, result.stderr      # not our key: refused
    assert stat.S_ISREG(os.lstat(str(prom)).st_mode)
    assert 'certgrab_install_outcome{run="certgrab",outcome="refused"} 1' in prom.read_text()


def test_directories_made_under_umask_000_are_0755(served, certs, tmp_path):
    out = tmp_path / "a" / "b" / "live"
    result = run_subprocess(install_argv(certs, served("ec1"), out),
                            preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    modes = [stat.S_IMODE(d.stat().st_mode) for d in (out.parent.parent, out.parent, out)]
    assert modes == [0o755] * 3
    assert stat.S_IMODE((out / "privkey.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / LOCK).stat().st_mode) == 0o600


# --prometheus in a directory of another user's (Debian's /var/lib/prometheus) ----------------

def test_metrics_in_a_directory_of_another_user_are_written_safely(run, served, certs, shared,
                                                                    victim):
    """Debian's prometheus-node-exporter makes /var/lib/prometheus the prometheus user's,
    the textfile directory below it root's. certgrab writes there; a link the owner puts
    at FILE is replaced, never followed; a link they put on the way is refused."""
    parent = nobodys(shared / "prometheus")
    textfile = parent / "node-exporter"
    textfile.mkdir()
    prom = textfile / "certgrab.prom"
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--check", "--prometheus", prom)
    assert result.rc == 0, result.err
    assert "certgrab_source_fetch_success" in prom.read_text()

    textfile.chmod(0o777)                                  # the owner's choice: theirs too
    plant("ln", "-sf", victim, prom)
    assert grab(run, server, certs / "ec1", "--check", "--prometheus", prom).rc == 0
    assert victim.read_text() == PRECIOUS and stat.S_ISREG(os.lstat(str(prom)).st_mode)

    plant("mv", textfile, parent / "elsewhere")
    plant("ln", "-s", victim.parent, textfile)
    result = grab(run, server, certs / "ec1", "--check", "--prometheus", prom)
    assert result.rc == 3, result.err                       # --check's UNKNOWN: a usage error
    assert error_lines(result.err)[0] == "certgrab: cannot write --prometheus %s: the " \
        "symbolic link %s belongs to nobody" % (prom, textfile)
    assert sorted(os.listdir(str(victim.parent))) == ["victim.txt"]


# --config and the deploy hook ----------------------------------------------------------------

def config_text(certs, server, out, marker):
    return ("[web]\nsource = %s\nservername = %s\ncafile = %s\nout-dir = %s\n"
            "deploy-hook = touch %s\n" % (server.address, NAME, certs / "ec1" / "root.pem",
                                          out, marker))


@pytest.mark.parametrize("weakness", ["owned by nobody", "group-writable",
                                      "in nobody's directory", "in a world-writable directory"])
def test_a_config_file_another_user_could_change_is_refused(run, served, certs, shared,
                                                            tmp_path, weakness):
    """Its hooks run as root: refused before any connection (sudo and sshd do the same)."""
    directory = shared / "etc"
    if weakness == "in nobody's directory":
        nobodys(directory)
    else:
        directory.mkdir(mode=0o777 if weakness == "in a world-writable directory" else 0o755)
        directory.chmod(0o777 if weakness == "in a world-writable directory" else 0o755)
    config, marker, server = directory / "certgrab.conf", tmp_path / "hook-ran", served("ec1")
    config.write_text(config_text(certs, server, tmp_path / "live", marker))
    if weakness == "owned by nobody":
        os.chown(str(config), 65534, 65534)
    config.chmod(0o664 if weakness == "group-writable" else 0o644)
    result = run("--config", config)
    assert result.rc == REFUSED, result.err
    line = error_lines(result.err)
    assert len(line) == 1 and line[0].startswith("certgrab: refusing --config %s: " % config)
    assert {"owned by nobody": "it belongs to nobody, and its hooks would run as root",
            "group-writable": "it is writable by group or others (mode 0664)",
            "in nobody's directory": "the directory %s belongs to nobody" % directory,
            "in a world-writable directory": "the directory %s is writable by group or others"
            % directory}[weakness] in line[0], line[0]
    assert "certgrab: hint: ch" in result.err, result.err
    assert server.connections == 0 and not marker.exists()


def test_relative_paths_in_a_config_file_are_taken_from_its_directory(run, served, certs,
                                                                      tmp_path, monkeypatch):
    """Under systemd the working directory is /, under cron $HOME: a relative path means the
    config file's directory, for every path key and for a SOURCE that is a file."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    for name in ("root.pem", "key.pem", "fullchain.pem"):
        shutil.copy(str(certs / "ec1" / name), str(etc / name))
    server = served("ec1")
    config = etc / "certgrab.conf"
    config.write_text(
        "[DEFAULT]\nservername = %s\ncafile = root.pem\n"
        "[web]\nsource = %s\nkey-path = key.pem\nout-dir = live\nprometheus = web.prom\n"
        "[file]\nsource = fullchain.pem\ncheck = yes\nexpect-file = ./fullchain.pem\n"
        % (NAME, server.address))
    monkeypatch.chdir(str(elsewhere))
    result = run("--config", config)
    assert result.rc == 0, result.err
    assert files_ders(etc / "live") == expected(certs, "ec1")
    assert "certgrab_install_outcome" in (etc / "web.prom").read_text()
    assert result.out.startswith("CERTGRAB OK"), result.out
    assert os.listdir(str(elsewhere)) == []


def test_the_hook_runs_in_the_root_directory(run, served, certs, tmp_path, monkeypatch):
    """A hook never depends on (or runs a file from) certgrab's working directory."""
    monkeypatch.chdir(str(tmp_path))
    (tmp_path / "reload.sh").write_text("echo planted >> %s\n" % (tmp_path / "ran"))
    cwd = tmp_path / "cwd"
    result = run(*install_argv(certs, served("ec1"), tmp_path / "live", "--deploy-hook",
                               "pwd > %s; sh reload.sh" % cwd))
    assert result.rc == 7, result.err                       # sh: reload.sh: not found in /
    assert cwd.read_text() == "/\n"
    assert not (tmp_path / "ran").exists()


def test_renewed_domains_carries_only_valid_names(run, started, certs, tmp_path):
    """A leaf may hold any text in a DNS SAN: the hook gets only DNS names (a wildcard
    *.name included), nothing that reads as an option, a glob or shell syntax."""
    odd = make_dated_chain(tmp_path, certs / "root-ec", "odd", 30, san=",".join(
        "DNS:" + name for name in ["www.example.test", "-rf", "a..b", "*", "$(reboot)",
                                   "*.example.test", "x-.example.test", "ok_1.example.test",
                                   "trailing.example.test."]))
    server = started(TLSServer(os.path.join(odd, "fullchain.pem"), os.path.join(odd, "key.pem")))
    env = tmp_path / "env"
    result = grab(run, server, odd, "--out-dir", tmp_path / "live",
                  "--key-path", os.path.join(odd, "key.pem"), "--deploy-hook", "env -0 > %s" % env)
    assert result.rc == 0, result.err
    pairs = dict(item.split("=", 1) for item in env.read_bytes().decode().split("\0") if item)
    assert pairs["RENEWED_DOMAINS"] == "www.example.test *.example.test ok_1.example.test"


# Core dumps -----------------------------------------------------------------------------------

def test_no_core_dump_once_the_key_was_read(served, certs, tmp_path):
    """Started with core dumps allowed (as far as the hard limit goes), certgrab turns them
    off before it reads the key: the hook, which inherits the limit, sees 0."""
    import resource

    def allow_cores():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)

    limit = tmp_path / "limit"
    result = run_subprocess(install_argv(certs, served("ec1"), tmp_path / "live",
                                         "--deploy-hook", "ulimit -c > %s" % limit),
                            preexec_fn=allow_cores)
    assert result.returncode == 0, result.stderr
    assert limit.read_text() == "0\n"
    assert read_ders(tmp_path / "live" / "cert.pem") == read_ders(certs / "ec1" / "cert.pem")
