"""Faults in the install path: every failure is one line and an exit code true to the disk.

The fault campaign (issue 12) runs certgrab under strace and makes one filesystem system call
of a renewal fail (ENOSPC, EIO or EACCES) at a time. A first traced run with no fault
enumerates the calls: the Nth openat, write, fsync, rename... that names a path under the
output directories (or writes to stderr). Calls of Python's startup, of the imports and of the
TLS fetch never name those paths, so they are not counted as cases; strace counts every call
of the injected kind, so each case checks in strace's log that the call it failed is the one
the case meant (same call, same path).

What a failing run must leave, by exit code (README, "Exit codes"):
    5  the old set, untouched (a hint, if any, says "the previous files are unchanged");
       or a set partly new, and the hint "the next run completes the set ..."
    6  the old set (the gate could not read what is installed)
    7  the new set, whose hook is still pending (marked 1970-01-01T00:00:01Z)
    0  the new set, hook run, no mark
and always: no traceback, one error line, no temporary file; and a clean run afterwards
completes the set and runs the hook exactly once.

Hostile output files (a damaged cert.pem, a truncated fullchain.pem) and an unwritable stderr
are tested below the campaign.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import (CERTGRAB, IN_CI, OUT_FILES, PENDING_MTIME, assert_fullchain_verifies,
                     assert_verifies, error_lines, grab, grab_args, hook_runs, temp_files)
from make_certs import read_ders

ERRORS = ("ENOSPC", "EIO", "EACCES")
# The system calls a renewal makes on its files; stderr writes are counted with "write".
CALLS = ("openat", "read", "write", "close", "fsync", "rename", "fchmod", "fchown",
         "utimensat", "flock", "unlink", "getdents64", "newfstatat", "ftruncate", "mkdir")
STRACE_TIMEOUT = 30  # seconds for one traced run (normally ~0.3 s)

needs_strace = pytest.mark.skipif(shutil.which("strace") is None or os.geteuid() != 0,
                                  reason="needs strace, as root")


class Layout(object):
    """A renewal with every kind of output: --out-dir live/, --combined-path haproxy/site.pem,
    --key-path, and a deploy hook logging to hook.log (outside the traced directories)."""

    def __init__(self, root, certs):
        self.root, self.certs = str(root), certs
        self.live = os.path.join(self.root, "live")
        self.combined = os.path.join(self.root, "haproxy", "site.pem")
        self.log = os.path.join(os.path.dirname(self.root), "hook.log")
        self.files = [os.path.join(self.live, n) for n in OUT_FILES] + [self.combined]

    def args(self, server, *extra):
        return grab_args(server, self.certs / "ec1", "--out-dir", self.live, "--key-path",
                         self.certs / "ec1" / "key.pem", "--combined-path", self.combined,
                         "--deploy-hook", "echo x >> %s" % self.log, *extra)

    def read(self):
        """{path: (bytes or None, mtime)}."""
        state = {}
        for path in self.files:
            try:
                with open(path, "rb") as f:
                    state[path] = (f.read(), int(os.stat(path).st_mtime))
            except FileNotFoundError:
                state[path] = (None, None)
        return state

    def reset(self, old):
        """Put the old set back (real dates), no temporaries, an empty hook log."""
        for directory in (self.live, os.path.dirname(self.combined)):
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
        for path, data in old.items():
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600 if path == self.combined else 0o644)
        if os.path.exists(self.log):
            os.unlink(self.log)

    def temps(self):
        return temp_files(self.live) + temp_files(os.path.dirname(self.combined))

    def assert_verifies(self):
        """openssl verifies what live/ and the combined file hold."""
        assert_verifies(self.certs / "ec1" / "root.pem", self.live)
        assert_fullchain_verifies(self.certs / "ec1" / "root.pem", self.combined)


@pytest.fixture
def renewal(run, served, certs, tmp_path):
    """(layout, old server, new server, old bytes, new bytes) of a renewal ec1 -> ec1new."""
    layout = Layout(tmp_path / "faults", certs)
    old_server, new_server = served("ec1"), served("ec1new")
    sets = []
    for server in (old_server, new_server):
        assert run(*layout.args(server)).rc == 0
        layout.assert_verifies()
        sets.append(dict((p, d) for p, (d, _) in layout.read().items()))
    assert sets[0] != sets[1] and all(sets[0].values())
    return layout, old_server, new_server, sets[0], sets[1]


# The campaign -------------------------------------------------------------------------------

LINE = re.compile(r"^(\w+)\((.*)\) += (.*)$")


# Arguments a call writes (shown as an address when the call fails) are left out.
INPUT_ARGS = {"read": 1, "getdents64": 1, "newfstatat": 2, "statx": 2, "fstat": 1}


def split_args(text):
    """Top-level arguments of a traced call: commas inside quotes, {} and [] don't split."""
    args, depth, quoted, current, i = [], 0, False, "", 0
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            current += text[i:i + 2]
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "{[":
            depth += 1
        elif not quoted and char in "}]":
            depth -= 1
        if not quoted and depth == 0 and text[i:i + 2] == ", ":
            args.append(current)
            current, i = "", i + 2
            continue
        current += char
        i += 1
    return args + [current]


