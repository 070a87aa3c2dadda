"""What a run compiles and imports: a plain fetch loads no lazy section and no extra module.

Python compiles certgrab.py anew on every run, and that compile is most of what certgrab costs
beyond the handshake itself (`make bench`). Code that a plain fetch never runs therefore sits
in lazy sections (certgrab.load_section), compiled by the runs that need them. These tests pin
that contract down: each run is a fresh interpreter, so that earlier tests cannot have loaded
anything, and reports which sections were compiled and which modules were imported.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import CERTGRAB, ROOT

NAME = "www.example.test"

# Run certgrab.main in a fresh interpreter; print the exit code, the lazy sections compiled
# (a section is loaded when its sentinel name exists) and the modules imported, as a Python
# literal: importing json for it would spoil the list.
PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import certgrab
rc = certgrab.main(sys.argv[2:])
sys.stdout.flush()
loaded = [s[1] for s in certgrab.LAZY_SECTIONS if s[1] in vars(certgrab)]
sys.stderr.write("PROBE %r\n" % {"rc": rc, "loaded": loaded, "file": certgrab.__file__,
                                 "modules": sorted(sys.modules)})
"""

# Modules a plain fetch has no use for; each costs milliseconds to import. encodings.idna
# (with stringprep and unicodedata) is what Python imports to encode a str host name.
NOT_FOR_A_PLAIN_FETCH = ["argparse", "encodings.idna", "stringprep", "unicodedata",
                         "threading", "hashlib", "subprocess", "ctypes", "tempfile", "json",
                         "locale", "gettext", "pwd", "grp"]


def probe(*argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, ROOT] + [str(a) for a in argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("PROBE ")]
    assert lines, "the probe did not finish:\n%s" % proc.stderr
    return ast.literal_eval(lines[-1][len("PROBE "):]), proc


def fetch_args(server, certs, *extra):
    return (server.address, "-n", NAME, "--cafile", certs / "ec1" / "root.pem") + extra


def test_a_plain_fetch_loads_no_lazy_section(served, certs, certgrab):
    if certgrab.chain_method() not in ("get_unverified_chain", "_sslobj.get_unverified_chain"):
        pytest.skip("Python before 3.10 loads the section that reads its chain")
    report, proc = probe(*fetch_args(served("ec1"), certs))
    assert report["rc"] == 0, proc.stderr
    assert os.path.samefile(report["file"], CERTGRAB)
    assert "BEGIN CERTIFICATE" in proc.stdout
    assert report["loaded"] == []


def test_a_plain_fetch_imports_nothing_it_does_not_use(served, certs):
    report, proc = probe(*fetch_args(served("ec1"), certs))
    assert report["rc"] == 0, proc.stderr
    extra = [m for m in NOT_FOR_A_PLAIN_FETCH if m in report["modules"]]
    assert extra == [], "a plain fetch imported %s" % ", ".join(extra)


def test_a_name_source_resolves_without_the_idna_codec(served, certs):
    """A DNS name SOURCE is looked up as ASCII bytes: still no idna import."""
    server = served("ec1")
    report, proc = probe("localhost:%d" % server.port, "-4", "-n", NAME, "--cafile",
                         certs / "ec1" / "root.pem")
    assert report["rc"] == 0, proc.stderr
    assert "encodings.idna" not in report["modules"]


@pytest.mark.parametrize("extra, section", [
    (("--out-dir", "{tmp}/out"), "install_chain"),
    (("--out-dir", "{tmp}/out"), "decode_details"),
    (("--text",), "report"),
    (("--text",), "decode_details"),
    (("-v",), "decode_details"),
    (("--help",), "help_text"),
])
def test_other_runs_load_their_own_section(served, certs, tmp_path, extra, section):
    extra = tuple(arg.replace("{tmp}", str(tmp_path)) for arg in extra)
    argv = extra if extra == ("--help",) else fetch_args(served("ec1"), certs, *extra)
    report, proc = probe(*argv)
    assert report["rc"] == 0, proc.stderr
    assert section in report["loaded"]
    assert "starttls_dialogue" not in report["loaded"]


def test_a_failed_verification_loads_only_the_failure_section(served, certs):
    """Failure hints are compiled only when a handshake fails, and still given."""
    report, proc = probe(served("ec1").address, "-n", "wrong.example.test", "--cafile",
                         certs / "ec1" / "root.pem")
    assert report["rc"] == 4, proc.stderr
    assert report["loaded"] == ["handshake_failure"]
    assert "certgrab: hint: " in proc.stderr and "Traceback" not in proc.stderr


def test_several_sources_load_the_fleet_section(served, certs):
    server = served("ec1")
    report, proc = probe(server.address, server.address, "-n", NAME, "--cafile",
                         certs / "ec1" / "root.pem")
    assert report["rc"] == 0, proc.stderr
    assert report["loaded"] == ["decode_details", "fetch_parallel"]


def test_every_lazy_section_is_listed_and_defines_its_sentinel(certgrab):
    """make lint compiles LAZY_SECTIONS; load_section loads a section once, when its
    sentinel name is missing. A section left out of the list, or whose sentinel it does not
    define, would escape lint or be compiled again on every call."""
    sections = {name: value for name, value in vars(certgrab).items()
                if name.endswith("_SECTION")}
    assert sorted(sections.values()) == sorted(certgrab.LAZY_SECTIONS)
    for name, (line, sentinel, source) in sections.items():
        defined = {}
        exec(compile(source, "%s (line %d)" % (name, line), "exec"), dict(vars(certgrab)),
             defined)
        assert sentinel in defined, "%s does not define %s" % (name, sentinel)
