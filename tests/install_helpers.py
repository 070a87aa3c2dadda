"""Helpers shared by the install tests (test_install, test_hook, test_crash, test_dualcert).

    grab_args(certs, server, *extra)   the argv of one certgrab run against a loopback server
    run_subprocess(argv, ...)          certgrab.py as a child process (for kills, umask, races)
    snapshot(directory)                every file's bytes, inode, mtime, mode and owner
    expected(certs, chain)             what --out-dir holds for a chain (certificates, as DER)
    files_ders(directory)              what --out-dir holds now (certificates, as DER)
    entries(directory)                 the names in a directory, certgrab's lock file aside
    hook_command(log)                  a deploy hook that appends one line per run to log
    message_lines(err)                 stderr lines that are neither hints nor warnings
    assert_verifies(root, out_dir)     `openssl verify -CAfile ROOT -untrusted chain.pem
                                       cert.pem` passes on what --out-dir holds
    assert_fullchain_verifies(root, path)   the same for a fullchain (or combined) file
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile

from conftest import CERTGRAB
from make_certs import ders_to_pem, read_ders

NAME = "www.example.test"
OUT_FILES = ["cert.pem", "chain.pem", "fullchain.pem"]
TEMP_MARK = ".certgrab-tmp-"
LOCK = ".certgrab.lock"  # certgrab's lock file in each directory it writes (mode 0600, stays)


def grab_args(certs, server, *extra, **kw):
    """SERVER -n www.example.test --cafile <root of the ec chains> EXTRA..."""
    root = kw.get("root", certs / "ec1" / "root.pem")
    return [server.address, "-n", NAME, "--cafile", root] + list(extra)


def run_subprocess(argv, timeout=30, **popen):
    """Run certgrab.py ARGV with this interpreter; CompletedProcess with text output."""
    return subprocess.run([sys.executable, CERTGRAB] + [str(a) for a in argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, universal_newlines=True, timeout=timeout,
                          **popen)


def popen(argv, **kw):
    return subprocess.Popen([sys.executable, CERTGRAB] + [str(a) for a in argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, universal_newlines=True, **kw)


def snapshot(directory):
    """{name: (bytes, inode, mtime_ns, mode, uid, gid)} of every entry in directory."""
    state = {}
    for name in sorted(os.listdir(str(directory))):
        path = os.path.join(str(directory), name)
        st = os.lstat(path)
        with open(path, "rb") as f:
            data = f.read()
        state[name] = (data, st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                       st.st_uid, st.st_gid)
    return state


def expected(certs, chain):
    """{file name: [DER, ...]} of what --out-dir must hold for chain."""
    full = read_ders(certs / chain / "fullchain.pem")
    return {"cert.pem": full[:1], "chain.pem": full[1:], "fullchain.pem": full}


def files_ders(directory, names=OUT_FILES):
    return dict((name, read_ders(os.path.join(str(directory), name))) for name in names)


def entries(directory):
    """The names in directory, sorted, without certgrab's lock file; that one, if there,
    must be a regular file of mode 0600 owned by the user running the tests (root)."""
    names = sorted(os.listdir(str(directory)))
    if LOCK in names:
        st = os.lstat(os.path.join(str(directory), LOCK))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 \
            and st.st_uid == os.geteuid(), "the lock file is this user's, 0600: %r" % (st,)
        names.remove(LOCK)
    return names


def temp_files(directory):
    return [n for n in os.listdir(str(directory)) if TEMP_MARK in n]


def hook_command(log):
    """A deploy hook appending "$RENEWED_LINEAGE" to log (outside the output directory)."""
    return 'echo "$RENEWED_LINEAGE" >> %s' % log


def hook_runs(log):
    """The lines the hook of hook_command(log) appended: one per run."""
    try:
        with open(str(log)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def message_lines(err):
    """stderr lines that are not hints or warnings: the error (or report) itself."""
    return [line for line in err.splitlines() if line.strip()
            and not line.startswith(("certgrab: hint:", "certgrab: warning:"))]


def assert_refused(result, code):
    """Exit code, one `certgrab: ...` reason line (plus hints/warnings), no traceback."""
    assert result.rc == code, (result.rc, result.err)
    assert "Traceback" not in result.err, result.err
    lines = message_lines(result.err)
    assert len(lines) == 1, "want one reason line, got:\n" + result.err
    assert lines[0].startswith("certgrab: "), result.err
    assert result.out == ""
    return lines[0]


def openssl_verify(root, cert, chain):
    """`openssl verify -CAfile ROOT -untrusted CHAIN CERT` (CompletedProcess): the leaf in
    cert verifies with the intermediates in chain and no others. A chain file without
    certificates (a leaf right under the root) is left out: -untrusted refuses it."""
    untrusted = ["-untrusted", str(chain)] if read_ders(chain) else []
    return subprocess.run(["openssl", "verify", "-CAfile", str(root)] + untrusted + [str(cert)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, universal_newlines=True, timeout=30)


def assert_verifies(root, out_dir, cert="cert.pem", chain="chain.pem"):
    """What was written in out_dir verifies with openssl: the leaf in cert, with only
    the intermediates in chain, up to root."""
    proc = openssl_verify(root, os.path.join(str(out_dir), cert),
                          os.path.join(str(out_dir), chain))
    assert proc.returncode == 0, "openssl verify failed on what was written:\n" + proc.stdout


def assert_fullchain_verifies(root, path):
    """A written fullchain (or combined) file verifies with openssl: its first certificate
    with only the certificates after it, up to root."""
    ders = read_ders(path)
    assert ders, "no certificate in %s" % path
    scratch = tempfile.mkdtemp(prefix="verify-")
    try:
        for name, part in (("cert.pem", ders[:1]), ("chain.pem", ders[1:])):
            with open(os.path.join(scratch, name), "w") as f:
                f.write(ders_to_pem(part))
        assert_verifies(root, scratch)
    finally:
        shutil.rmtree(scratch)