def normalized(name, args):
    """A traced call's inputs without what differs between runs: temporary names, pipe
    inodes, the current time."""
    kept = split_args(args)[:INPUT_ARGS.get(name)]
    text = "%s(%s)" % (name, ", ".join(kept))
    text = re.sub(r"certgrab-tmp-[0-9a-f]+", "certgrab-tmp-X", text)
    text = re.sub(r"(pipe|socket):\[\d+\]", r"\1", text)
    return re.sub(r"tv_sec=\d{3,}, tv_nsec=\d+", "NOW", text)


def traced(argv, log, calls, inject=None):
    """Run certgrab under strace (no -f: the hook's shell is not traced); CompletedProcess."""
    command = ["strace", "-qq", "-y", "-s", "64", "-o", str(log), "-e",
               "trace=" + ",".join(calls)]
    if inject:
        command += ["-e", "inject=%s:error=%s:when=%d" % inject]
    command += [sys.executable, CERTGRAB] + [str(a) for a in argv]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, universal_newlines=True,
                          timeout=STRACE_TIMEOUT)


def parse_trace(log):
    """[(call name, normalized "name(args)"), ...] in order."""
    calls = []
    with open(str(log)) as f:
        for line in f:
            match = LINE.match(line.strip())
            if match:
                calls.append((match.group(1), normalized(*match.groups()[:2])))
    return calls


def occurrences(log, root):
    """[(call, N, text)]: the Nth call of its kind that touches root or writes to stderr."""
    counts, found = {}, []
    for name, text in parse_trace(log):
        counts[name] = counts.get(name, 0) + 1
        if root in text or text.startswith("write(2<"):
            found.append((name, counts[name], text))
    return found


def injected_call(log):
    """(position among the traced calls, text) of the call strace failed; the position of
    the wanted text before it, if it came earlier in this run."""
    calls = []
    with open(str(log)) as f:
        for line in f:
            match = LINE.match(line.strip())
            if match:
                calls.append(normalized(*match.groups()[:2]))
                if line.rstrip().endswith("(INJECTED)"):
                    return calls
    return calls


def inject_at(argv, log, name, number, text, error, reset):
    """Run with the call `text` (the Nth `name` of the clean run) failing with error.

    The TLS fetch reads and writes its socket a varying number of times, so the Nth read of
    this run may be another call; then the run is repeated (after reset()) with N moved to
    where the wanted call came, if it came earlier, or one further if the fault hit the
    fetch. Returns the CompletedProcess of the run that failed the wanted call."""
    for _ in range(8):
        reset()
        result = traced(argv, log, (name,), inject=(name, error, number))
        calls = injected_call(log)
        if calls and calls[-1] == text and len(calls) == number:
            return result
        earlier = [i + 1 for i, call in enumerate(calls[:-1]) if call == text]
        number = earlier[-1] if earlier else number + 1
    raise AssertionError("strace never failed %s with %s" % (text, error))


def campaign_cases(found):
    """Locally every call gets one error (in turn), plus EIO on each; CI gets all three."""
    cases = []
    for index, (name, number, text) in enumerate(found):
        errors = ERRORS if IN_CI else sorted(set([ERRORS[index % 3], "EIO"]))
        cases += [(name, number, text, error) for error in errors]
    return cases


