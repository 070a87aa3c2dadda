"""The safe install (issue 3): the gate, no downgrade, idempotence, modes, owners, dry runs.

Each test runs certgrab.main in-process against loopback servers serving the generated chains:
ec1 (issued 2024) and ec1new (same key, issued 2025) play the installed certificate and its
renewal. Hooks append to a log file outside the output directory.
"""

import os
import re
import stat
import subprocess

import pytest

from helpers import (OUT_FILES, assert_fullchain_verifies, assert_refused, assert_verifies, entries,
                     error_lines, expected, files_ders, grab, grab_args, hook_command, hook_runs,
                     run_subprocess, snapshot, temp_files)
from make_certs import NAME, pem_ders, read_ders
from servers import closed_port


@pytest.fixture
def lineage(tmp_path):
    """(output directory, hook log) in separate places."""
    return tmp_path / "live" / "example", tmp_path / "hook.log"


def install(run, certs, server, out, log=None, *extra):
    args = grab_args(server, certs / "ec1", "--out-dir", out,
                     "--key-path", certs / "ec1" / "key.pem", *extra)
    if log is not None:
        args += ["--deploy-hook", hook_command(log)]
    return run(*args)


def assert_holds(out, certs, chain):
    assert entries(out) == OUT_FILES, "only the three files (and the lock), no temp"
    assert files_ders(out) == expected(certs, chain)
    assert_verifies(certs / chain / "root.pem", out)


# Acceptance 1: first install, rerun, renewal ------------------------------------------------

def test_install_rerun_renewal_and_hook(run, served, certs, lineage):
    out, log = lineage
    old, new = served("ec1"), served("ec1new")

    first = install(run, certs, old, out, log)
    assert first.rc == 0, first.err
    assert_holds(out, certs, "ec1")
    assert hook_runs(log) == [str(out.resolve())], "one hook run, RENEWED_LINEAGE = out dir"
    for name in OUT_FILES:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644

    installed = snapshot(out)
    rerun = install(run, certs, old, out, log)
    assert rerun.rc == 0, rerun.err
    assert snapshot(out) == installed, "a rerun must not touch any file (inode, mtime)"
    assert len(hook_runs(log)) == 1, "a rerun runs no hook"

    (out / "cert.pem").chmod(0o640)
    before = snapshot(out)
    renewal = install(run, certs, new, out, log)
    assert renewal.rc == 0, renewal.err
    assert_holds(out, certs, "ec1new")
    assert hook_runs(log) == [str(out.resolve())] * 2, "the renewal runs the hook once more"
    after = snapshot(out)
    assert after["cert.pem"][3] == 0o640, "the 0640 mode survives the renewal"
    assert after["fullchain.pem"][3] == 0o644
    assert after["chain.pem"] == before["chain.pem"], \
        "chain.pem did not change (same intermediate): it must not be rewritten"
    for name in ("cert.pem", "fullchain.pem"):
        assert after[name][1] != before[name][1], "%s replaced by rename (new inode)" % name
        assert after[name][2] > before[name][2] - 1, name
    assert temp_files(out) == []

    again = install(run, certs, new, out, log)
    assert again.rc == 0 and snapshot(out) == after and len(hook_runs(log)) == 2


def test_renewal_updates_mtime_to_now_after_the_hook(run, served, certs, lineage):
    """With a hook, the files' mtimes are a real date once the hook ran (not 1970)."""
    import time
    out, log = lineage
    assert install(run, certs, served("ec1"), out, log).rc == 0
    for name in OUT_FILES:
        assert abs((out / name).stat().st_mtime - time.time()) < 120, name


# Acceptance 2: refusals --------------------------------------------------------------------

def refused_run(run, certs, out, log, server, *extra):
    """Run against an installed ec1 set; the files and the hook log must be untouched."""
    before, runs = snapshot(out), hook_runs(log)
    args = grab_args(server, certs / "ec1", "--out-dir", out, "--deploy-hook", hook_command(log),
                     *extra)
    result = run(*args)
    assert snapshot(out) == before, "a refused run must not touch the files"
    assert hook_runs(log) == runs, "a refused run must not run the hook"
    return result


