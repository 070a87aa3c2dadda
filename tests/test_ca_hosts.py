"""Issue 21 on every kind of host: certgrab.py run as a program under Python 3.6, 3.9 and 3.13
(pyenv's, each with its own ssl module: 3.6 reads OpenSSL's verify message through ctypes),
and inside the Debian 12 and 11 python3-minimal roots (no json, no http.client, no CA store;
OpenSSL 3.0 and 1.1.1). Each asks a real CRL (good and revoked leaves; a revoked one is not
installed; an intermediate its root revoked refuses the chain) and an RFC 9773 server for
the window.
"""

import json
import os

import pytest

from ca_servers import AriServer, CrlCA, FileServer, cert_id, window
from helpers import REFUSED, SYSTEMS, certgrab_run, interpreter, minimal_host
from make_certs import NAME
from servers import TLSServer

pytestmark = pytest.mark.slow


class World(object):
    """A CA, its CRL server with a good and a revoked leaf served over TLS, an ARI server;
    and a second CA whose intermediate (naming the root's CRL) its root revoked, with a
    good leaf of that intermediate served too."""

    def __init__(self, directory):
        self.ca = CrlCA(directory / "ca")
        (directory / "crls").mkdir()
        self.crls = FileServer(directory / "crls").start()
        url = self.crls.url("int.crl")
        self.good, self.revoked = self.ca.leaf("good", url), self.ca.leaf("revoked", url)
        self.ca.revoke("revoked", "cessationOfOperation")
        self.ca.crl(str(directory / "crls" / "int.crl"))
        self.other = CrlCA(directory / "other", intermediate_crl=self.crls.url("root2.crl"))
        self.orphan = self.other.leaf("orphan", self.crls.url("int2.crl"))
        self.other.revoke_intermediate("cACompromise")
        self.other.crl(str(directory / "crls" / "root2.crl"), issuer=self.other.root)
        self.other.crl(str(directory / "crls" / "int2.crl"))
        self.servers = [TLSServer(os.path.join(leaf, "fullchain.pem"),
                                  os.path.join(leaf, "key.pem"), tls="1.2")
                        for leaf in (self.good, self.revoked, self.orphan)]
        api = self.ca.leaf("api", None)
        self.ari = AriServer(os.path.join(api, "fullchain.pem"), os.path.join(api, "key.pem"))
        self.ari.answers[cert_id(self.good)] = window(explanation="https://x.test/why")
        for server in self.servers + [self.ari]:
            server.start()

    def stop(self):
        for server in self.servers + [self.ari, self.crls]:
            server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    made = World(tmp_path_factory.mktemp("ca-hosts"))
    yield made
    made.stop()


def check_runs(certgrab, world, root_pem, out_dir, other_root_pem):
    """certgrab(*args) -> (rc, stdout, stderr) on some host: the runs every host must get
    right."""
    good, revoked, orphan = world.servers
    rc, out, err = certgrab(good.address, "-n", NAME, "--cafile", root_pem, "--json",
                            "--acme-directory", world.ari.directory)
    assert rc == 0, err
    source = json.loads(out)[0]
    assert source["revocation"]["status"] == "good", source["revocation"]
    assert source["renewal_window"]["explanation_url"] == "https://x.test/why"
    rc, out, err = certgrab(revoked.address, "-n", NAME, "--cafile", root_pem, "--out-dir",
                            out_dir)
    assert rc == REFUSED, err
    assert "its CA revoked it at" in err and "reason cessationOfOperation" in err
    assert "Traceback" not in err
    rc, out, err = certgrab(revoked.address, "-n", NAME, "--cafile", root_pem, "--check")
    assert rc == 2 and "was REVOKED by its CA" in out, out
    rc, out, err = certgrab(orphan.address, "-n", NAME, "--cafile", other_root_pem, "--json")
    revocation = json.loads(out)[0]["revocation"]
    assert (revocation["status"], revocation["intermediates"][0]["status"]) == (
        "good", "revoked"), revocation
    rc, out, err = certgrab(orphan.address, "-n", NAME, "--cafile", other_root_pem,
                            "--out-dir", out_dir)
    assert rc == REFUSED and 'its intermediate "CN=CRL test intermediate"' in err, err


@pytest.mark.parametrize("minor", [6, 9, 13], ids=lambda minor: "py3.%d" % minor)
def test_pythons(world, minor, tmp_path):
    python = interpreter(minor)

    def certgrab(*args):
        return certgrab_run(python, *args)

    check_runs(certgrab, world, world.ca.root_pem, tmp_path / "out", world.other.root_pem)
    assert not (tmp_path / "out").exists() or not os.listdir(str(tmp_path / "out"))


@pytest.mark.parametrize("suite", [s[0] for s in SYSTEMS], ids=[s[1] for s in SYSTEMS])
def test_minimal_hosts(world, suite):
    files = [(world.ca.root_pem, "root.pem"), (world.other.root_pem, "root2.pem")]
    with minimal_host(suite, files, prefix="certgrab-ca-") as host:
        inside = host.inside(host.scratch)

        def certgrab(*args):
            args = [inside + "/out" if str(a) == "OUT" else a for a in args]
            proc = host.certgrab(*args)
            return proc.returncode, proc.stdout, proc.stderr

        check_runs(certgrab, world, inside + "/root.pem", "OUT", inside + "/root2.pem")
        assert not (host.scratch / "out").exists() or not os.listdir(str(host.scratch / "out"))
