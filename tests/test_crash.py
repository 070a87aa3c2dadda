"""Crashes, full and read-only filesystems, concurrent runs: the old set or the new set, whole.

certgrab runs as a child process here when it must be killed or raced; the run that follows
a kill runs in-process (faster: the suite has a time budget). Mounts need root.
"""

import errno
import os
import random
import subprocess
import threading
import time

import pytest

from helpers import (OUT_FILES, PENDING_MTIME, WRITE, assert_refused, assert_verifies, entries,
                     error_lines, grab_args, hook_runs, popen, snapshot, temp_files)
from make_certs import read_ders

KILLS = 40
SEED = 20240603


def args_for(certs, server, out, *extra):
    return grab_args(server, certs / "ec1", "--out-dir", out,
                     "--key-path", certs / "ec1" / "key.pem", *extra)


def read_set(out):
    """{name: bytes} of the three files."""
    result = {}
    for name in OUT_FILES:
        with open(os.path.join(str(out), name), "rb") as f:
            result[name] = f.read()
    return result


@pytest.fixture
def old_and_new(run, served, certs, tmp_path):
    """The exact bytes certgrab writes for ec1 (old) and ec1new (new), and both servers."""
    old, new = served("ec1"), served("ec1new")
    sets = []
    for server in (old, new):
        out = tmp_path / ("ref-" + str(server.port))
        assert run(*args_for(certs, server, out)).rc == 0
        assert_verifies(certs / "ec1" / "root.pem", out)
        sets.append(read_set(out))
    return old, new, sets[0], sets[1]


def reset(out, files):
    """Put the old set back, each file replaced atomically, with a real mtime."""
    out.mkdir(exist_ok=True)
    for name, data in files.items():
        temp = out / (".reset." + name)
        temp.write_bytes(data)
        os.replace(str(temp), str(out / name))


