"""The deploy hook: certbot's environment, only after a change, retried until it succeeds,
killed (with its children) after --hook-timeout, its output passed through."""

import hashlib
import os
import time

import pytest

from helpers import (OUT_FILES, assert_fullchain_verifies, assert_verifies, error_lines, expected,
                     files_ders, grab, grab_args, hook_command, hook_runs, run_subprocess,
                     snapshot)
from make_certs import read_ders


def install_args(certs, server, out, hook, *extra):
    return grab_args(server, certs / "ec1", "--out-dir", out,
                     "--key-path", certs / "ec1" / "key.pem", "--deploy-hook", hook, *extra)


def read_env(path):
    """The environment a hook saved with `env -0 > path`."""
    pairs = [item.split("=", 1) for item in path.read_bytes().decode().split("\0") if item]
    return dict(pairs)


def test_hook_environment_is_certbots_plus_certgrabs(run, served, certs, tmp_path):
    out, env_file, argv_file = tmp_path / "live", tmp_path / "env", tmp_path / "argv"
    server = served("ec1")
    hook = "env -0 > %s; cat /proc/$$/cmdline > %s" % (env_file, argv_file)
    result = run(*install_args(certs, server, out, hook, "--combined-path",
                               tmp_path / "haproxy.pem"))
    assert result.rc == 0, result.err
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert_fullchain_verifies(certs / "ec1" / "root.pem", tmp_path / "haproxy.pem")
    env = read_env(env_file)
    leaf = read_ders(certs / "ec1" / "cert.pem")[0]
    assert env["RENEWED_LINEAGE"] == str(out.resolve())
    assert env["RENEWED_DOMAINS"] == "www.example.test example.test"
    assert env["CERTGRAB_SOURCE"] == server.address
    assert env["CERTGRAB_SHA256"] == hashlib.sha256(leaf).hexdigest()
    assert env["CERTGRAB_FILES"].split(" ") == [str(out.resolve() / n) for n in OUT_FILES] + \
        [str((tmp_path / "haproxy.pem").resolve())]
    assert env.get("PATH") == os.environ.get("PATH"), "the rest of the environment is kept"
    assert "RENEWED_LINEAGE" not in os.environ, "context is not put into certgrab's own env"
    # Nothing from the certificate reaches the command line: /bin/sh -c CMD, verbatim.
    assert argv_file.read_bytes().split(b"\0")[:-1] == [b"/bin/sh", b"-c", hook.encode()]


def test_hook_runs_in_lineage_with_relative_paths(run, served, certs, tmp_path, monkeypatch):
    """Relative output paths still give the hook absolute paths."""
    monkeypatch.chdir(tmp_path)
    env_file = tmp_path / "env"
    result = grab(run, served("ec1"), certs / "ec1", "--fullchain-path", "sub/full.pem",
                  "--deploy-hook", "env -0 > %s" % env_file)
    assert result.rc == 0, result.err
    env = read_env(env_file)
    assert env["RENEWED_LINEAGE"] == str((tmp_path / "sub").resolve())
    assert env["CERTGRAB_FILES"] == str((tmp_path / "sub" / "full.pem").resolve())
    assert_fullchain_verifies(certs / "ec1" / "root.pem", tmp_path / "sub" / "full.pem")


def test_hook_output_is_passed_through(served, certs, tmp_path):
    hook = "echo hook-stdout-line; echo hook-stderr-line >&2"
    result = run_subprocess(install_args(certs, served("ec1"), tmp_path / "out", hook))
    assert result.returncode == 0, result.stderr
    assert "hook-stdout-line" in result.stdout + result.stderr
    assert "hook-stderr-line" in result.stderr


def test_failed_hook_exits_7_and_is_retried_by_the_next_run(run, served, certs, tmp_path):
    """exit 1 -> 7, files installed; next run (hook fixed) runs it again though nothing
    changed; the run after that runs nothing."""
    out, log, fail = tmp_path / "out", tmp_path / "hook.log", tmp_path / "fail"
    hook = 'echo "$RENEWED_LINEAGE" >> %s; test ! -e %s' % (log, fail)
    old, new = served("ec1"), served("ec1new")
    assert run(*install_args(certs, old, out, hook)).rc == 0
    assert len(hook_runs(log)) == 1

    fail.write_text("")
    failed = run(*install_args(certs, new, out, hook))
    assert failed.rc == 7, failed.err
    lines = error_lines(failed.err)
    assert len(lines) == 2, failed.err                         # "installed ..." + the error
    assert lines[-1].startswith("certgrab: --deploy-hook failed (exit status 1)"), failed.err
    assert files_ders(out) == expected(certs, "ec1new"), "the files are installed"
    assert_verifies(certs / "ec1new" / "root.pem", out)
    assert len(hook_runs(log)) == 2

    still_failing = run(*install_args(certs, new, out, hook))
    assert still_failing.rc == 7, "a hook that keeps failing is retried every run"
    assert len(hook_runs(log)) == 3

    fail.unlink()
    installed = snapshot(out)
    retry = run(*install_args(certs, new, out, hook))
    assert retry.rc == 0, retry.err
    assert len(hook_runs(log)) == 4, "the next run retries the hook though nothing changed"
    assert dict((n, v[:2]) for n, v in snapshot(out).items()) == \
        dict((n, v[:2]) for n, v in installed.items()), "contents and inodes untouched"
    for name in OUT_FILES:
        assert abs((out / name).stat().st_mtime - time.time()) < 120, "mtime set to now"

    done = snapshot(out)
    quiet = run(*install_args(certs, new, out, hook))
    assert quiet.rc == 0, quiet.err
    assert len(hook_runs(log)) == 4 and snapshot(out) == done, "then nothing runs"


