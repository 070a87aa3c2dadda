"""The command line itself: --version, --help, usage errors (exit 2), main's contract, and
every exit code the docstring documents, each from a real run."""

import re
import shlex
import subprocess
import sys
import types

import pytest

from helpers import (CERTGRAB, FETCH, HOOK_PENDING, INTERNAL, OK, REFUSED, USAGE, VERIFY, WRITE,
                     assert_one_error, docstring_exit_codes, grab)
from make_certs import NAME
from servers import closed_port


def help_text(run):
    result = run("--help")
    assert result.rc == 0, result.err
    return result.out


def option_spellings(certgrab):
    """Every flag of certgrab's option table, short and long."""
    return sorted(flag for _, options in certgrab.OPTIONS for flags, _, _ in options
                  for flag in flags)


def help_spellings(text):
    """The flags --help lists as options: the left column of its option lines
    ("  -n NAME, --servername NAME"), not the flags its help texts mention."""
    found = []
    for line in text.splitlines():
        column = re.match(r"^  (-\S.*?)(?:  |$)", line)
        if column:
            found += [item.split()[0] for item in column.group(1).split(", ")]
    return sorted(found)


def parsed(certgrab, *argv):
    """The Settings certgrab would run with, for argv (no network: validation only)."""
    parser = certgrab.build_parser()
    args, sources = certgrab.parse_command_line(parser, list(argv))
    return certgrab.validate_settings(args, sources, certgrab.Reporter())


def examples(certgrab):
    """The command lines of the EXAMPLES block of --help (its first line is the title)."""
    lines = certgrab.EXAMPLES.splitlines()
    assert lines[0] == "examples:", lines[0]
    return [line.strip() for line in lines[1:]]


def test_version(run, certgrab):
    result = run("--version")
    assert result.rc == 0
    assert certgrab.__version__ in result.out + result.err
    assert re.match(r"\d+\.\d+", certgrab.__version__)


def test_help_lists_every_option(run, certgrab):
    """Every spelling of every option (55 and more), short and long, has its line in --help,
    and --help lists no option the table lacks."""
    spellings = option_spellings(certgrab)
    assert len(spellings) > 50 and "--servername" in spellings and "-n" in spellings
    assert help_spellings(help_text(run)) == spellings


def test_help_spellings_finds_a_missing_and_an_extra_option():
    """The check above reads the option column, not the help texts that name options."""
    text = ("  -n NAME, --servername NAME\n                        SNI, see --port\n"
            "  --port PORT  port (default 443); also -p\n  -4, --ipv4            IPv4 only\n")
    assert help_spellings(text) == ["--ipv4", "--port", "--servername", "-4", "-n"]


def test_help_has_examples_that_certgrab_parses(run, certgrab):
    """Each line of the EXAMPLES block is in --help as written, and is a command line that
    certgrab's own parser accepts (the shell's "> FILE" aside): an option renamed without
    its example fails here. A --config example is parsed; its file is not read."""
    text, lines = help_text(run), examples(certgrab)
    assert len(lines) >= 3, lines
    assert "\nexamples:\n" in text
    for line in lines:
        assert "\n  %s\n" % line in text, line
        words = shlex.split(line)
        assert words[0] == "certgrab.py", line
        argv = words[1:words.index(">")] if ">" in words else words[1:]
        try:
            args, sources = certgrab.parse_command_line(certgrab.build_parser(), argv)
            if args.config is None:
                parsed(certgrab, *argv)
        except certgrab.UsageError as e:
            pytest.fail("the example %r is not a valid command line: %s" % (line, e))
        if args.config is not None:
            assert sources == [] and args.config == argv[argv.index("--config") + 1], line


# Every exit code the docstring documents, each from a real run -------------------------------

def succeeds(fx):
    """The chain verified and installed (quietly: nothing on stderr)."""
    return grab(fx.run, fx.served("ec1"), fx.certs / "ec1", "--out-dir", fx.tmp_path / "out",
                "-q")