def disk_verdict(layout, old, new):
    """"old", "partial", "pending" (new, some still marked) or "new"."""
    state = layout.read()
    assert all(state[p][0] == old[p] for p in layout.files if old[p] == new[p])
    moving = [p for p in layout.files if old[p] != new[p]]   # chain.pem is the same in both
    olds = [p for p in moving if state[p][0] == old[p] and state[p][1] != PENDING_MTIME]
    news = [p for p in moving if state[p][0] == new[p]]
    assert len(olds) + len(news) == len(moving), "a file is neither old nor new"
    if not news:
        return "old"
    if olds:
        return "partial"
    if any(state[p][1] == PENDING_MTIME for p in layout.files):
        return "pending"
    return "new"


EXPECTED = {"old": (5, 6), "partial": (5,), "pending": (7,), "new": (0,)}


def check_faulted_run(result, layout, old, new, stderr_write):
    """What the run left on disk, and what it said about it, agree (see the module text)."""
    assert "Traceback" not in result.stderr, result.stderr
    verdict = disk_verdict(layout, old, new)
    assert result.returncode in EXPECTED[verdict], (verdict, result.stderr)
    lines = [line for line in error_lines(result.stderr)       # errors, not the report
             if not line.startswith("certgrab: installed the chain")]
    if result.returncode == 0:
        assert lines == [], result.stderr
    elif not stderr_write:      # a fault on the stderr write itself may eat the line
        assert len(lines) == 1 and lines[0].startswith("certgrab: "), result.stderr
    if verdict != "old":
        assert "previous files are unchanged" not in result.stderr, result.stderr
    else:
        assert "completes the set" not in result.stderr, result.stderr
    if verdict == "partial" and not stderr_write:
        assert "the next run completes the set" in result.stderr, result.stderr
    assert layout.temps() == [], result.stderr
    hooks = len(hook_runs(layout.log))       # a pending hook may have run (mark not cleared)
    assert hooks in {"old": (0,), "partial": (0,), "pending": (0, 1), "new": (1,)}[verdict], \
        (verdict, hooks)
    return verdict, hooks


@needs_strace
def test_every_filesystem_call_of_a_renewal_can_fail(run, renewal, tmp_path):
    layout, old_server, new_server, old, new = renewal
    argv, log = layout.args(new_server), tmp_path / "trace.log"
    layout.reset(old)
    clean = traced(argv, log, CALLS)
    assert clean.returncode == 0, clean.stderr
    found = occurrences(log, layout.root)
    kinds = set(name for name, _, _ in found)
    assert {"openat", "write", "fsync", "rename", "fchmod", "utimensat", "flock",
            "getdents64"} <= kinds, kinds
    seen = {}
    for name, number, text, error in campaign_cases(found):
        result = inject_at(argv, log, name, number, text, error, lambda: layout.reset(old))
        case = "%s #%d %s (%s)" % (name, number, error, text[:120])
        try:
            verdict, hooks = check_faulted_run(result, layout, old, new,
                                               text.startswith("write(2<"))
        except AssertionError as exc:
            raise AssertionError("%s: %s" % (case, exc))
        rerun = run(*argv)
        assert rerun.rc == 0, (case, rerun.err)
        assert disk_verdict(layout, old, new) == "new", case
        layout.assert_verifies()
        assert len(hook_runs(layout.log)) == (1 if verdict == "new" else hooks + 1), case
        assert layout.temps() == [], case
        seen[verdict, result.returncode] = seen.get((verdict, result.returncode), 0) + 1
    assert set(seen) >= {("new", 0), ("old", 5), ("old", 6), ("partial", 5), ("pending", 7)}, \
        seen        # the campaign reached each kind of outcome


# Faults at one chosen call ------------------------------------------------------------------

def fail_one_call(layout, argv, log, predicate, error, reset):
    """Trace a clean run, then rerun it with the first call matching predicate failing."""
    reset()
    assert traced(argv, log, CALLS).returncode == 0
    name, number, text = next(call for call in occurrences(log, layout.root)
                              if predicate(call[2]))
    return inject_at(argv, log, name, number, text, error, reset)