def test_pending_hook_is_retried_even_by_a_run_with_other_sources(run, served, certs, tmp_path):
    """The retry does not depend on the run seeing a change: a run fetching the same chain
    from another server retries too."""
    out, log, fail = tmp_path / "out", tmp_path / "hook.log", tmp_path / "fail"
    hook = 'echo x >> %s; test ! -e %s' % (log, fail)
    fail.write_text("")
    assert run(*install_args(certs, served("ec1"), out, hook)).rc == 7
    fail.unlink()
    assert run(*install_args(certs, served("ec1"), out, hook)).rc == 0
    assert len(hook_runs(log)) == 2


def test_a_run_without_hook_leaves_the_pending_mark(run, served, certs, tmp_path):
    """A hook that failed is not forgotten because a later run was started without one."""
    out, log, fail = tmp_path / "out", tmp_path / "hook.log", tmp_path / "fail"
    hook = 'echo x >> %s; test ! -e %s' % (log, fail)
    fail.write_text("")
    server = served("ec1")
    assert run(*install_args(certs, server, out, hook)).rc == 7
    plain = grab(run, server, certs / "ec1", "--out-dir", out)
    assert plain.rc == 0, plain.err
    fail.unlink()
    assert run(*install_args(certs, server, out, hook)).rc == 0
    assert len(hook_runs(log)) == 2


def _alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_hook_timeout_kills_the_hook_and_its_children(run, served, certs, tmp_path):
    out, pids = tmp_path / "out", tmp_path / "pids"
    hook = "sleep 60 & echo $! > %s.child; echo $$ > %s.sh; wait" % (pids, pids)
    start = time.monotonic()
    result = run(*install_args(certs, served("ec1"), out, hook, "--hook-timeout", "0.5"))
    elapsed = time.monotonic() - start
    assert result.rc == 7, result.err
    assert error_lines(result.err)[-1].startswith(   # tmp_path alone holds "timeout"
        "certgrab: --deploy-hook was killed after --hook-timeout 0.5 s"), result.err
    assert elapsed < 10, "killed after about 0.5 s, not after the hook's 60 s"
    child, shell = (int(open("%s.%s" % (pids, n)).read()) for n in ("child", "sh"))
    deadline = time.monotonic() + 5
    while (_alive(child) or _alive(shell)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(shell), "the hook's shell is killed"
    assert not _alive(child), "the hook's child (same process group) is killed"
    assert files_ders(out) == expected(certs, "ec1"), "the files are installed"
    assert_verifies(certs / "ec1" / "root.pem", out)


def test_hook_timeout_is_retried(run, served, certs, tmp_path):
    out, log, slow = tmp_path / "out", tmp_path / "hook.log", tmp_path / "slow"
    hook = "test -e %s && sleep 30; echo x >> %s" % (slow, log)
    slow.write_text("")
    server = served("ec1")
    assert run(*install_args(certs, server, out, hook, "--hook-timeout", "0.3")).rc == 7
    assert hook_runs(log) == []
    slow.unlink()
    assert run(*install_args(certs, server, out, hook, "--hook-timeout", "5")).rc == 0
    assert len(hook_runs(log)) == 1


def test_no_hook_when_nothing_changed_and_nothing_pending(run, served, certs, tmp_path):
    out, log = tmp_path / "out", tmp_path / "hook.log"
    server = served("ec1")
    assert grab(run, server, certs / "ec1", "--out-dir", out).rc == 0
    result = grab(run, server, certs / "ec1", "--out-dir", out, "--deploy-hook",
                  hook_command(log))
    assert result.rc == 0, result.err
    assert hook_runs(log) == [], "files installed earlier without a hook are not a change"


@pytest.mark.parametrize("bad", [["--hook-timeout", "0"], ["--hook-timeout", "x"]])
def test_bad_hook_timeout_is_a_usage_error(run, served, certs, tmp_path, bad):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "o",
                  "--deploy-hook", "true", *bad)
    assert result.rc == 2 and server.connections == 0


def test_hook_without_output_is_a_usage_error(run, served, certs, tmp_path):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--deploy-hook", "true")
    assert result.rc == 2 and server.connections == 0