@pytest.fixture
def installed_ec1(run, served, certs, lineage):
    out, log = lineage
    assert install(run, certs, served("ec1"), out, log).rc == 0
    assert len(hook_runs(log)) == 1
    return out, log


@pytest.mark.parametrize("key", ["ec2", "rsa1"])
def test_a_different_key_is_refused(run, served, certs, installed_ec1, key):
    """The server's leaf (ec1new) is not for --key-path: refused, both fingerprints named."""
    out, log = installed_ec1
    result = refused_run(run, certs, out, log, served("ec1new"),
                         "--key-path", certs / key / "key.pem")
    line = assert_refused(result, 6)
    assert len(re.findall(r"\b[0-9a-f]{64}\b", line)) == 2, "both fingerprints: " + line
    assert str(certs / key / "key.pem") in line


def test_an_older_leaf_is_refused_and_force_installs_it(run, served, certs, lineage):
    out, log = lineage
    assert install(run, certs, served("ec1new"), out, log).rc == 0
    old = served("ec1")
    result = refused_run(run, certs, out, log, old, "--key-path", certs / "ec1" / "key.pem")
    line = assert_refused(result, 6)
    assert "2024" in line and "2025" in line, "say what is installed and what was offered: " \
        + line
    assert "--force" not in result.err, "a stale source gets no --force hint (issue 11)"

    forced = install(run, certs, old, out, log, "--force")
    assert forced.rc == 0, forced.err
    assert_holds(out, certs, "ec1")
    assert len(hook_runs(log)) == 2


def test_force_does_not_override_the_key_check(run, served, certs, installed_ec1):
    out, log = installed_ec1
    result = refused_run(run, certs, out, log, served("ec1new"), "--force",
                         "--key-path", certs / "ec2" / "key.pem")
    assert_refused(result, 6)


def test_a_different_leaf_with_the_same_notbefore_is_refused(run, served, certs,
                                                             installed_ec1):
    """ec2's leaf is issued the same day as ec1's: not newer, a different certificate."""
    out, log = installed_ec1
    result = refused_run(run, certs, out, log, served("ec2"),
                         "--key-path", certs / "ec2" / "key.pem")
    assert_refused(result, 6)


@pytest.mark.parametrize("insecure", [True, False], ids=["insecure", "verified"])
def test_an_expired_leaf_is_refused(run, served, certs, installed_ec1, insecure):
    out, log = installed_ec1
    server = served("expired")
    key = ["--key-path", certs / "expired" / "key.pem"]
    if insecure:
        result = run(*[server.address, "-n", NAME, "--insecure", "--out-dir", out,
                       "--deploy-hook", hook_command(log)] + key)
        line = assert_refused(result, 6)
        assert "expired" in line and "2021" in line, line
    else:
        result = refused_run(run, certs, out, log, server, *key)
        line = assert_refused(result, 4)
        assert "expired" in line, line
    assert snapshot(out) and files_ders(out) == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert len(hook_runs(log)) == 1


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_wrong_name_is_refused_even_with_insecure(run, served, certs, installed_ec1, force):
    out, log = installed_ec1
    server = served("wrongname")
    before = snapshot(out)
    result = run(server.address, "-n", NAME, "--insecure", "--out-dir", out,
                 "--key-path", certs / "wrongname" / "key.pem",
                 "--deploy-hook", hook_command(log), *force)
    line = assert_refused(result, 6)
    assert NAME in line and "other.example.test" in line, line
    assert snapshot(out) == before and len(hook_runs(log)) == 1


def test_key_path_alone_gates_stdout_too(run, served, certs):
    """--key-path without output files: the gate still applies (nothing printed)."""
    result = grab(run, served("ec1"), certs / "ec1", "--key-path", certs / "rsa1" / "key.pem")
    assert_refused(result, 6)


def test_without_key_path_a_warning_says_the_key_was_not_checked(run, served, certs, tmp_path):
    result = grab(run, served("ec1"), certs / "ec1", "--out-dir", tmp_path / "o")
    assert result.rc == 0, result.err
    assert re.search(r"warning:.*key", result.err), result.err