@needs_strace
def test_a_directory_fsync_that_fails_is_said_under_verbose(renewal, tmp_path):
    layout, old_server, new_server, old, new = renewal
    result = fail_one_call(layout, layout.args(new_server, "-v"), tmp_path / "trace.log",
                           lambda text: text == "fsync(5<%s>)" % layout.live, "EIO",
                           lambda: layout.reset(old))
    assert result.returncode == 0, result.stderr
    assert "cannot fsync directory %s (Input/output error)" % layout.live in result.stderr
    assert disk_verdict(layout, old, new) == "new"


@needs_strace
def test_a_leftover_temporary_that_cannot_be_removed_stops_the_run(renewal, tmp_path):
    """A killed run's .site.pem temp holds the private key: it is emptied, and the run stops
    (exit 5, nothing written) rather than succeed beside it."""
    layout, old_server, new_server, old, new = renewal
    stale = os.path.join(os.path.dirname(layout.combined), ".site.pem.certgrab-tmp-0123456789ab")
    temp = ".site.pem.certgrab-tmp-X"       # as normalized() writes it

    def reset():
        layout.reset(old)
        with open(stale, "wb") as f:
            f.write(new[layout.combined])

    result = fail_one_call(layout, layout.args(new_server), tmp_path / "trace.log",
                           lambda text: text.startswith("unlink(") and temp in text, "EIO",
                           reset)
    assert result.returncode == 5, result.stderr
    assert error_lines(result.stderr) == [
        "certgrab: cannot remove the leftover temporary file %s" % stale]
    assert "the previous files are unchanged" in result.stderr
    assert disk_verdict(layout, old, new) == "old"
    assert os.path.getsize(stale) == 0         # the key it held is gone
    assert hook_runs(layout.log) == []


# Damaged outputs never open a way around the no-downgrade rule ---------------------------

def garbage(pem):
    return b"this is not a certificate\n"


def cut_in_half(pem):
    return pem[:len(pem) // 2]


def bad_base64(pem):
    lines = pem.split(b"\n")
    lines[3] = lines[3][:-1]            # one character short: incorrect padding
    return b"\n".join(lines)


def bad_der(pem):
    return b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"


def empty(pem):
    return b""


DAMAGES = [garbage, cut_in_half, bad_base64, bad_der, empty]


def installed_newer(run, layout, new_server, old_server):
    """The newer chain (ec1new) installed in live/; returns the argv offering the older."""
    live = layout.live
    assert grab(run, new_server, layout.certs / "ec1", "--out-dir", live).rc == 0
    return grab_args(old_server, layout.certs / "ec1", "--out-dir", live)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_a_damaged_cert_pem_does_not_let_an_older_leaf_in(run, renewal, damage):
    layout, old_server, new_server, old, new = renewal
    layout.reset({})
    older = installed_newer(run, layout, new_server, old_server)
    cert = os.path.join(layout.live, "cert.pem")
    with open(cert, "rb") as f:
        damaged = damage(f.read())
    with open(cert, "wb") as f:
        f.write(damaged)
    before = layout.read()
    result = run(*older)
    assert result.rc == 6, result.err
    line = error_lines(result.err)
    assert len(line) == 1 and "not newer than the installed one" in line[0], result.err
    assert "%s is not a readable certificate file" % cert in line[0], result.err
    assert layout.read() == before


def test_a_cert_pem_linked_to_a_file_that_is_no_certificate_is_refused(run, renewal,
                                                                         tmp_path):
    """cert.pem -> notes.txt: refused even for the same chain (what was installed is
    unknown), and notes.txt is not replaced unless --force."""
    layout, old_server, new_server, old, new = renewal
    layout.reset({})
    older = installed_newer(run, layout, new_server, old_server)
    notes, cert = tmp_path / "notes.txt", os.path.join(layout.live, "cert.pem")
    notes.write_text("not a certificate\n")
    os.unlink(cert)
    os.symlink(str(notes), cert)
    for argv in (older, grab_args(new_server, layout.certs / "ec1", "--out-dir", layout.live)):
        result = run(*argv)
        assert result.rc == 6, result.err
        assert "%s is not a readable certificate file" % cert in result.err
        assert notes.read_text() == "not a certificate\n"
    result = grab(run, new_server, layout.certs / "ec1", "--out-dir", layout.live, "--force")
    assert result.rc == 0, result.err
    assert "installing it because of --force" in result.err
    assert os.path.islink(cert) and read_ders(str(notes)) == read_ders(
        str(layout.certs / "ec1new" / "cert.pem"))
    assert_verifies(layout.certs / "ec1" / "root.pem", layout.live)


def test_a_truncated_fullchain_alone_refuses_an_older_leaf(run, served, certs, tmp_path):
    old_server, new_server = served("ec1"), served("ec1new")
    full = tmp_path / "fullchain.pem"
    assert grab(run, new_server, certs / "ec1", "--fullchain-path", full).rc == 0
    full.write_bytes(full.read_bytes()[:300])
    result = grab(run, old_server, certs / "ec1", "--fullchain-path", full)
    assert result.rc == 6, result.err
    assert "cannot tell which leaf is installed: %s is not a readable certificate file" \
        % full in result.err
    assert "--force replaces it" in result.err
    assert len(full.read_bytes()) == 300


def test_the_newest_leaf_of_any_output_counts(run, renewal):
    """cert.pem holds the older leaf (put back by hand), fullchain.pem the newer one."""
    layout, old_server, new_server, old, new = renewal
    layout.reset({})
    older = installed_newer(run, layout, new_server, old_server)
    cert = os.path.join(layout.live, "cert.pem")
    with open(cert, "wb") as f:
        f.write((layout.certs / "ec1" / "cert.pem").read_bytes())
    result = run(*older)
    assert result.rc == 6, result.err
    assert "not newer than the installed one" in result.err


# Messages that cannot be written, modes, inputs that cannot be read -----------------------

def test_a_stderr_that_cannot_be_written_changes_nothing(renewal):
    """cron's output on a full disk: the files go in, the hook runs, exit 0 (no traceback:
    that would exit 1)."""
    layout, old_server, new_server, old, new = renewal
    layout.reset(old)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, CERTGRAB] + [str(a) for a in layout.args(
            new_server, "-v")], stdout=subprocess.PIPE, stderr=full, timeout=30)
    assert result.returncode == 0
    assert disk_verdict(layout, old, new) == "new"
    layout.assert_verifies()
    assert hook_runs(layout.log) == ["x"]


