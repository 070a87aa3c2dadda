"""--config: one section per certificate, and --syslog, the lines cron keeps.

What a fleet relies on:

  * a config with three sections (direct TLS to a loopback server, STARTTLS smtp against the
    real postfix of daemons_mail.py, one dead source) installs the first two, reports the
    third by name and exits with the failure's code; a rerun changes nothing;
  * a mistake in the file (unknown key, bad value, a command-line-only option, options that
    exclude each other, no source) is exit 2 with one line naming the file, the section and
    the key, before any connection is made;
  * options on the command line replace the file's keys in every section (--dry-run writes
    nothing anywhere); --section runs one section; sections with different sources run at
    once;
  * --config (and --syslog's import) work on Debian 12 and 11 python3-minimal, in the roots
    of `make roots`;
  * --syslog lines reach the syslog socket: certgrab runs in a mount namespace whose /dev/log
    is a stdlib UNIX datagram socket of the test (stdlib syslog always writes to /dev/log).
"""

import hashlib
import socket

import pytest

from helpers import (FETCH, USAGE, assert_one_error, assert_verifies, error_lines, expected,
                     files_ders, minimal_host, received, run_with_dev_log, snapshot)
from make_certs import NAME
from servers import SilentServer, free_ports


def write_config(path, text):
    path.write_text(text)
    return path


class Listener(object):
    """A TCP port that accepts nothing on its own: connections_made() says whether anything
    connected (the test of 'before any network traffic')."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections_made(self):
        try:
            self.sock.accept()[0].close()
            return True
        except BlockingIOError:
            return False


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.sock.close()


# Three sections: direct TLS, STARTTLS against the real postfix, a dead source -------------

def three_sections(tmp_path, certs, server, postfix):
    dead_port = free_ports(1)[0]                 # a port nobody listens on
    return write_config(tmp_path / "certgrab.conf", """\
[DEFAULT]
servername = {name}
timeout = 5

[web]
source = {web}
cafile = {certs}/ec1/root.pem
key-path = {certs}/ec1/key.pem
out-dir = {out}/web

[mail]
source = 127.0.0.1:{smtp}
starttls = smtp
cafile = {certs}/rsa2/root.pem
key-path = {certs}/rsa2/key.pem
out-dir = {out}/mail

[dead]
source = 127.0.0.1:{dead}
cafile = {certs}/ec1/root.pem
out-dir = {out}/dead
""".format(name=NAME, web=server.address, smtp=postfix.ports["smtp"], dead=dead_port,
           certs=certs, out=tmp_path / "out"))


def test_three_sections_install_two_and_name_the_failed_one(run, certs, served, postfix,
                                                            tmp_path):
    config = three_sections(tmp_path, certs, served("ec1"), postfix)
    result = run("--config", config)
    assert result.rc == FETCH, result.err
    out = tmp_path / "out"
    assert files_ders(out / "web") == expected(certs, "ec1")
    assert files_ders(out / "mail") == expected(certs, "rsa2")
    assert_verifies(certs / "ec1" / "root.pem", out / "web")
    assert_verifies(certs / "rsa2" / "root.pem", out / "mail")
    assert not (out / "dead").exists()
    assert "certgrab: [web] installed the chain from" in result.err
    assert "certgrab: [mail] installed the chain from" in result.err
    assert [line for line in error_lines(result.err) if line.startswith("certgrab: [dead] ")]
    assert error_lines(result.err)[-1] == "certgrab: 1 of 3 sections failed: dead (exit 3)"

    before = dict((name, snapshot(out / name)) for name in ("web", "mail"))
    again = run("--config", config)
    assert again.rc == FETCH, again.err
    assert dict((name, snapshot(out / name)) for name in ("web", "mail")) == before
    assert "installed" not in again.err
    assert error_lines(again.err)[-1] == "certgrab: 1 of 3 sections failed: dead (exit 3)"


# Mistakes in the file: exit 2, file, section and key named, nothing dialled ----------------

MISTAKES = [  # (the section's extra lines, what the error line must say after the key)
    ("bogus = 1", "key bogus: no such option"),
    ("timeout = soon", "key timeout: --timeout must be a number of seconds above 0"),
    ("insecure = maybe", "key insecure: takes yes or no, not 'maybe'"),
    ("config = other.conf", "key config: an option of the command line only"),
    ("syslog = yes", "key syslog: an option of the command line only"),
    ("insecure = yes\ncafile = /etc/hosts", "key insecure: --insecure and --cafile exclude "
                                            "each other"),
    ("starttls = smtpx", "key starttls: --starttls smtpx: unknown protocol"),
    ("key-path = /nonexistent/key.pem", "key key-path: cannot read --key-path"),
    ("cafile = /nonexistent/ca.pem", "key cafile: cannot load --cafile /nonexistent/ca.pem"),
]


@pytest.mark.parametrize("lines,message", MISTAKES, ids=[m[0].split()[0] for m in MISTAKES])
def test_mistakes_name_file_section_and_key_before_any_connection(run, tmp_path, listener,
                                                                  lines, message):
    config = write_config(tmp_path / "fleet.conf", """\