# Acceptance 3: several sources ---------------------------------------------------------------

@pytest.mark.parametrize("preinstalled", [False, True], ids=["empty", "installed"])
def test_down_stale_renewed_installs_the_renewed_chain(run, served, certs, lineage,
                                                       preinstalled):
    out, log = lineage
    stale, renewed = served("ec1"), served("ec1new")
    if preinstalled:
        assert install(run, certs, stale, out, log).rc == 0
    with closed_port() as down:
        result = run("127.0.0.1:%d" % down, stale.address, renewed.address, "-n", NAME,
                     "--cafile", certs / "ec1" / "root.pem", "--out-dir", out,
                     "--key-path", certs / "ec1" / "key.pem", "--deploy-hook", hook_command(log))
    assert result.rc == 0, result.err
    assert_holds(out, certs, "ec1new")
    assert len(hook_runs(log)) == (2 if preinstalled else 1)
    assert str(down) in result.err, "the source that failed is reported: " + result.err


def test_a_refused_source_is_skipped_for_a_good_one(run, served, certs, lineage):
    """[wrong key, renewed]: the gate failure of one source is a warning, not the verdict."""
    out, log = lineage
    other, renewed = served("ec2"), served("ec1new")
    result = run(other.address, renewed.address, "-n", NAME, "--cafile",
                 certs / "ec1" / "root.pem", "--out-dir", out,
                 "--key-path", certs / "ec1" / "key.pem")
    assert result.rc == 0, result.err
    assert_holds(out, certs, "ec1new")


# Acceptance 4: single files, combined file -----------------------------------------------------

def test_fullchain_path_alone_writes_only_that_file(run, served, certs, tmp_path):
    target = tmp_path / "only" / "fullchain.pem"
    log = tmp_path / "hook.log"
    result = grab(run, served("ec1"), certs / "ec1", "--fullchain-path", target,
                  "--key-path", certs / "ec1" / "key.pem",
                  "--deploy-hook", hook_command(log))
    assert result.rc == 0, result.err
    assert entries(target.parent) == ["fullchain.pem"]
    assert read_ders(target) == read_ders(certs / "ec1" / "fullchain.pem")
    assert_fullchain_verifies(certs / "ec1" / "root.pem", target)
    assert hook_runs(log) == [str(target.parent.resolve())], \
        "RENEWED_LINEAGE is the directory of the first output"


