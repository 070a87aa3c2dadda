"""Acceptance 3: only certgrab.py, copied into Debian 12 and Debian 11 python3-minimal roots.

Those roots are what a bare server has: `debootstrap --variant=minbase
--include=python3-minimal` gives Python 3.11 with OpenSSL 3.0 (bookworm) and Python 3.9 with
OpenSSL 1.1.1 (bullseye), without json, shutil or ctypes, and without any CA certificates.
`make roots` (tests/make_roots.sh) builds them into $CERTGRAB_ROOTS, default
/var/cache/certgrab-roots; without them, or without root for chroot, these tests skip (and a
run with CI=true fails, by the rule in conftest.py).

Each test copies certgrab.py and the test roots into a fresh directory under the root's /tmp,
serves a chain from a TLSServer on 127.0.0.1 outside, and runs
`chroot ROOT python3 /tmp/.../certgrab.py 127.0.0.1:PORT -n www.example.test ...` inside,
with an environment that carries nothing of the host's Python set-up.
"""

import hashlib
import resource
import shutil
from pathlib import Path

import pytest

import make_certs
from helpers import SYSTEMS, assert_verifies, entries, minimal_host
from make_certs import NAME, pem_ders, read_ders
from servers import DelayedTLSServer, TLSServer, ipv6_available

CHAINS = ["ec1", "ec2", "rsa1", "rsa2"]


@pytest.fixture(scope="module", params=SYSTEMS, ids=[s[1] for s in SYSTEMS])
def host(request, certs):
    """A MinimalHost (helpers.py) with certgrab.py and the roots of CHAINS."""
    files = [(certs / chain / "root.pem", "%s-root.pem" % chain) for chain in CHAINS]
    with minimal_host(request.param[0], files) as made:
        yield made


def cafile(host, chain):
    """The path of chain's root inside host."""
    return host.inside(host.scratch / ("%s-root.pem" % chain))


def serve(certs, chain, tls="1.3"):
    return TLSServer(str(certs / chain / "fullchain.pem"), str(certs / chain / "key.pem"),
                     host="127.0.0.1", tls=tls)


# ---------------------------------------------------------------- the premise

def test_root_is_really_minimal(host):
    """The root has the expected Python and OpenSSL, lacks json/shutil/ctypes, and has no CAs."""
    suite, _, version, openssl = [s for s in SYSTEMS if s[0] == host.root.name][0]
    proc = host.python("-c", "import sys, ssl; print(sys.version.split()[0]); "
                             "print(ssl.OPENSSL_VERSION); "
                             "print(ssl.create_default_context().cert_store_stats()['x509_ca'])")
    assert proc.returncode == 0, proc.stderr
    python_version, openssl_version, ca_count = proc.stdout.splitlines()
    assert python_version.startswith(version + ".")
    assert openssl_version.startswith(openssl)
    assert ca_count == "0", "the %s root has a CA store; the test would prove less" % suite
    for module in ("json", "shutil", "ctypes"):
        proc = host.python("-c", "import " + module)
        assert proc.returncode != 0 and "No module named '%s'" % module in proc.stderr


# ---------------------------------------------------------------- fetching there

@pytest.mark.parametrize("tls", ["1.3", "1.2"])
@pytest.mark.parametrize("chain", CHAINS)
def test_prints_exactly_the_served_chain(host, certs, chain, tls):
    with serve(certs, chain, tls) as server:
        proc = host.certgrab("127.0.0.1:%d" % server.port, "-n", NAME,
                             "--cafile", cafile(host, chain))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert pem_ders(proc.stdout) == read_ders(certs / chain / "fullchain.pem")


def test_ipv6_literal_source(host, certs):
    if not ipv6_available():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    with TLSServer(str(certs / "rsa1" / "fullchain.pem"), str(certs / "rsa1" / "key.pem"),
                   host="::1", tls="1.3") as server:
        proc = host.certgrab("[::1]:%d" % server.port, "-n", NAME, "--cafile", cafile(host, "rsa1"))
    assert proc.returncode == 0, proc.stderr
    assert pem_ders(proc.stdout) == read_ders(certs / "rsa1" / "fullchain.pem")


def test_verified_chain_ends_at_the_root(host, certs):
    with serve(certs, "ec2", "1.2") as server:
        proc = host.certgrab("127.0.0.1:%d" % server.port, "-n", NAME,
                             "--cafile", cafile(host, "ec2"), "--verified-chain")
    assert proc.returncode == 0, proc.stderr
    expected = read_ders(certs / "ec2" / "fullchain.pem") + read_ders(certs / "ec2" / "root.pem")
    assert pem_ders(proc.stdout) == expected


