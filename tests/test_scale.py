"""Issue 15: a thousand endpoints. Wide by default, within the host's limits, never a crash.

    acceptance                                          tests
    1  --check over 1,024 sources whose server answers  test_a_thousand_sources_with_default_flags
       200 ms after each accept: exit 0, one line each  (the timing itself: `make bench`, (e))
    2  --check --same over the same sources             the same test, with --same
    3  --parallel 1024 under ulimit -n 512: every       test_parallel_1024_under_ulimit_512
       source reported, no traceback                    test_default_width_follows_ulimit,
                                                        test_no_free_descriptor_*,
                                                        test_no_thread_free_*

Speed is measured by `make bench`, never here: these tests assert what a user sees (every
source reported, in order, the exit code, no traceback, the warning when --parallel is
lowered) and how many sources were fetched at once, as the server counts them. Their time
bounds only catch a hang.
"""

import os
import resource
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import CERTGRAB, ROOT
from make_certs import NAME
from servers import DelayedTLSServer

FLEET = 1024                # sources in acceptance 1 to 3
DELAY = 0.2                 # seconds the server waits after each accept (acceptance 1)
HANG = 60                   # seconds; far beyond any run here: only a hang gets there
NOBODY = 65534              # uid and gid of nobody, whose processes the thread test limits

# Runs certgrab.main with every descriptor but argv[1] of them taken (opened on /dev/null):
# sources must then share the few left, or fail one by one.
HOLD_FILES = """
import os, resource, sys
sys.path.insert(0, %r)
import certgrab
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
for _ in range(int(sys.argv[1])):
    os.close(held.pop())
sys.exit(certgrab.main(sys.argv[2:]))
""" % ROOT


@pytest.fixture
def fleet_server(certs):
    """One server for the whole fleet (each SOURCE names it again): answers DELAY s late."""
    chain = certs / "ec1"
    with DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as server:
        yield server


@pytest.fixture
def root(certs):
    return str(certs / "ec1" / "root.pem")


def check_args(root, sources, *extra):
    return ["--check", "-n", NAME, "--cafile", root] + list(extra) + sources


def run_limited(argv, limits=(), user=None, python=sys.executable):
    """certgrab (or python code: argv[0] "-c") as a program under resource limits, as user."""
    def apply_limits():
        for kind, value in limits:
            resource.setrlimit(kind, value)
        if user is not None:
            os.setgid(user)
            os.setuid(user)
    proc = subprocess.run([python] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=apply_limits, timeout=HANG)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_every_source(out, sources, status="OK"):
    """The summary, then one line per source, in order, each with the status given."""
    lines = out.splitlines()
    assert lines[0].startswith("CERTGRAB %s - %d source(s): %d %s" % (
        status, len(sources), len(sources), status)), lines[0][:200]
    assert len(lines) == len(sources) + 1, "%d lines for %d sources" % (len(lines),
                                                                         len(sources))
    for line, source in zip(lines[1:], sources):
        assert line.startswith("%s - %s: " % (status, source)), (line, source)


# ---------------------------------------------------------------- 1 and 2: a thousand sources

@pytest.mark.parametrize("extra", [[], ["--same"]], ids=["check", "check-same"])
def test_a_thousand_sources_with_default_flags(run, certgrab, fleet_server, root, extra):
    sources = [fleet_server.address] * FLEET
    result = run(*check_args(root, sources, *extra))
    assert result.rc == 0, result.out[:2000] + result.err
    assert_every_source(result.out, sources)
    assert result.err == ""
    assert certgrab.DEFAULT_PARALLEL // 2 < fleet_server.most <= certgrab.DEFAULT_PARALLEL, \
        "the default fetches up to %d sources at once, not %d" % (
            certgrab.DEFAULT_PARALLEL, fleet_server.most)
    assert result.elapsed < HANG


# ---------------------------------------------------------------- 3: the open-files limit

def test_parallel_1024_under_ulimit_512(certgrab, fleet_server, root):
    """Lowered to what 512 descriptors allow, with a warning; every source reported."""
    sources = [fleet_server.address] * FLEET
    rc, out, err = run_limited([CERTGRAB] + check_args(root, sources, "--parallel", "1024"),
                               [(resource.RLIMIT_NOFILE, (512, 512))])
    allowed = (512 - certgrab.FILES_KEPT) // certgrab.FILES_PER_FETCH
    assert rc == 0, out[:2000] + err
    assert_every_source(out, sources)
    assert err == "certgrab: warning: --parallel 1024 lowered to %d: this process may open " \
        "only 512 files (ulimit -n), 2 per source at once\n" % allowed
    assert fleet_server.most <= allowed