def meets_a_bug(fx):
    """A bug outside any one source: injected into the install step (the only mock: a
    real bug cannot be ordered)."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")
    fx.monkeypatch.setattr(fx.certgrab, "install_chain", broken)
    return grab(fx.run, fx.served("ec1"), fx.certs / "ec1", "--out-dir", fx.tmp_path / "out")


def is_misused(fx):
    return fx.run("127.0.0.1", "--timeout", "soon")


def cannot_fetch(fx):
    """Nothing listens on the port."""
    with closed_port() as port:
        return fx.run("127.0.0.1:%d" % port, "-n", NAME, "--cafile",
                      fx.certs / "ec1" / "root.pem", "--timeout", "2")


def cannot_verify(fx):
    """The ec1 chain against the RSA root: unknown issuer."""
    return grab(fx.run, fx.served("ec1"), fx.certs / "rsa1")


def cannot_write(fx):
    """--out-dir is a regular file."""
    blocker = fx.tmp_path / "afile"
    blocker.write_text("keep me\n")
    return grab(fx.run, fx.served("ec1"), fx.certs / "ec1", "--out-dir", blocker)


def is_refused(fx):
    """The leaf does not match --key-path (a key mismatch)."""
    return grab(fx.run, fx.served("ec1"), fx.certs / "ec1", "--out-dir", fx.tmp_path / "out",
                "--key-path", fx.certs / "rsa1" / "key.pem")


def fails_its_hook(fx):
    """The files are installed, the deploy hook exits 1 (-q: errors only)."""
    return grab(fx.run, fx.served("ec1"), fx.certs / "ec1", "--out-dir", fx.tmp_path / "out",
                "--deploy-hook", "exit 1", "-q")


EXIT_CODES = {  # code: (what --help says of it, a run that ends with it)
    OK: (r"success", succeeds),
    INTERNAL: (r"internal error|bug", meets_a_bug),
    USAGE: (r"usage", is_misused),
    FETCH: (r"cannot fetch|connect|timed? ?out", cannot_fetch),
    VERIFY: (r"verif", cannot_verify),
    WRITE: (r"cannot write", cannot_write),
    REFUSED: (r"refused by a safety check", is_refused),
    HOOK_PENDING: (r"deploy hook pending", fails_its_hook),
}


@pytest.fixture
def fx(run, served, certs, tmp_path, monkeypatch, certgrab):
    """The fixtures the runs of EXIT_CODES use."""
    return types.SimpleNamespace(run=run, served=served, certs=certs, tmp_path=tmp_path,
                                 monkeypatch=monkeypatch, certgrab=certgrab)


def test_the_table_has_every_exit_code_the_docstring_documents(certgrab):
    assert sorted(EXIT_CODES) == sorted(int(code) for code in docstring_exit_codes(certgrab))


@pytest.mark.parametrize("code", sorted(EXIT_CODES))
def test_help_says_what_each_exit_code_means(run, code):
    text = help_text(run)
    assert "\nexit codes:\n" in text, text
    line = re.search(r"^  %d  (.*)$" % code, text.split("\nexit codes:\n", 1)[1], re.M)
    assert line, "exit code %d is not listed in --help" % code
    assert re.search(EXIT_CODES[code][0], line.group(1), re.I), line.group(0)


@pytest.mark.parametrize("code", sorted(EXIT_CODES))
def test_each_exit_code_comes_from_a_real_run(fx, code):
    """The run of the table ends with its code; a failure says one line (no traceback)."""
    result = EXIT_CODES[code][1](fx)
    assert result.rc == code, result.err
    if code == OK:
        assert result.err == ""
    else:
        assert_one_error(result, allow_usage=code == USAGE)


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

def test_grouped_short_options_and_attached_values(certgrab):
    argv = ["-4q", "-nwww.example.test", "127.0.0.1"]
    settings = parsed(certgrab, *argv)
    assert settings.family == __import__("socket").AF_INET
    assert certgrab.parse_command_line(certgrab.build_parser(), argv)[0].quiet
    assert settings.sources[0].servername == "www.example.test"


def test_long_option_with_equals_and_the_last_value_wins(certgrab):
    settings = parsed(certgrab, "--timeout=3", "127.0.0.1", "--timeout", "4.5",
                      "--servername=a.example.test", "-n", "b.example.test")
    assert settings.timeout == 4.5
    assert settings.sources[0].servername == "b.example.test"


def test_sources_anywhere_and_every_word_after_double_dash(certgrab):
    settings = parsed(certgrab, "10.0.0.1", "-n", "x.example.test", "10.0.0.2", "--",
                      "10.0.0.3")
    assert [s.text for s in settings.sources] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


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