def test_combined_path_holds_chain_and_key_0600_under_umask_000(served, certs, tmp_path):
    combined, full = tmp_path / "c" / "haproxy.pem", tmp_path / "c" / "fullchain.pem"
    server = served("ec1")
    result = run_subprocess(grab_args(server, certs / "ec1", "--combined-path", combined,
                                      "--fullchain-path", full,
                                      "--key-path", certs / "ec1" / "key.pem"),
                            preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    text = combined.read_text()
    assert pem_ders(text) == read_ders(certs / "ec1" / "fullchain.pem")
    assert_fullchain_verifies(certs / "ec1" / "root.pem", combined)
    assert_fullchain_verifies(certs / "ec1" / "root.pem", full)
    key = (certs / "ec1" / "key.pem").read_text().strip()
    assert key in text, "the private key from --key-path is in the combined file"
    assert stat.S_IMODE(combined.stat().st_mode) == 0o600
    assert stat.S_IMODE(full.stat().st_mode) == 0o644, "umask 000 must not make 0666 files"
    assert entries(combined.parent) == ["fullchain.pem", "haproxy.pem"]


def test_combined_path_needs_key_path(run, served, certs, tmp_path):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--combined-path", tmp_path / "c.pem")
    assert result.rc == 2
    assert server.connections == 0
    assert not (tmp_path / "c.pem").exists()


def test_a_combined_file_others_can_read_is_refused_not_reused(run, served, certs, tmp_path):
    """An existing combined file with a lax mode: the renewal does not put the key into it
    again (issue 19); the fix is named, and once applied the renewal goes in, still 0600."""
    combined = tmp_path / "haproxy.pem"
    key = ["--key-path", certs / "ec1" / "key.pem"]
    assert grab(run, served("ec1"), certs / "ec1", "--combined-path", combined, *key).rc == 0
    combined.chmod(0o644)
    before = combined.read_bytes()
    server = served("ec1new")
    result = grab(run, server, certs / "ec1", "--combined-path", combined, *key)
    line = assert_refused(result, 6)
    assert "holds the private key, and other users may read it (mode 0644)" in line, line
    assert "hint: chmod 600 %s" % combined in result.err, result.err
    assert server.connections == 0, "refused before connecting"
    assert combined.read_bytes() == before and stat.S_IMODE(combined.stat().st_mode) == 0o644
    combined.chmod(0o600)
    result = grab(run, server, certs / "ec1", "--combined-path", combined, *key)
    assert result.rc == 0, result.err
    assert pem_ders(combined.read_text()) == read_ders(certs / "ec1new" / "fullchain.pem")
    assert stat.S_IMODE(combined.stat().st_mode) == 0o600


# Acceptance 7: dry run, encrypted keys, modes, owners, stale temp files ------------------------

def test_dry_run_writes_nothing_and_runs_no_hook(run, served, certs, installed_ec1):
    out, log = installed_ec1
    before = snapshot(out)
    result = install(run, certs, served("ec1new"), out, log, "--dry-run")
    assert result.rc == 0, result.err
    assert snapshot(out) == before and len(hook_runs(log)) == 1
    says = " ".join(error_lines(result.err))
    assert "cert.pem" in says and "fullchain.pem" in says, "say what would change: " + says
    assert "chain.pem " not in says.replace("fullchain.pem", ""), "chain.pem would not change"
    assert re.search(r"hook", says), "say that the hook would run: " + says


def test_dry_run_into_a_new_directory_creates_nothing(run, served, certs, lineage):
    out, log = lineage
    result = install(run, certs, served("ec1"), out, log, "--dry-run")
    assert result.rc == 0, result.err
    assert not out.exists() and hook_runs(log) == []


def test_dry_run_up_to_date_and_refused(run, served, certs, installed_ec1):
    out, log = installed_ec1
    same = install(run, certs, served("ec1"), out, log, "--dry-run")
    assert same.rc == 0, same.err
    assert "up to date" in same.err
    assert "hook" not in " ".join(error_lines(same.err))
    older = install(run, certs, served("ec1"), out, log, "--dry-run", "--force")
    assert older.rc == 0
    # ec1 installed, ec2 offered: the gate refuses in a dry run as it would for real.
    refused = refused_run(run, certs, out, log, served("ec2"), "--dry-run",
                          "--key-path", certs / "ec2" / "key.pem")
    assert_refused(refused, 6)


@pytest.fixture(scope="module")
def encrypted_keys(tmp_path_factory, certs):
    """ec1's key encrypted as PKCS#8 and as traditional PEM; the password file."""
    d = tmp_path_factory.mktemp("keys")
    (d / "password").write_text("s3cret pass\n")
    subprocess.run(["openssl", "pkcs8", "-topk8", "-in", str(certs / "ec1" / "key.pem"),
                    "-out", str(d / "pkcs8.pem"), "-v2", "aes-256-cbc",
                    "-passout", "pass:s3cret pass"], check=True)
    subprocess.run(["openssl", "ec", "-in", str(certs / "ec1" / "key.pem"),
                    "-out", str(d / "traditional.pem"), "-aes256",
                    "-passout", "pass:s3cret pass"], check=True, stderr=subprocess.DEVNULL)
    assert b"Proc-Type" in (d / "traditional.pem").read_bytes()
    return d


@pytest.mark.parametrize("form", ["pkcs8", "traditional"])
def test_encrypted_key_with_password_file(run, served, certs, tmp_path, encrypted_keys, form):
    out = tmp_path / "out"
    key = encrypted_keys / (form + ".pem")
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--key-path", key,
                  "--key-password-file", encrypted_keys / "password")
    assert result.rc == 0, result.err
    assert_holds(out, certs, "ec1new")
    refused = grab(run, served("rsa1"), certs / "rsa1", "--out-dir", out, "--key-path", key,
                   "--key-password-file", encrypted_keys / "password")
    assert_refused(refused, 6)


