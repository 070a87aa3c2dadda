"""The command line itself: --version, --help, usage errors (exit 2), main's contract."""

import re
import subprocess
import sys

import pytest

from helpers import CERTGRAB, assert_one_error

OPTIONS = ["--servername", "-n", "--port", "-p", "--timeout", "-4", "-6", "--ipv4", "--ipv6",
           "--cafile",
           "--capath", "--insecure", "--out-dir", "--cert-path", "--chain-path",
           "--fullchain-path", "--verified-chain", "--quiet", "-q", "--verbose", "-v",
           "--version"]
EXIT_CODES = {
    "0": r"success|ok",
    "2": r"usage",
    "3": r"connect|fetch|tls|timed? ?out",
    "4": r"verif",
    "5": r"writ",
}


def help_text(run):
    result = run("--help")
    assert result.rc == 0, result.err
    return result.out


def test_version(run, certgrab):
    result = run("--version")
    assert result.rc == 0
    assert certgrab.__version__ in result.out + result.err
    assert re.match(r"\d+\.\d+", certgrab.__version__)


def test_help_lists_every_option(run):
    text = help_text(run)
    for option in OPTIONS:
        assert re.search(r"(^|[\s,\[])%s\b" % re.escape(option), text), option


def test_help_has_the_exit_code_table(run):
    text = help_text(run)
    assert re.search(r"exit (codes?|status)", text, re.I), text
    for code, meaning in EXIT_CODES.items():
        line = re.search(r"^\s*%s\b.*$" % code, text, re.M)
        assert line, "exit code %s is not listed in --help" % code
        assert re.search(meaning, line.group(0), re.I), line.group(0)


def test_help_has_examples(run):
    text = help_text(run)
    assert re.search(r"example", text, re.I)
    assert "-n" in text and "--out-dir" in text


@pytest.mark.parametrize("argv", [
    [],                                            # no SOURCE
    ["--no-such-option", "127.0.0.1"],
    ["127.0.0.1", "--timeout", "abc"],
    ["127.0.0.1", "--timeout", "0"],
    ["127.0.0.1", "--timeout", "-5"],
    ["127.0.0.1", "-4", "-6"],
    ["127.0.0.1", "--ipv4", "--ipv6"],
    ["127.0.0.1", "-q", "-v"],
    ["127.0.0.1", "-p", "https"],
    ["127.0.0.1", "-n", "bad name with spaces"],
    ["127.0.0.1", "-n", ""],
    ["127.0.0.1", "--out-dir"],                    # option without its value
], ids=lambda argv: " ".join(argv) or "no-arguments")
def test_usage_errors_exit_2(run, argv):
    result = run(*argv)
    assert result.rc == 2, result.err
    assert result.out == ""
    assert_one_error(result, allow_usage=True)
    assert result.elapsed < 1.0


def test_insecure_with_cafile_is_a_contradiction(run, tmp_path):
    root = tmp_path / "root.pem"
    root.write_text("")
    result = run("127.0.0.1", "--insecure", "--cafile", root)
    assert result.rc == 2, result.err
    assert_one_error(result, allow_usage=True)


def test_same_file_twice_is_a_usage_error(run, tmp_path):
    target = tmp_path / "x.pem"
    result = run("127.0.0.1", "--insecure", "--cert-path", target, "--fullchain-path", target)
    assert result.rc == 2, result.err
    assert not target.exists()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["--bogus"],
                                  ["127.0.0.1:0"]])
def test_main_returns_instead_of_exiting(certgrab, capsys, argv):
    """main(argv) -> int, so callers (and cron wrappers in Python) never see SystemExit."""
    try:
        rc = certgrab.main(argv)
    except SystemExit as e:  # what this test is about
        pytest.fail("main(%r) raised SystemExit(%r) instead of returning" % (argv, e.code))
    capsys.readouterr()
    assert isinstance(rc, int)
    assert rc == (0 if argv in (["--help"], ["--version"]) else 2)


