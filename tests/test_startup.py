"""What a run imports, and what certgrab.py is made of.

A plain fetch runs on hosts where every import is a cost or a hole (python3-minimal has
no json or ctypes): it must import nothing it does not use. And certgrab.py is read by a
sysadmin before it runs as root: every line of it is ordinary Python that editors, linters
and coverage see, with nothing compiled from strings at run time.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from helpers import CERTGRAB, ROOT, assert_verifies, grab_args
from make_certs import NAME

# Run certgrab.main in a fresh interpreter; print the exit code and the modules imported, as
# a Python literal: importing json for it would spoil the list.
PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import certgrab
rc = certgrab.main(sys.argv[2:])
sys.stdout.flush()
sys.stderr.write("PROBE %r\n" % {"rc": rc, "file": certgrab.__file__,
                                 "modules": sorted(sys.modules)})
"""

# Modules a plain fetch has no use for: absent on minimal hosts (json, ctypes), or heavy
# and only needed by the deploy hook (subprocess) or nobody (tempfile). encodings.idna
# (with stringprep and unicodedata) is what Python imports to encode a str host name.
NOT_FOR_A_PLAIN_FETCH = ["json", "ctypes", "subprocess", "tempfile", "encodings.idna",
                         "stringprep", "unicodedata"]


def probe(*argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, ROOT] + [str(a) for a in argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("PROBE ")]
    assert lines, "the probe did not finish:\n%s" % proc.stderr
    return ast.literal_eval(lines[-1][len("PROBE "):]), proc


def test_a_plain_fetch_imports_nothing_it_does_not_use(served, certs):
    report, proc = probe(*grab_args(served("ec1"), certs / "ec1"))
    assert report["rc"] == 0, proc.stderr
    assert os.path.samefile(report["file"], CERTGRAB)
    assert "BEGIN CERTIFICATE" in proc.stdout
    extra = [m for m in NOT_FOR_A_PLAIN_FETCH if m in report["modules"]]
    assert extra == [], "a plain fetch imported %s" % ", ".join(extra)


def test_a_name_source_resolves_without_the_idna_codec(served, certs):
    """A DNS name SOURCE is looked up as ASCII bytes: still no idna import."""
    server = served("ec1")
    report, proc = probe("localhost:%d" % server.port, "-4", "-n", NAME, "--cafile",
                         certs / "ec1" / "root.pem")
    assert report["rc"] == 0, proc.stderr
    assert "encodings.idna" not in report["modules"]


def test_an_install_imports_subprocess_only_for_its_hook(served, certs, tmp_path):
    server = served("ec1")
    report, proc = probe(*grab_args(server, certs / "ec1", "--out-dir", tmp_path / "plain"))
    assert report["rc"] == 0, proc.stderr
    assert_verifies(certs / "ec1" / "root.pem", tmp_path / "plain")
    assert "subprocess" not in report["modules"]
    report, proc = probe(*grab_args(server, certs / "ec1", "--out-dir", tmp_path / "hooked",
                                    "--deploy-hook", "true"))
    assert report["rc"] == 0, proc.stderr
    assert "subprocess" in report["modules"]


def source_text():
    with open(CERTGRAB, encoding="utf-8") as handle:
        return handle.read()


def test_no_code_is_compiled_from_strings():
    """Nothing in certgrab.py compiles or executes text, loads sections, or attaches
    methods at run time (issue 10's acceptance grep)."""
    found = [line for line in source_text().splitlines()
             if re.search(r"exec\(|compile\(|load_section|_SECTION|setattr\(Certificate", line)]
    assert found == []


def test_no_class_does_work_in_getattr():
    """Fields are read by the parser, not on first attribute access."""
    tree = ast.parse(source_text())
    names = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert "__getattr__" not in names


def test_pyflakes_finds_nothing():
    """make lint runs pyflakes too; this keeps `make test` honest on its own."""
    pyflakes = pytest.importorskip("pyflakes.api")
    from pyflakes.reporter import Reporter
    import io
    out, err = io.StringIO(), io.StringIO()
    count = pyflakes.check(source_text(), CERTGRAB, Reporter(out, err))
    assert count == 0, out.getvalue() + err.getvalue()