def test_encrypted_key_without_password_exits_2_before_any_network(run, served, certs,
                                                                   tmp_path, encrypted_keys):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "out",
                  "--key-path", encrypted_keys / "pkcs8.pem")
    assert result.rc == 2
    assert "--key-password-file" in result.err
    assert server.connections == 0, "a usage error is found before dialling"
    assert not (tmp_path / "out").exists()


def test_wrong_password_is_a_clear_error(run, served, certs, tmp_path, encrypted_keys):
    (tmp_path / "wrong").write_text("nope\n")
    result = grab(run, served("ec1"), certs / "ec1", "--out-dir", tmp_path / "out",
                  "--key-path", encrypted_keys / "pkcs8.pem",
                  "--key-password-file", tmp_path / "wrong")
    assert result.rc == 2, result.err
    assert not (tmp_path / "out").exists() or os.listdir(str(tmp_path / "out")) == []
    line = assert_refused(result, 2)
    assert line.startswith("certgrab: cannot use --key-path %s: " % (encrypted_keys / "pkcs8.pem"))
    assert "certgrab: hint: is --key-password-file the key's password?" in \
        result.err.splitlines(), result.err


@pytest.mark.parametrize("mode", ["0666", "0620", "0602", "777", "banana", "10644"])
def test_group_or_world_writable_mode_is_a_usage_error(run, served, certs, tmp_path, mode):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "out", "--mode", mode)
    assert result.rc == 2, result.err
    assert server.connections == 0
    assert not (tmp_path / "out").exists()