def test_script_exit_codes(tmp_path):
    """As a program: --version exits 0; a usage error exits 2 with no traceback."""
    proc = subprocess.run([sys.executable, CERTGRAB, "--version"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0
    proc = subprocess.run([sys.executable, CERTGRAB, "[::1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.startswith(b"certgrab: ") or b"\ncertgrab: " in proc.stderr


def test_script_is_quiet_about_broken_pipe(certs, served):
    """`certgrab ... | head -1` must not end in a traceback when the reader goes away."""
    server = served("rsa2")
    proc = subprocess.Popen(
        [sys.executable, CERTGRAB, server.address, "-n", "www.example.test",
         "--cafile", str(certs / "rsa2" / "root.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads: the write fails with EPIPE
    err = proc.stderr.read()
    proc.wait(60)
    proc.stderr.close()
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode != 0


def test_help_fills_in_the_defaults(run, certgrab):
    """The help texts name constants; --help shows their values."""
    text = " ".join(help_text(run).split())         # argparse wraps lines where it likes
    assert "%(" not in text
    for default in ("(default %d)" % certgrab.DEFAULT_PORT,
                    "(default %g)" % certgrab.DEFAULT_TIMEOUT,
                    "(default %d)" % certgrab.DEFAULT_PARALLEL,
                    "(default %g%%)" % (certgrab.WARN_SHARE * 100)):
        assert default in text, default


# The forms of the command line users rely on (argparse, issue 10) ----------------------------

def parsed(certgrab, *argv):
    """The Settings certgrab would run with, for argv (no network: validation only)."""
    parser = certgrab.build_parser()
    args, sources = certgrab.parse_command_line(parser, list(argv))
    return certgrab.validate_settings(args, sources, certgrab.Reporter())


def test_grouped_short_options_and_attached_values(certgrab):
    settings = parsed(certgrab, "-4q", "-nwww.example.test", "127.0.0.1")
    assert settings.family == __import__("socket").AF_INET and settings.quiet
    assert settings.targets[0].servername == "www.example.test"


def test_long_option_with_equals_and_the_last_value_wins(certgrab):
    settings = parsed(certgrab, "--timeout=3", "127.0.0.1", "--timeout", "4.5",
                      "--servername=a.example.test", "-n", "b.example.test")
    assert settings.timeout == 4.5
    assert settings.targets[0].servername == "b.example.test"


def test_sources_anywhere_and_every_word_after_double_dash(certgrab):
    settings = parsed(certgrab, "10.0.0.1", "-n", "x.example.test", "10.0.0.2", "--",
                      "10.0.0.3")
    assert [t.source for t in settings.targets] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_grouped_switches_that_exclude_each_other_are_a_usage_error(run):
    result = run("-qv", "127.0.0.1")
    assert result.rc == 2
    assert "--quiet and --verbose exclude each other" in result.err


def test_an_abbreviated_long_option_is_refused_with_its_full_name(run):
    result = run("--serv", "www.example.test", "127.0.0.1")
    assert result.rc == 2, result.err
    assert_one_error(result)
    assert "certgrab: unknown option --serv; long options are spelt in full: --servername" \
        in result.err


def test_usage_error_under_check_is_unknown_with_one_status_line(run):
    result = run("--check", "127.0.0.1", "--timeout", "soon")
    assert result.rc == 3
    assert result.out == "CERTGRAB UNKNOWN - --timeout must be a number of seconds above 0\n"
    assert "usage:" not in result.err and "Traceback" not in result.err


def test_settings_cannot_be_changed_after_validation(certgrab):
    """Every step sees the command line as validated: Settings refuse assignment."""
    settings = parsed(certgrab, "127.0.0.1", "--timeout", "3")
    with pytest.raises(AttributeError):
        settings.timeout = 99
    with pytest.raises(AttributeError):
        del settings.timeout
    assert settings.timeout == 3.0