def test_out_dir_writes_cert_chain_fullchain(host, certs):
    out = host.scratch / "out"
    with serve(certs, "ec2") as server:
        proc = host.certgrab("127.0.0.1:%d" % server.port, "-n", NAME,
                             "--cafile", cafile(host, "ec2"), "--out-dir", host.inside(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        assert read_ders(out / name) == read_ders(certs / "ec2" / name), name
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert entries(out) == ["cert.pem", "chain.pem", "fullchain.pem"]


def test_without_cafile_says_the_store_is_empty(host, certs):
    """No CA certificates on the host: one clear error pointing at --cafile, nothing written.

    The error is one line; a second line may carry the hint (`certgrab: hint: ...`)."""
    out = host.scratch / "refused"
    with serve(certs, "ec1") as server:
        proc = host.certgrab("127.0.0.1:%d" % server.port, "-n", NAME,
                             "--out-dir", host.inside(out))
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert 1 <= len(lines) <= 2, proc.stderr
    assert lines[0].startswith("certgrab: ")
    assert all(line.startswith("certgrab: hint: ") for line in lines[1:]), proc.stderr
    assert "--cafile" in proc.stderr
    assert not out.exists()


def test_parallel_is_lowered_to_ulimit_without_the_resource_module(host, certs):
    """python3-minimal has no `resource` (and a chroot no /proc): sysconf still tells
    certgrab the open-files limit, so --parallel is lowered to it and every source served."""
    chain = certs / "ec1"
    with DelayedTLSServer(str(chain / "fullchain.pem"), str(chain / "key.pem"), 0.1) as server:
        sources = ["127.0.0.1:%d" % server.port] * 200
        proc = host.certgrab(
            "--check", "--parallel", "100", "-n", NAME, "--cafile", cafile(host, "ec1"),
            *sources, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))
    assert proc.returncode == 0, proc.stdout[:2000] + proc.stderr
    assert proc.stdout.startswith("CERTGRAB OK - 200 source(s): 200 OK")
    assert len(proc.stdout.splitlines()) == 201
    assert proc.stderr == "certgrab: warning: --parallel 100 lowered to 48: this process may " \
        "open only 128 files (ulimit -n), 2 per source at once\n"
    assert server.most <= 48


# ---------------------------------------------------------------- the path OpenSSL verified

@pytest.fixture(scope="module")
def lookalikes(certs, tmp_path_factory):
    """ec1 served with a look-alike of its intermediate (make_certs.make_lookalike): an RSA
    key under the EC leaf, or an expired EC one."""
    outdir = tmp_path_factory.mktemp("lookalikes")
    return dict((kind, Path(make_certs.make_lookalike(outdir, certs / "ec1", kind, kind)))
                for kind in ("rsa", "expired"))


@pytest.mark.parametrize("kind", ["rsa", "expired"])
def test_a_lookalike_intermediate_is_never_written(host, lookalikes, kind):
    """Python 3.9 without ctypes (Debian 11, OpenSSL 1.1.1) and 3.11 (Debian 12): files
    hold the path OpenSSL verified, which openssl verify accepts; the look-alike the server
    sent first is named in a warning and by --check, never written."""
    chain = lookalikes[kind]
    out = host.scratch / ("out-" + kind)
    shutil.copy(str(chain / "root.pem"), str(host.scratch / "lookalike-root.pem"))
    cafile = host.inside(host.scratch / "lookalike-root.pem")
    fake = read_ders(chain / "lookalike.pem")[0]
    digest = hashlib.sha256(fake).hexdigest()[:16]
    with TLSServer(str(chain / "served.pem"), str(chain / "key.pem"), host="127.0.0.1",
                   tls="1.3") as server:
        proc = host.certgrab("127.0.0.1:%d" % server.port, "-n", NAME, "--cafile", cafile,
                             "--out-dir", host.inside(out))
        check = host.certgrab("--check", "127.0.0.1:%d" % server.port, "-n", NAME,
                              "--cafile", cafile)
    assert proc.returncode == 0, proc.stderr
    assert read_ders(out / "chain.pem") == read_ders(chain / "chain.pem")
    assert read_ders(out / "fullchain.pem") == read_ders(chain / "fullchain.pem")
    assert_verifies(chain / "root.pem", out)
    assert "not on the path OpenSSL verified, never written: [1] " in proc.stderr
    assert digest in proc.stderr
    assert check.returncode == 1, check.stdout + check.stderr
    assert check.stdout.splitlines()[1].startswith(
        "WARNING - 127.0.0.1:%d: 1 served certificate(s) not on the path OpenSSL verified, "
        "never written: [1] " % server.port) and digest in check.stdout, check.stdout