def test_mode_applies_to_new_files_only(run, served, certs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cert.pem").write_bytes((certs / "ec1" / "cert.pem").read_bytes())
    (out / "cert.pem").chmod(0o604)
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--mode", "0640")
    assert result.rc == 0, result.err
    modes = dict((n, stat.S_IMODE((out / n).stat().st_mode)) for n in OUT_FILES)
    assert modes == {"cert.pem": 0o604, "chain.pem": 0o640, "fullchain.pem": 0o640}
    assert_verifies(certs / "ec1new" / "root.pem", out)


def test_owner_and_group_apply_to_new_files_and_existing_keep_theirs(run, served, certs,
                                                                      tmp_path):
    """Existing files keep their owner when that is root or --owner (issue 19: never another
    user's, see the next test)."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    import grp
    import pwd
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    out = tmp_path / "out"
    out.mkdir()
    (out / "cert.pem").write_bytes((certs / "ec1" / "cert.pem").read_bytes())
    os.chown(str(out / "cert.pem"), 0, 0)
    (out / "fullchain.pem").write_bytes((certs / "ec1" / "fullchain.pem").read_bytes())
    os.chown(str(out / "fullchain.pem"), nobody, 1)
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--owner", "nobody",
                  "--group", "nogroup")
    assert result.rc == 0, result.err
    assert files_ders(out) == expected(certs, "ec1new")
    assert_verifies(certs / "ec1new" / "root.pem", out)
    owners = dict((n, ((out / n).stat().st_uid, (out / n).stat().st_gid)) for n in OUT_FILES)
    assert owners == {"cert.pem": (0, 0), "chain.pem": (nobody, nogroup),
                      "fullchain.pem": (nobody, 1)}


@pytest.mark.parametrize("name", ["fullchain.pem", "privkey.pem"])
def test_an_existing_file_of_another_user_is_refused(run, served, certs, tmp_path, name):
    """A file that belongs to neither root nor --owner (here daemon, uid 1) is not
    rewritten for that user: refused before connecting, the fix named."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes((certs / "ec1" / name.replace("privkey", "key")).read_bytes())
    os.chown(str(out / name), 1, 1)
    (out / name).chmod(0o600)
    server = served("ec1new")
    result = grab(run, server, certs / "ec1", "--out-dir", out, "--privkey",
                  "--key-path", certs / "ec1" / "key.pem")
    line = assert_refused(result, 6)
    assert line == "certgrab: cannot write %s: it belongs to daemon; an existing file keeps " \
        "its owner only when that is root, the user certgrab runs as or --owner" % (out / name)
    assert "hint: chown root %s, or remove it" % (out / name) in result.err
    assert server.connections == 0 and entries(out) == [name]
    assert (out / name).stat().st_uid == 1


def test_unknown_owner_is_a_usage_error(run, served, certs, tmp_path):
    server = served("ec1")
    result = grab(run, server, certs / "ec1", "--out-dir", tmp_path / "o", "--owner",
                  "no-such-user-certgrab")
    assert result.rc == 2 and server.connections == 0


@pytest.mark.parametrize("changed", [False, True], ids=["up-to-date", "renewal"])
def test_stale_temp_files_are_removed_by_the_next_run(run, served, certs, tmp_path, changed):
    out = tmp_path / "out"
    assert grab(run, served("ec1"), certs / "ec1", "--out-dir", out).rc == 0
    stale = [".cert.pem.certgrab-tmp-0123456789ab", ".fullchain.pem.certgrab-tmp-ffffffffffff"]
    for name in stale:
        (out / name).write_text("-----BEGIN CERTIFICATE-----\ntorn")
    (out / "unrelated.txt").write_text("mine")
    result = grab(run, served("ec1new" if changed else "ec1"), certs / "ec1", "--out-dir", out)
    assert result.rc == 0, result.err
    assert entries(out) == OUT_FILES + ["unrelated.txt"], \
        "stale temp files go, files certgrab does not own stay"
    assert_verifies(certs / "ec1" / "root.pem", out)


def test_force_does_not_override_validity(run, served, certs, installed_ec1):
    out, log = installed_ec1
    server = served("expired")
    before = snapshot(out)
    result = run(server.address, "-n", NAME, "--insecure", "--force", "--out-dir", out,
                 "--key-path", certs / "expired" / "key.pem", "--deploy-hook",
                 hook_command(log))
    assert_refused(result, 6)
    assert snapshot(out) == before and len(hook_runs(log)) == 1


def test_an_existing_writable_file_loses_group_and_world_write(run, served, certs, tmp_path):
    out = tmp_path / "out"
    assert grab(run, served("ec1"), certs / "ec1", "--out-dir", out).rc == 0
    (out / "cert.pem").chmod(0o666)
    (out / "fullchain.pem").chmod(0o660)
    assert grab(run, served("ec1new"), certs / "ec1", "--out-dir", out).rc == 0
    assert stat.S_IMODE((out / "cert.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "fullchain.pem").stat().st_mode) == 0o640
    assert_verifies(certs / "ec1new" / "root.pem", out)


def test_mode_option_never_publishes_the_combined_key(run, served, certs, tmp_path):
    """--mode 0644 is for certificate files; the combined file holds the private key."""
    combined = tmp_path / "haproxy.pem"
    result = grab(run, served("ec1"), certs / "ec1", "--combined-path", combined, "--mode",
                  "0644", "--key-path", certs / "ec1" / "key.pem")
    assert result.rc == 0, result.err
    assert stat.S_IMODE(combined.stat().st_mode) & 0o037 == 0, oct(combined.stat().st_mode)
    assert_fullchain_verifies(certs / "ec1" / "root.pem", combined)


def test_symlinked_output_keeps_the_link_and_replaces_its_target(run, served, certs,
                                                                 tmp_path):
    """certbot's live/ directory holds symlinks into archive/: the link stays a link."""
    live, archive, env_file = tmp_path / "live", tmp_path / "archive", tmp_path / "env"
    live.mkdir()
    archive.mkdir()
    (archive / "fullchain1.pem").write_bytes((certs / "ec1" / "fullchain.pem").read_bytes())
    (live / "fullchain.pem").symlink_to("../archive/fullchain1.pem")
    result = grab(run, served("ec1new"), certs / "ec1", "--fullchain-path", live / "fullchain.pem",
                  "--key-path", certs / "ec1" / "key.pem",
                  "--deploy-hook", "env -0 > %s" % env_file)
    assert result.rc == 0, result.err
    assert os.readlink(str(live / "fullchain.pem")) == "../archive/fullchain1.pem"
    assert read_ders(archive / "fullchain1.pem") == read_ders(certs / "ec1new" / "fullchain.pem")
    assert_fullchain_verifies(certs / "ec1new" / "root.pem", archive / "fullchain1.pem")
    assert entries(archive) == ["fullchain1.pem"]
    env = dict(item.split("=", 1) for item in env_file.read_bytes().decode().split("\0")
               if item)
    assert env["RENEWED_LINEAGE"] == str(live.resolve()), \
        "RENEWED_LINEAGE is the directory the user named (certbot's live/), not archive/"


def test_a_shorter_renewal_with_later_notbefore_is_installed(run, served, certs, lineage):
    """90-day -> 6-day: ec1short is issued after ec1new but expires long before it.
    Newer means a later notBefore, not a later notAfter."""
    out, log = lineage
    assert install(run, certs, served("ec1new"), out, log).rc == 0
    result = install(run, certs, served("ec1short"), out, log)
    assert result.rc == 0, result.err
    assert_holds(out, certs, "ec1short")
    assert len(hook_runs(log)) == 2
    back = refused_run(run, certs, out, log, served("ec1new"),
                       "--key-path", certs / "ec1" / "key.pem")
    assert_refused(back, 6)


def test_a_leaf_not_yet_valid_is_refused_with_a_clock_hint(run, served, certs, installed_ec1,
                                                           certgrab, monkeypatch):
    """This machine's clock says 2024-06: ec1short (issued 2025-06) is not valid yet.
    --insecure, so that only certgrab's own date check can refuse it."""
    import time
    import types
    out, log = installed_ec1
    fake = types.SimpleNamespace(time=lambda: 1717200000.0, monotonic=time.monotonic,
                                 sleep=time.sleep, gmtime=time.gmtime, strftime=time.strftime)
    monkeypatch.setattr(certgrab, "time", fake)
    server = served("ec1short")
    before = snapshot(out)
    result = run(server.address, "-n", NAME, "--insecure", "--out-dir", out,
                 "--key-path", certs / "ec1" / "key.pem", "--deploy-hook", hook_command(log))
    line = assert_refused(result, 6)
    assert "2025-06-01" in line, line
    assert re.search(r"hint:.*clock", result.err), result.err
    assert snapshot(out) == before and len(hook_runs(log)) == 1


def test_an_unverified_chain_is_not_installed(run, served, certs, installed_ec1):
    """`unknown` chains to a root that is not in --cafile: exit 4, nothing touched."""
    out, log = installed_ec1
    result = refused_run(run, certs, out, log, served("unknown"),
                         "--key-path", certs / "unknown" / "key.pem")
    assert_refused(result, 4)


def test_all_sources_down_touches_nothing(run, certs, installed_ec1):
    out, log = installed_ec1
    before = snapshot(out)
    with closed_port() as down:
        result = run("127.0.0.1:%d" % down, "-n", NAME, "--cafile", certs / "ec1" / "root.pem",
                     "--out-dir", out, "--deploy-hook", hook_command(log), "--timeout", "3")
    assert result.rc == 3, result.err
    assert snapshot(out) == before and len(hook_runs(log)) == 1


@pytest.mark.parametrize("option", ["--fullchain-path", "--cert-path", "--out-dir"])
def test_an_output_naming_the_key_file_is_a_usage_error(run, served, certs, tmp_path, option):
    """A typo must not overwrite the private key with certificates."""
    key = tmp_path / ("cert.pem" if option == "--out-dir" else "example.key")
    key.write_bytes((certs / "ec1" / "key.pem").read_bytes())
    server = served("ec1")
    target = tmp_path if option == "--out-dir" else key
    result = grab(run, server, certs / "ec1", option, target, "--key-path", key)
    assert result.rc == 2, result.err
    assert key.read_bytes() == (certs / "ec1" / "key.pem").read_bytes(), "the key is intact"
    assert server.connections == 0