[good]
source = 127.0.0.1:{port}
servername = {name}

[broken]
source = 127.0.0.1:{port}
servername = {name}
{lines}
""".format(port=listener.port, name=NAME, lines=lines))
    result = run("--config", config)
    assert result.rc == USAGE
    assert_one_error(result)
    line = error_lines(result.err)[0]
    assert line.startswith("certgrab: %s, section [broken], %s" % (config, message)), line
    assert not listener.connections_made()


def test_a_mistake_in_default_says_so(run, tmp_path):
    config = write_config(tmp_path / "c.conf", "[DEFAULT]\ntimout = 3\n[web]\nsource = a\n")
    result = run("--config", config)
    assert result.rc == USAGE
    assert error_lines(result.err)[0].startswith(
        "certgrab: %s, section [web] (from [DEFAULT]), key timout: no such option" % config)


def test_a_section_without_source_names_the_key(run, tmp_path):
    config = write_config(tmp_path / "c.conf", "[web]\nservername = %s\n" % NAME)
    result = run("--config", config)
    assert result.rc == USAGE
    assert error_lines(result.err) == [
        "certgrab: %s, section [web], key source: missing; list the section's SOURCEs there"
        % config]


def test_file_level_mistakes(run, tmp_path):
    config = write_config(tmp_path / "c.conf", "[web]\nsource = a\nsource = b\n")
    result = run("--config", config)
    assert result.rc == USAGE
    assert "certgrab: --config %s: " % config in result.err
    assert "[line 3]" in result.err and "'source'" in result.err
    missing = run("--config", tmp_path / "none.conf")
    assert missing.rc == USAGE and "cannot read --config" in missing.err
    empty = run("--config", write_config(tmp_path / "e.conf", "# nothing\n"))
    assert empty.rc == USAGE and "no sections" in empty.err
    assert run("--section", "web", "127.0.0.1").rc == USAGE
    sources = run("--config", config, "127.0.0.1")
    assert sources.rc == USAGE and "SOURCEs come from each section's source key" in sources.err


# The command line over the file; --section; sections at once ------------------------------

def web_config(tmp_path, certs, server, names=("one", "two")):
    return write_config(tmp_path / "c.conf", "[DEFAULT]\nservername = %s\nsource = %s\n"
                        "cafile = %s\n" % (NAME, server.address, certs / "ec1" / "root.pem") +
                        "".join("[%s]\nout-dir = %s\n" % (name, tmp_path / name)
                                for name in names))


def test_dry_run_on_the_command_line_covers_every_section(run, certs, served, tmp_path):
    server = served("ec1")
    config = web_config(tmp_path, certs, server)
    with open(str(config), "a") as f:               # a section that only reports
        f.write("[monitor]\nout-dir =\ncheck = yes\n")
    result = run("--config", config, "--dry-run")
    assert result.rc == 0, result.err
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()
    assert "certgrab: [one] dry run: would write" in result.err
    assert "certgrab: [two] dry run: would write" in result.err
    assert result.out.startswith("CERTGRAB OK")
    assert result.err.splitlines()[-1] == "certgrab: 3 sections done"


def test_section_runs_one_and_quiet_overrides(run, certs, served, tmp_path):
    config = web_config(tmp_path, certs, served("ec1"))
    result = run("--config", config, "--section", "two", "-q")
    assert result.rc == 0 and result.err == ""
    assert files_ders(tmp_path / "two") == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", tmp_path / "two")
    assert not (tmp_path / "one").exists()


def test_sections_with_different_sources_run_at_once(run, started, tmp_path):
    """Three sources that never answer, --timeout 1 each: at once, about 1 s, not 3."""
    silent = [started(SilentServer()) for _ in range(3)]
    config = write_config(tmp_path / "c.conf", "[DEFAULT]\nservername = %s\ntimeout = 1\n"
                          % NAME + "".join("[s%d]\nsource = %s\n" % (i, s.address)
                                           for i, s in enumerate(silent)))
    result = run("--config", config)
    assert result.rc == FETCH
    assert result.elapsed < 2.5, result.elapsed
    assert "3 of 3 sections failed: s0 (exit 3), s1 (exit 3), s2 (exit 3)" in result.err


def test_sections_sharing_a_source_wait_for_each_other(run, started, tmp_path):
    """Two sections dial one silent source, a third another: 2 s in all, not 1 or 3."""
    shared, other = started(SilentServer()), started(SilentServer())
    config = write_config(tmp_path / "c.conf", "[DEFAULT]\nservername = %s\ntimeout = 1\n"
                          "[a]\nsource = %s\n[b]\nsource = %s\n[c]\nsource = %s\n" % (
                              NAME, shared.address, shared.address, other.address))
    result = run("--config", config)
    assert result.rc == FETCH
    assert 2.0 <= result.elapsed < 2.9, result.elapsed


def test_sections_sharing_a_source_run_one_after_the_other(certgrab):
    parser = certgrab.build_parser()

    def settings(*sources):
        args, sources = certgrab.parse_command_line(parser, list(sources) + ["-n", NAME])
        return certgrab.validate_settings(args, sources, certgrab.Reporter())

    sections = [certgrab.Section(name, settings(*sources), None, None)
                for name, sources in
                [("a", ["10.0.0.1"]), ("b", ["10.0.0.2"]), ("c", ["10.0.0.3", "10.0.0.1"]),
                 ("d", ["10.0.0.4:8443"])]]
    assert sorted(certgrab.source_groups(sections)) == [[0, 2], [1], [3]]


# --syslog: lines at a real syslog socket -------------------------------------------------

def test_syslog_one_line_per_section_and_per_run(certs, served, postfix, tmp_path,
                                                 syslog_socket):
    directory, sock = syslog_socket
    server = served("ec1")
    config = three_sections(tmp_path, certs, server, postfix)
    first = run_with_dev_log(directory, "--config", config, "--syslog")
    assert first.returncode == FETCH, first.stderr
    lines = received(sock)
    assert len(lines) == 4, lines
    by_section = dict((line.split(": section ", 1)[1].split(":")[0], line) for line in lines
                      if ": section " in line)
    pid = "certgrab[%d]: " % int(lines[0].split("certgrab[")[1].split("]")[0])
    web_sha = files_ders(tmp_path / "out" / "web")["cert.pem"][0]
    assert by_section["web"].startswith("<29>")     # facility daemon (3), notice (5)
    assert by_section["dead"].startswith("<27>")    # daemon, err (3)
    assert (pid + "section web: %s from %s: installed sha256:%s from %s; exit 0; "
            % (NAME, server.address, hashlib.sha256(web_sha).hexdigest(), server.address)
            ) in by_section["web"]
    assert ": installed sha256:" in by_section["mail"] and "; exit 0; " in by_section["mail"]
    assert ": failed: 127.0.0.1:" in by_section["dead"] and "; exit 3; " in by_section["dead"]
    assert lines[-1].split(pid, 1)[1].startswith(
        "config %s: 1 of 3 sections failed: dead (exit 3); exit 3; " % config)
    assert lines[-1].endswith(" s")

    quiet = run_with_dev_log(directory, "--config", config, "--syslog", "-q")
    lines = received(sock)
    assert quiet.returncode == FETCH
    assert len(lines) == 1 and "1 of 3 sections failed: dead (exit 3); exit 3;" in lines[0]

    single = run_with_dev_log(directory, server.address, "-n", NAME, "--cafile",
                              certs / "ec1" / "root.pem", "--out-dir", tmp_path / "out" / "web",
                              "--syslog")
    lines = received(sock)
    assert single.returncode == 0, single.stderr
    assert len(lines) == 1 and "]: %s from %s: unchanged; exit 0; " % (NAME, server.address) \
        in lines[0], lines


def test_syslog_names_refusals_and_hook_failures(certs, served, tmp_path, syslog_socket):
    directory, sock = syslog_socket
    server = served("ec1")
    base = [server.address, "-n", NAME, "--cafile", certs / "ec1" / "root.pem", "--syslog",
            "--out-dir", tmp_path / "out"]
    refused = run_with_dev_log(directory, *base + ["--key-path", certs / "rsa1" / "key.pem"])
    hook = run_with_dev_log(directory, *base + ["--deploy-hook", "exit 3"])
    lines = received(sock)
    assert (refused.returncode, hook.returncode) == (6, 7)
    assert "; exit 6; " in lines[0] and ": refused: %s: " % server.address in lines[0], lines
    assert "rsa1/key.pem" in lines[0]                # the refusal's own words: which key
    assert ": hook failed: --deploy-hook failed (exit status 3)" in lines[1], lines


def test_each_section_writes_its_own_metrics(run, certs, served, tmp_path):
    config = web_config(tmp_path, certs, served("ec1"))
    config.write_text(config.read_text().replace(
        "[one]\n", "[one]\nprometheus = %s\n" % (tmp_path / "one.prom")).replace(
        "[two]\n", "[two]\nprometheus = %s\n" % (tmp_path / "two.prom")))
    result = run("--config", config)
    assert result.rc == 0, result.err
    for name in ("one", "two"):
        metrics = (tmp_path / ("%s.prom" % name)).read_text()
        assert 'certgrab_install_outcome{run="%s",outcome="installed"} 1' % name in metrics

    shared = config.read_text().replace("two.prom", "one.prom")
    config.write_text(shared)
    again = run("--config", config)
    assert again.rc == USAGE
    assert error_lines(again.err) == [
        "certgrab: %s, section [two], key prometheus: %s is also written by section [one]; "
        "give each section its own files" % (config, tmp_path / "one.prom")]


def test_two_sections_writing_one_file_is_a_mistake(run, certs, served, tmp_path, listener):
    config = write_config(tmp_path / "c.conf", "[DEFAULT]\nservername = %s\nsource = "
                          "127.0.0.1:%d\n[a]\nout-dir = %s\n[b]\nfullchain-path = %s\n" % (
                              NAME, listener.port, tmp_path / "out",
                              tmp_path / "out" / "fullchain.pem"))
    result = run("--config", config)
    assert result.rc == USAGE
    assert error_lines(result.err) == [
        "certgrab: %s, section [b], %s is also written by section [a]; give each section "
        "its own files" % (config, tmp_path / "out" / "fullchain.pem")]
    assert not listener.connections_made()


# On a bare server: Debian's python3-minimal (configparser and syslog, no json) --------------

@pytest.mark.parametrize("suite", ["bookworm", "bullseye"])
def test_config_on_python3_minimal(certs, served, suite):
    server = served("ec1")
    files = [(certs / "ec1" / name, name) for name in ("root.pem", "key.pem")]
    with minimal_host(suite, files, prefix="certgrab-config-") as host:
        inside = host.inside(host.scratch)
        (host.scratch / "c.conf").write_text(
            "[DEFAULT]\nservername = %s\ncafile = %s/root.pem\n[web]\nsource = %s\n"
            "key-path = %s/key.pem\nout-dir = %s/out\n" % (
                NAME, inside, server.address, inside, inside))
        completed = host.certgrab("--config", inside + "/c.conf", "--syslog")
        assert completed.returncode == 0, completed.stderr
        assert files_ders(host.scratch / "out") == expected(certs, "ec1")
        assert_verifies(certs / "ec1" / "root.pem", host.scratch / "out")
        assert completed.stderr.splitlines()[-1] == "certgrab: 1 section done"


def test_an_option_given_several_times_is_a_list_in_the_file(run, certs, served, tmp_path):
    """key-path = CURRENT NEXT (a key rollover): the leaf matches one of them."""
    config = write_config(tmp_path / "c.conf", "[web]\nsource = %s\nservername = %s\n"
                          "cafile = %s\nout-dir = %s\nprivkey = yes\nkey-path = %s %s\n" % (
                              served("ec1").address, NAME, certs / "ec1" / "root.pem",
                              tmp_path / "out", certs / "rsa1" / "key.pem",
                              certs / "ec1" / "key.pem"))
    assert run("--config", config).rc == 0
    assert files_ders(tmp_path / "out") == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", tmp_path / "out")
    assert (tmp_path / "out" / "privkey.pem").read_bytes() == \
        (certs / "ec1" / "key.pem").read_bytes()
    config.write_text(config.read_text().replace(" %s" % (certs / "ec1" / "key.pem"), ""))
    assert run("--config", config).rc == 6          # the rsa1 key alone: refused