def test_a_stderr_that_cannot_be_written_keeps_the_exit_code_of_a_failed_hook(renewal):
    layout, old_server, new_server, old, new = renewal
    layout.reset(old)
    argv = [a if a != "echo x >> %s" % layout.log else "exit 3" for a in
            layout.args(new_server)]
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, CERTGRAB] + [str(a) for a in argv],
                                stdout=subprocess.PIPE, stderr=full, timeout=30)
    assert result.returncode == 7
    assert disk_verdict(layout, old, new) == "pending"


@pytest.mark.parametrize("mode", [0o755, 0o6755, 0o1777])
def test_a_renewed_certificate_is_never_executable_or_set_id(run, renewal, mode):
    layout, old_server, new_server, old, new = renewal
    layout.reset(old)
    cert = os.path.join(layout.live, "cert.pem")
    os.chmod(cert, mode)
    os.chmod(layout.combined, 0o4750)
    assert run(*layout.args(new_server)).rc == 0
    layout.assert_verifies()
    assert os.stat(cert).st_mode & 0o7777 == mode & 0o644
    assert os.stat(layout.combined).st_mode & 0o7777 == 0o640


def test_a_key_path_that_cannot_be_read_is_not_a_usage_error(run, served, certs, tmp_path):
    """An I/O error is exit 2 like an unusable key, without the "--help" hint."""
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "live",
                  "--key-path", tmp_path)
    assert result.rc == 2, result.err
    assert result.err == "certgrab: cannot read --key-path %s: Is a directory\n" % tmp_path


@needs_strace
def test_a_cafile_that_cannot_be_read_is_not_a_usage_error(served, certs, tmp_path):
    server, log = served("ec1"), tmp_path / "trace.log"
    argv = grab_args(server, certs / "ec1", "--out-dir", tmp_path / "live")
    cafile = str(certs / "ec1" / "root.pem")
    assert traced(argv, log, ("openat",)).returncode == 0
    number, text = next((i + 1, text) for i, (_, text) in enumerate(parse_trace(log))
                        if cafile in text)
    result = inject_at(argv, log, "openat", number, text, "EIO", lambda: None)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "certgrab: cannot load --cafile %s: Input/output error\n" % cafile