class Watcher(threading.Thread):
    """Reads the files over and over while runs are killed around them: every read must be
    the whole old or the whole new version of the file (never torn, empty or missing)."""

    def __init__(self, out, old, new):
        threading.Thread.__init__(self, daemon=True)
        self.out, self.allowed = out, dict((n, (old[n], new[n])) for n in OUT_FILES)
        self.stop, self.reads, self.bad = threading.Event(), 0, []

    def run(self):
        while not self.stop.is_set():
            for name in OUT_FILES:
                try:
                    with open(os.path.join(str(self.out), name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    data = b"<missing>"
                self.reads += 1
                if data not in self.allowed[name] and len(self.bad) < 5:
                    self.bad.append((name, data[:200]))
            time.sleep(0.001)


def classify(out, old, new):
    """After a kill: 'old', 'mixed', 'pending' (new, hook not done) or 'done'."""
    now = read_set(out)
    for name in OUT_FILES:
        assert now[name] in (old[name], new[name]), "%s is torn: %r" % (name, now[name][:200])
        assert read_ders(out / name), name
    if now == old:
        return "old"
    if now != new:
        return "mixed"
    mtimes = [int((out / n).stat().st_mtime) for n in OUT_FILES if old[n] != new[n]]
    return "pending" if PENDING_MTIME in mtimes else "done"


def measure_run(certs, server, tmp_path):
    """(seconds a whole run takes, seconds it runs after the server's handshake): medians of
    three runs on this machine, which may be slow or busy."""
    durations, tails = [], []
    for i in range(3):
        start, handshakes = time.monotonic(), server.handshakes
        proc = popen(args_for(certs, server, tmp_path / ("measure%d" % i),
                              "--deploy-hook", "true"))
        shaken = wait_for_handshake(proc, server, handshakes)
        proc.communicate(timeout=30)
        durations.append(time.monotonic() - start)
        tails.append(time.monotonic() - shaken)
        assert proc.returncode == 0
    return sorted(durations)[1], sorted(tails)[1]


def wait_for_handshake(proc, server, handshakes):
    """The moment the server completed a handshake with proc (or proc ended)."""
    while proc.poll() is None and server.handshakes == handshakes:
        time.sleep(0.0005)
    return time.monotonic()


def test_sigkill_at_random_moments_never_tears_a_file(run, certs, tmp_path, old_and_new,
                                                      monkeypatch):
    old_server, new_server, old, new = old_and_new
    out, log = tmp_path / "live", tmp_path / "hook.log"
    hook = 'echo "$CERTGRAB_TEST_RUN" >> %s' % log
    duration, tail = measure_run(certs, new_server, tmp_path)
    rng = random.Random(SEED)
    # Half the kills at any moment from the start of the run; the other half at any moment
    # after the handshake, when the checks, the writes and the hook happen (timed from the
    # server's side: start-up time varies too much on a busy machine to aim from the start).
    delays = [(False, rng.uniform(0, 1.2 * duration)) for _ in range(KILLS // 2)] + \
             [(True, rng.uniform(0, 1.1 * tail)) for _ in range(KILLS - KILLS // 2)]
    rng.shuffle(delays)
    monkeypatch.setenv("CERTGRAB_TEST_RUN", "next")
    killed_env = dict(os.environ, CERTGRAB_TEST_RUN="killed")

    reset(out, old)
    watcher = Watcher(out, old, new)
    watcher.start()
    states, temps_left, killed_running = {}, 0, 0
    try:
        for i, (after_handshake, delay) in enumerate(delays):
            reset(out, old)
            handshakes = new_server.handshakes
            proc = popen(args_for(certs, new_server, out, "--deploy-hook", hook, "-q"),
                         env=killed_env)
            if after_handshake:
                wait_for_handshake(proc, new_server, handshakes)
            time.sleep(delay)
            if proc.poll() is None:
                killed_running += 1
            proc.kill()
            proc.communicate(timeout=30)
            state = classify(out, old, new)
            states[state] = states.get(state, 0) + 1
            temps_left += bool(temp_files(out))

            before = hook_runs(log).count("next")
            result = run(*args_for(certs, new_server, out, "--deploy-hook", hook, "-q"))
            context = "kill %d after %.0f ms%s (state %s): %s" % (
                i, delay * 1000, " after the handshake" if after_handshake else "", state,
                result.err)
            assert result.rc == 0, context
            assert read_set(out) == new, "the next run completes the set; " + context
            assert temp_files(out) == [], "the next run removes temp files; " + context
            assert entries(out) == OUT_FILES, context
            assert all(int((out / n).stat().st_mtime) != PENDING_MTIME for n in OUT_FILES)
            hooked = hook_runs(log).count("next") - before
            assert hooked == (0 if state == "done" else 1), \
                "the next run runs the hook iff the killed one did not finish it; " + context
    finally:
        watcher.stop.set()
        watcher.join(5)
    assert watcher.bad == [], "a reader saw a torn/empty/missing file: %r" % watcher.bad
    assert watcher.reads > 100
    summary = ("run %.0f ms, %.0f ms after the handshake; states after kills: %r, %d killed "
               "while running, %d left temp files" % (duration * 1000, tail * 1000, states,
                                                      killed_running, temps_left))
    print(summary)
    assert killed_running >= KILLS // 4, "the kills must land during runs: " + summary
    assert len(states) >= 2, "the kills must land at different moments: " + summary


def test_a_run_killed_between_renames_is_completed_with_its_hook(run, certs, tmp_path,
                                                                   old_and_new):
    """The state a kill between two renames leaves (rare at random: the renames follow each
    other within microseconds), made by hand: cert.pem new and marked pending, fullchain.pem
    old, a staged temp file. The next run completes the set and runs the hook once."""
    old_server, new_server, old, new = old_and_new
    out, log = tmp_path / "live", tmp_path / "hook.log"
    reset(out, old)
    (out / "cert.pem").write_bytes(new["cert.pem"])
    os.utime(str(out / "cert.pem"), (PENDING_MTIME, PENDING_MTIME))
    (out / ".fullchain.pem.certgrab-tmp-00112233aabb").write_bytes(new["fullchain.pem"])
    result = run(*args_for(certs, new_server, out, "--deploy-hook", "echo x >> %s" % log))
    assert result.rc == 0, result.err
    assert read_set(out) == new and entries(out) == OUT_FILES
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert hook_runs(log) == ["x"]
    assert all(int((out / n).stat().st_mtime) != PENDING_MTIME for n in OUT_FILES)


# Full and read-only filesystems ------------------------------------------------------------

PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 64 KiB tmpfs; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if os.path.ismount(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(filesystem, free_pages):
    """Fill the filesystem, then give back free_pages pages."""
    filler = os.path.join(str(filesystem), "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    size = os.path.getsize(filler)
    pages = -(-size // PAGE)
    os.truncate(filler, max(0, (pages - free_pages) * PAGE))
    st = os.statvfs(str(filesystem))
    assert st.f_bavail * st.f_frsize == free_pages * PAGE, "setup: free space"


@pytest.mark.parametrize("free_pages", [0, 1], ids=["full", "room-for-one-file"])
def test_full_filesystem_keeps_the_old_set(run, certs, tmpfs, tmp_path, old_and_new,
                                           free_pages):
    """With one page free, the first temp file fits and the second does not: still nothing
    of the new set may land."""
    old_server, new_server, old, new = old_and_new
    out, log = tmpfs / "live", tmp_path / "hook.log"
    hook = "echo x >> %s" % log
    assert run(*args_for(certs, old_server, out, "--deploy-hook", hook)).rc == 0
    fill(tmpfs, free_pages)
    before = snapshot(out)
    result = run(*args_for(certs, new_server, out, "--deploy-hook", hook))
    line = assert_refused(result, WRITE)
    assert "No space left on device" in line, line
    assert snapshot(out) == before, "the old set is intact"
    assert temp_files(out) == [] and hook_runs(log) == ["x"]

    os.unlink(str(tmpfs / "filler"))
    again = run(*args_for(certs, new_server, out, "--deploy-hook", hook))
    assert again.rc == 0, again.err
    assert read_set(out) == new and hook_runs(log) == ["x", "x"]


def test_read_only_filesystem_keeps_the_old_set(run, certs, tmpfs, tmp_path, old_and_new):
    old_server, new_server, old, new = old_and_new
    out, log = tmpfs / "live", tmp_path / "hook.log"
    hook = "echo x >> %s" % log
    assert run(*args_for(certs, old_server, out, "--deploy-hook", hook)).rc == 0
    before = snapshot(out)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        result = run(*args_for(certs, new_server, out, "--deploy-hook", hook))
        line = assert_refused(result, WRITE)
        assert "Read-only file system" in line, line
        assert snapshot(out) == before and hook_runs(log) == ["x"]
        unchanged = run(*args_for(certs, old_server, out, "--deploy-hook", hook))
        assert unchanged.rc == 0, "an up-to-date set on a read-only mount is fine: " + \
            unchanged.err
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)


def test_dry_run_on_a_read_only_filesystem_does_not_promise_success(run, certs, tmpfs,
                                                                    old_and_new):
    """--dry-run exits 0 only when the install would succeed; here it would fail with 5."""
    old_server, new_server, old, new = old_and_new
    out = tmpfs / "live"
    assert run(*args_for(certs, old_server, out)).rc == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        result = run(*args_for(certs, new_server, out, "--dry-run"))
        assert result.rc != 0, "dry run said yes: " + result.err
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)


def test_read_only_bind_mount_keeps_the_old_set(run, certs, tmp_path, old_and_new):
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    old_server, new_server, old, new = old_and_new
    real, view = tmp_path / "real", tmp_path / "view"
    view.mkdir()
    assert run(*args_for(certs, old_server, real)).rc == 0
    subprocess.run(["mount", "--bind", str(real), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        before = snapshot(real)
        result = run(*args_for(certs, new_server, view))
        assert_refused(result, WRITE)
        assert snapshot(real) == before
    finally:
        subprocess.run(["umount", str(view)], check=False)


def test_pending_hook_on_a_read_only_filesystem_is_not_forgotten(run, certs, tmpfs, tmp_path,
                                                                  old_and_new):
    """The hook failed, then the mount became read-only: the hook runs, and certgrab says it
    could not clear the mark rather than crash. The mark stays, so the hook is still pending
    on disk: exit 7, as for a failed hook."""
    old_server, new_server, old, new = old_and_new
    out, log, fail = tmpfs / "live", tmp_path / "hook.log", tmp_path / "fail"
    hook = "echo x >> %s; test ! -e %s" % (log, fail)
    fail.write_text("")
    assert run(*args_for(certs, old_server, out, "--deploy-hook", hook)).rc == 7
    fail.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        result = run(*args_for(certs, old_server, out, "--deploy-hook", hook))
        assert "Traceback" not in result.err
        assert result.rc == 7, result.err
        assert "the deploy hook ran, but cannot clear the hook-pending date" in result.err
        assert "previous files are unchanged" not in result.err
        assert hook_runs(log) == ["x", "x"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)


# Concurrent runs ---------------------------------------------------------------------------

def test_eight_concurrent_runs_run_the_hook_once(run, certs, tmp_path, old_and_new):
    old_server, new_server, old, new = old_and_new
    out, log = tmp_path / "live", tmp_path / "hook.log"
    reset(out, old)
    hook = "sleep 0.2; echo x >> %s" % log
    procs = [popen(args_for(certs, new_server, out, "--deploy-hook", hook)) for _ in range(8)]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    for (stdout, stderr), rc in results:
        assert rc == 0, stderr
        assert "Traceback" not in stderr
    assert hook_runs(log) == ["x"], "one renewal, one hook run"
    installed = [err for (out_, err), _ in results if "installed" in err]
    assert len(installed) == 1, "exactly one run installs: %r" % [e for (o, e), _ in results]
    assert read_set(out) == new and temp_files(out) == []
    assert entries(out) == OUT_FILES, "the files and the lock file only"


def test_a_run_waits_for_the_lock_while_another_runs_its_hook(run, certs, tmp_path,
                                                              old_and_new):
    """The directory stays locked during the hook: a second run does not see the new files
    as pending and run the hook a second time."""
    old_server, new_server, old, new = old_and_new
    out, log, started = tmp_path / "live", tmp_path / "hook.log", tmp_path / "started"
    reset(out, old)
    hook = "touch %s; sleep 1; echo x >> %s" % (started, log)
    first = popen(args_for(certs, new_server, out, "--deploy-hook", hook))
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started.exists(), first.communicate(timeout=5)
    second = run(*args_for(certs, new_server, out, "--deploy-hook", hook))
    assert second.rc == 0, second.err
    assert hook_runs(log) == ["x"], "the second run waited and found nothing to do"
    first.communicate(timeout=30)
    assert first.returncode == 0
    assert hook_runs(log) == ["x"]
    assert "installed" not in " ".join(error_lines(second.err))