@pytest.mark.parametrize("hard, most", [(128, 48), (4096, 256)], ids=["hard-128", "raised"])
def test_default_width_follows_ulimit(fleet_server, root, hard, most):
    """Without --parallel, a low soft limit is raised toward the hard one; what cannot be
    raised narrows the default silently (the user asked for nothing)."""
    sources = [fleet_server.address] * 300
    rc, out, err = run_limited([CERTGRAB] + check_args(root, sources),
                               [(resource.RLIMIT_NOFILE, (128, hard))])
    assert rc == 0, out[:2000] + err
    assert_every_source(out, sources)
    assert err == ""
    assert fleet_server.most <= most
    assert fleet_server.most > most // 2, "fetched %d at once" % fleet_server.most


def test_no_free_descriptor_makes_sources_wait_for_one(fleet_server):
    """With one descriptor left, sources take turns at it: all OK, no traceback."""
    sources = [fleet_server.address] * 6
    rc, out, err = run_limited(["-c", HOLD_FILES, "1", "--check", "--insecure",
                                "-n", NAME] + sources, [(resource.RLIMIT_NOFILE, (64, 64))])
    assert rc == 0, out + err
    assert_every_source(out, sources)
    assert "Traceback" not in err
    assert fleet_server.most == 1


def test_no_free_descriptor_until_the_timeout_is_each_sources_error(fleet_server):
    sources = [fleet_server.address] * 3
    rc, out, err = run_limited(["-c", HOLD_FILES, "0", "--check", "--insecure", "--timeout",
                                "0.5", "-n", NAME] + sources,
                               [(resource.RLIMIT_NOFILE, (64, 64))])
    assert rc == 2, out + err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].startswith("CERTGRAB CRITICAL - 3 source(s): 3 CRITICAL; first: "
                               "%s: cannot open a socket: Too many open files" % sources[0])
    assert lines[1:] == ["CRITICAL - %s: cannot open a socket: Too many open files" % source
                         for source in sources]
    assert fleet_server.connections == 0


# ---------------------------------------------------------------- threads

@pytest.fixture
def nobody_dir():
    """A directory nobody may read (pytest's tmp_path is under a 0700 one)."""
    directory = tempfile.mkdtemp(prefix="certgrab-scale-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


def python_for_nobody():
    """An interpreter the user nobody may run (pyenv's under /root is not)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([python, "-c", "pass"], preexec_fn=lambda: os.setuid(NOBODY),
                           check=True, timeout=HANG)
            return python
        except (OSError, subprocess.CalledProcessError):
            continue
    pytest.skip("no Python interpreter that the user nobody may run")


def test_no_thread_free_fetches_with_the_threads_there_are(fleet_server, certs, nobody_dir):
    """nobody may run 4 processes (threads count): certgrab starts what it can and says so."""
    python = python_for_nobody()
    copy, root = os.path.join(nobody_dir, "certgrab.py"), os.path.join(nobody_dir, "root.pem")
    shutil.copyfile(CERTGRAB, copy)
    shutil.copyfile(str(certs / "ec1" / "root.pem"), root)
    sources = [fleet_server.address] * 16
    rc, out, err = run_limited([copy] + check_args(root, sources),
                               [(resource.RLIMIT_NPROC, (4, 4))], user=NOBODY, python=python)
    assert rc == 0, out + err
    assert_every_source(out, sources)
    assert err.startswith("certgrab: warning: could start only "), err
    assert "of 16 threads (out of threads or memory): fetching " in err
    assert "Traceback" not in err
    assert fleet_server.most < 4


def test_config_sections_run_at_once_share_the_open_files_limit(certs, root, tmp_path):
    """Two --config sections on different sources run at once: each gets half of what
    the open-files limit allows, says so when its --parallel is lowered, and every source
    of both is reported."""
    chain = certs / "ec1"
    with DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as first, \
            DelayedTLSServer(chain / "fullchain.pem", chain / "key.pem", DELAY) as second:
        config = tmp_path / "fleet.conf"
        config.write_text("[DEFAULT]\nservername = %s\ncafile = %s\ncheck = yes\n"
                          "parallel = 200\n\n[first]\nsource = %s\n\n[second]\nsource = %s\n"
                          % (NAME, root, " ".join([first.address] * 100),
                             " ".join([second.address] * 100)))
        rc, out, err = run_limited([CERTGRAB, "--config", str(config)],
                                   [(resource.RLIMIT_NOFILE, (256, 256))])
    assert rc == 0, out + err
    share = (256 - 32) // 2 // 2        # FILES_KEPT, FILES_PER_FETCH, two sections at once
    lowered = ("--parallel 200 lowered to %d: this process may open only 256 files "
               "(ulimit -n), 2 per source at once, shared by 2 sections at once" % share)
    assert err.count(lowered) == 2, err
    assert out.count("\nOK - ") == 200, out
    assert "Traceback" not in err
    assert first.most <= share and second.most <= share
