"""Issue 22: rollouts you can trust, with real parts.

    1. --all-addresses: a name that resolves to 127.0.0.2, 127.0.0.3 and ::1 through its own
       /etc/hosts (a mount namespace: `unshare -m` and bind mounts, certgrab a subprocess in
       it), each address a real TLS server on one port; `--check --same` flags exactly the
       address that serves the older chain; installs take the newest of every address; a
       duplicate address is fetched once; a name that resolves to nothing is its own error
    2. --min-age: leaves issued an hour ago and now are held back (exit 0, files and hook left
       alone, "held back until TIME"), then installed; the installed leaf and a first install
       are never held back
    3. --confirm: a real nginx (Debian package) reloaded by the deploy hook. A hook that does
       nothing: exit 7 naming the leaf still served, the hook pending, rerun by the next run,
       then "confirmed". A hook that breaks nginx's TLS: the previous files back, the hook run
       again, nginx serving the old chain, exit 7; the next runs refuse that leaf (exit 7)
       until a newer leaf or --force. A failing hook is a hook failure: nothing is confirmed.
       --prometheus records the outcomes and the confirmed leaf (promtool check metrics)
    4. After the port onto issue 19's main: a first install that breaks the service stays
       installed with its hook pending (nothing to put back, nothing recorded); the hook run
       again for the restored files fails, and the next run runs it; the kept files are
       read only as regular files of certgrab's user that no one else may write; a bug met
       while a --confirm service is tried is never taken for a broken service; a lowered
       --parallel is said once with --all-addresses. Every written set passes
       `openssl verify` with only its intermediates.
"""

import datetime
import os
import resource
import shutil
import tempfile
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import make_certs
from helpers import (CERTGRAB, CRITICAL, HOOK_PENDING, OUT_FILES, PENDING_MTIME, UNSHARE, USAGE,
                     assert_promtool_accepts, assert_verifies, describe, entries, error_lines,
                     expected, files_ders, grab, grab_args, hook_runs, install_outcome, iso,
                     load_cert, run_with_mounts, serial_hex, sha256, snapshot, tool)
from make_certs import HOUR, NAME
from servers import InstalledFilesServer, TLSServer, closed_port, ipv6_available


# 1. --all-addresses ----------------------------------------------------------------------------

@pytest.fixture
def own_hosts(tmp_path):
    """run(hosts_text, *argv): certgrab.py ARGV in a mount namespace whose /etc/hosts is
    hosts_text and whose /etc/nsswitch.conf asks only that file (no DNS: no network here)."""
    if os.geteuid() != 0 or UNSHARE is None:
        pytest.skip("needs root and unshare(1) for a mount namespace with its own /etc/hosts")
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files\n")

    def run(hosts_text, *argv, **kw):
        """open_files=N: run under `ulimit -n N` (soft and hard)."""
        hosts = tmp_path / "hosts"
        hosts.write_text(hosts_text)
        limit = kw.get("open_files")
        return run_with_mounts(
            [(hosts, "/etc/hosts"), (nsswitch, "/etc/nsswitch.conf")], argv,
            preexec_fn=None if limit is None else lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (limit, limit)))

    return run


@pytest.fixture
def one_port(certs, started):
    """one_port({address: chain}): a TLSServer per address, all on one port; {address:
    server}. The first address takes a free port, the others bind the same one."""
    def start(chains):
        servers, port = {}, 0
        for address, chain in chains.items():
            if ":" in address and not ipv6_available():
                pytest.skip("no IPv6 loopback (::1) on this machine")
            server = started(TLSServer(certs / chain / "fullchain.pem", certs / chain / "key.pem",
                                       host=address, port=port))
            servers[address], port = server, server.port
        return servers
    return start


THREE_ADDRESSES = "127.0.0.2 %s\n127.0.0.3 %s\n::1 %s\n" % (NAME, NAME, NAME)


def test_check_same_flags_the_one_address_with_the_older_chain(own_hosts, one_port, certs):
    """Acceptance 1: round-robin DNS over three nodes, one still serving the old chain."""
    servers = one_port({"127.0.0.2": "ec1new", "127.0.0.3": "ec1", "::1": "ec1new"})
    port = servers["127.0.0.2"].port
    result = own_hosts(THREE_ADDRESSES, "--check", "--same", "--all-addresses",
                       "%s:%d" % (NAME, port), "--cafile", certs / "ec1" / "root.pem")
    assert result.returncode == CRITICAL, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CERTGRAB CRITICAL - 3 source(s): 2 OK, 1 CRITICAL; first: "
                               "%s[127.0.0.3]:%d: not the newest chain" % (NAME, port))
    critical = [line for line in lines[1:] if line.startswith("CRITICAL - ")]
    assert len(critical) == 1 and critical[0].startswith(
        "CRITICAL - %s[127.0.0.3]:%d: not the newest chain: serves the leaf (sha256 " % (
            NAME, port)), lines
    assert sorted(line.split(": ")[0] for line in lines[1:] if line.startswith("OK - ")) == \
        ["OK - %s[127.0.0.2]:%d" % (NAME, port), "OK - %s[::1]:%d" % (NAME, port)]
    for server in servers.values():
        assert server.server_names == [NAME], "each address got the name as SNI"


def test_an_install_takes_the_newest_chain_of_every_address(own_hosts, one_port, certs,
                                                            tmp_path):
    servers = one_port({"127.0.0.2": "ec1", "127.0.0.3": "ec1new", "::1": "ec1"})
    port, out = servers["127.0.0.2"].port, tmp_path / "out"
    result = own_hosts(THREE_ADDRESSES, "--all-addresses", "%s:%d" % (NAME, port),
                       "--cafile", certs / "ec1" / "root.pem", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert files_ders(out) == expected(certs, "ec1new")
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert "certgrab: installed the chain from %s[127.0.0.3]:%d (" % (NAME, port) \
        in result.stderr


def test_a_duplicate_address_is_fetched_once_and_a_name_without_one_is_its_error(
        own_hosts, one_port, certs):
    servers = one_port({"127.0.0.2": "ec1", "127.0.0.3": "ec1"})
    port = servers["127.0.0.2"].port
    hosts = "127.0.0.2 %s\n127.0.0.3 %s\n127.0.0.2 %s\n" % (NAME, NAME, NAME)
    result = own_hosts(hosts, "--check", "--all-addresses", "%s:%d" % (NAME, port),
                       "missing.example.test:%d" % port, "127.0.0.3:%d" % port, "-n", NAME,
                       "--cafile", certs / "ec1" / "root.pem")
    lines = result.stdout.splitlines()
    assert result.returncode == CRITICAL, result.stdout + result.stderr
    assert lines[0].startswith("CERTGRAB CRITICAL - 4 source(s): 3 OK, 1 CRITICAL"), lines
    assert [line.split(": ")[0] for line in lines[1:]] == [
        "OK - %s[127.0.0.2]:%d" % (NAME, port), "OK - %s[127.0.0.3]:%d" % (NAME, port),
        "CRITICAL - missing.example.test:%d" % port, "OK - 127.0.0.3:%d" % port]
    assert "cannot resolve missing.example.test" in lines[3]
    assert servers["127.0.0.2"].connections == 1, "listed twice in /etc/hosts, fetched once"
    assert servers["127.0.0.3"].connections == 2, "a name's address and a SOURCE: both fetched"


def test_ipv6_only_and_the_label_of_an_ipv6_address(own_hosts, one_port, certs):
    servers = one_port({"127.0.0.2": "ec1", "::1": "ec1new"})
    port = servers["::1"].port
    result = own_hosts(THREE_ADDRESSES, "--text", "--all-addresses", "-6",
                       "%s:%d" % (NAME, port), "--cafile", certs / "ec1" / "root.pem")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "%s[::1]:%d (::1)" % (NAME, port)
    assert "  servername:   %s" % NAME in result.stdout
    assert result.stdout.count("servername:") == 1
    assert servers["127.0.0.2"].connections == 0


def test_a_lowered_parallel_is_said_once(own_hosts, one_port, certs):
    """The names are looked up, then their addresses fetched, each within the open-files
    limit: a --parallel above it is lowered, and said, once."""
    servers = one_port({"127.0.0.2": "ec1"})
    port = servers["127.0.0.2"].port
    names = ["n%d.example.test" % index for index in range(6)]
    hosts = "".join("127.0.0.2 %s\n" % name for name in names)
    result = own_hosts(hosts, "--check", "--all-addresses", "--parallel", "6", "--cafile",
                       certs / "ec1" / "root.pem", *["%s:%d" % (name, port) for name in names],
                       open_files=40)
    assert result.stdout.startswith("CERTGRAB CRITICAL - 6 source(s): 6 CRITICAL"), \
        result.stdout + result.stderr
    assert result.stderr.count("--parallel 6 lowered to") == 1, result.stderr
    assert servers["127.0.0.2"].connections == 6, "each name's address, with its own SNI"


# 2. --min-age ---------------------------------------------------------------------------------

@pytest.fixture
def dated(certs, tmp_path, started):
    """dated(name, issued_ago): a server of a fresh chain under root-ec (ec1's root) whose
    leaf was issued issued_ago seconds ago; returns (server, leaf as cryptography reads it)."""
    def make(name, issued_ago):
        (tmp_path / "chains").mkdir(exist_ok=True)
        chain = make_certs.make_dated_chain(tmp_path / "chains", certs / "root-ec", name, 30,
                                            issued_ago=issued_ago)
        server = started(TLSServer(os.path.join(chain, "fullchain.pem"),
                                   os.path.join(chain, "key.pem")))
        return server, load_cert(os.path.join(chain, "cert.pem"))
    return make


def installed_ec1(run, served, certs, out):
    result = grab(run, served("ec1"), certs / "ec1", "--out-dir", out)
    assert result.rc == 0, result.err
    return load_cert(certs / "ec1" / "cert.pem")


@pytest.mark.parametrize("issued_ago, held, goes", [(HOUR, "90m", "30m"), (0, "1h", "0m")])
def test_a_young_leaf_is_held_back_then_installed(run, served, certs, tmp_path, dated,
                                                  issued_ago, held, goes):
    out, log = tmp_path / "out", tmp_path / "hook.log"
    old = installed_ec1(run, served, certs, out)
    server, leaf = dated("young", issued_ago)
    before = snapshot(out)
    args = grab_args(server, certs / "ec1", "--out-dir", out,
                     "--deploy-hook", "echo ran >> %s" % log,
                     "--prometheus", tmp_path / "rollout.prom")
    result = run(*args + ["--min-age", held])
    assert result.rc == 0, result.err
    wait = {"90m": 90 * 60, "1h": HOUR}[held]
    until = iso(leaf.not_valid_before_utc + datetime.timedelta(seconds=wait))
    assert error_lines(result.err) == [
        "certgrab: %s serves a new leaf (%s): held back until %s (--min-age %s); the "
        "installed leaf (%s) stays" % (server.address, describe(leaf), until, held,
                                       describe(old))]
    assert snapshot(out) == before and hook_runs(log) == []
    assert 'certgrab_install_outcome{run="rollout",outcome="held_back"} 1' in \
        (tmp_path / "rollout.prom").read_text()

    result = run(*args + ["--min-age", goes])
    assert result.rc == 0, result.err
    assert files_ders(out)["cert.pem"] == [leaf.public_bytes(Encoding.DER)]
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert hook_runs(log) == ["ran"]
    assert "held back" not in result.err


def test_the_installed_leaf_and_a_first_install_are_not_held_back(run, certs, tmp_path, dated):
    out = tmp_path / "out"
    server, leaf = dated("now", 0)
    args = grab_args(server, certs / "ec1", "--out-dir", out, "--min-age", "2d")
    first = run(*args)
    assert first.rc == 0, first.err
    assert "certgrab: %s: the leaf (%s) is younger than --min-age 2d, but nothing is " \
        "installed yet: a first install is not held back" % (server.address, describe(leaf)) \
        in first.err
    assert files_ders(out)["cert.pem"] == [make_certs.read_ders(
        os.path.join(str(tmp_path / "chains" / "now"), "cert.pem"))[0]]
    before = snapshot(out)
    again = run(*args)
    assert again.rc == 0 and "held back" not in again.err and "first" not in again.err
    assert snapshot(out) == before


@pytest.mark.parametrize("argv, error", [
    (["--min-age", "1h"], "--min-age needs an output file (--out-dir or a --*-path)"),
    (["OUT", "--min-age", "1x"], "--min-age 1x: give a duration such as 90m, 36h or 2d"),
    (["OUT", "--min-age=-5m"], "--min-age -5m: give a duration such as 90m, 36h or 2d"),
    (["OUT", "--min-age", "h"], "--min-age h: give a duration such as 90m, 36h or 2d"),
    (["OUT", "--confirm", "127.0.0.1:443"],
     "--confirm needs --deploy-hook (the command that reloads the service --confirm dials)"),
    (["OUT", "--deploy-hook", "true", "--confirm", "bad host"],
     "bad SOURCE 'bad host': not a host name or IP address"),
    (["OUT", "--deploy-hook", "true", "--confirm", "127.0.0.1", "--confirm-timeout", "0"],
     "--confirm-timeout must be a number of seconds above 0"),
    (["OUT", "--deploy-hook", "true", "--confirm-timeout", "5"],
     "--confirm-timeout needs --confirm"),
    (["--confirm", "127.0.0.1"], "--confirm needs an output file (--out-dir or a --*-path)"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_rollout_usage_errors(run, argv, error, tmp_path):
    out = tmp_path / "x"
    argv = [word for item in argv for word in (["--out-dir", out] if item == "OUT" else [item])]
    result = run("127.0.0.1", *argv)
    assert result.rc == USAGE, result.err
    assert error_lines(result.err) == ["certgrab: " + error]
    assert not out.exists()


def test_the_exit_codes_say_what_holding_back_and_confirming_mean(run, certgrab):
    """The docstring (and so --help) and README's table, for 0 and 7."""
    help_text = " ".join(run("--help").out.split())
    readme = open(os.path.join(os.path.dirname(CERTGRAB), "README.md")).read()
    rows = dict((line.split(" | ")[0][2:], line) for line in readme.split("## Exit codes")[1]
                .split("\n\n")[1].splitlines()[2:])
    for text in (help_text, " ".join(certgrab.__doc__.split())):
        assert "or a new leaf held back by --min-age" in text
        assert "with --confirm also: the service does not serve the new leaf after the hook" \
            in text
    assert "held back by `--min-age`" in rows["0"]
    assert "With `--confirm` also: after the hook the service served another leaf" in rows["7"]


# 3. --confirm -----------------------------------------------------------------------------------

def test_a_failing_hook_is_a_hook_failure_and_nothing_is_confirmed(run, served, certs,
                                                                   tmp_path):
    out = tmp_path / "out"
    installed_ec1(run, served, certs, out)
    service = served("ec1")
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--deploy-hook",
                  "exit 3", "--confirm", service.address)
    assert result.rc == HOOK_PENDING, result.err
    assert error_lines(result.err)[-1] == \
        "certgrab: --deploy-hook failed (exit status 3); the next run retries it"
    assert service.connections == 1, "dialled once before the install, never after the hook"
    assert int(os.stat(str(out / "cert.pem")).st_mtime) == PENDING_MTIME


def test_a_service_that_was_down_before_is_not_rolled_back(run, served, certs, tmp_path):
    """Nothing to roll back to: exit 7 with the hook pending, the new files stay."""
    out = tmp_path / "out"
    installed_ec1(run, served, certs, out)
    with closed_port() as port:
        result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--deploy-hook",
                      "true", "--confirm", "127.0.0.1:%d" % port,
                      "--confirm-timeout", "1")
    assert result.rc == HOOK_PENDING, result.err
    line = error_lines(result.err)[-1]
    assert line.startswith("certgrab: the deploy hook ran, but after 1 s (--confirm-timeout) "
                           "127.0.0.1:%d completes no TLS handshake (127.0.0.1:%d: cannot "
                           "connect to port %d: Connection refused), as before the install, "
                           "not the leaf just installed" % (port, port, port)), line
    assert files_ders(out) == expected(certs, "ec1new")
    assert int(os.stat(str(out / "cert.pem")).st_mtime) == PENDING_MTIME
    assert not (out / ".cert.pem.certgrab-rolled-back").exists()


def test_confirmed_with_metrics_carried_over(run, served, certs, tmp_path):
    """A service that serves the installed files (as if reloaded): "confirmed", and the
    metrics say when and which leaf, also after a run that changed nothing."""
    out, prom = tmp_path / "out", tmp_path / "www.prom"
    installed_ec1(run, served, certs, out)
    service = InstalledFilesServer(out / "fullchain.pem", certs / "ec1" / "key.pem")
    service.start()
    try:
        args = grab_args(served("ec1new"), certs / "ec1", "--out-dir", out, "--deploy-hook", "true",
                         "--confirm", service.address, "--prometheus", prom)
        before = time.time()
        result = run(*args)
        leaf = load_cert(certs / "ec1new" / "cert.pem")
        assert result.rc == 0, result.err
        assert error_lines(result.err)[-1].startswith(
            "certgrab: confirmed: %s serves the leaf just installed (serial %s) after " % (
                service.address, serial_hex(leaf.serial_number)))
        assert not [name for name in entries(out) if name.startswith(".")]
        assert_verifies(certs / "ec1" / "root.pem", out)
        line = confirm_line(prom)
        assert line.startswith('certgrab_last_confirm_timestamp_seconds{run="www",serial="%s",'
                               'sha256="%s"} ' % (serial_hex(leaf.serial_number), sha256(leaf)))
        assert before <= float(line.rsplit(" ", 1)[1]) <= time.time()
        assert 'certgrab_install_outcome{run="www",outcome="installed"} 1' in prom.read_text()
        assert_promtool_accepts(prom.read_text())
        assert run(*args).rc == 0
        assert confirm_line(prom) == line, "carried over by a run that confirmed nothing"
    finally:
        service.stop()


def test_config_keys_confirm_a_list_and_min_age(run, served, certs, tmp_path, dated):
    """In a --config section, confirm takes a list (like key-path), min-age a duration."""
    out = tmp_path / "out"
    installed_ec1(run, served, certs, out)
    young, leaf = dated("young", HOUR)          # a new key: ec1's files do not go with it
    services = [InstalledFilesServer(out / "fullchain.pem",
                                     tmp_path / "chains" / "young" / "key.pem")
                for _ in range(2)]
    for service in services:
        service.start()
    try:
        config = tmp_path / "certgrab.conf"
        section = ("[www]\nsource = %s\nservername = %s\ncafile = %s\nout-dir = %s\n"
                   "deploy-hook = true\nconfirm = %s %s\nconfirm-timeout = 5\nmin-age = %%s\n" % (
                       young.address, NAME, certs / "ec1" / "root.pem", out,
                       services[0].address, services[1].address))
        config.write_text(section % "2h")
        held = run("--config", config)
        assert held.rc == 0 and "held back until %s (--min-age 2h)" % iso(
            leaf.not_valid_before_utc + datetime.timedelta(hours=2)) in held.err, held.err
        config.write_text(section % "30m")
        done = run("--config", config)
        assert done.rc == 0, done.err
        assert "certgrab: [www] confirmed: %s, %s serve the leaf just installed (serial %s)" % (
            services[0].address, services[1].address, serial_hex(leaf.serial_number)) in done.err
        assert all(service.connections >= 2 for service in services), "before and after"
    finally:
        for service in services:
            service.stop()


def confirm_line(prom):
    lines = [line for line in prom.read_text().splitlines()
             if line.startswith("certgrab_last_confirm_timestamp_seconds{")]
    assert len(lines) == 1, prom.read_text()
    return lines[0]


def outcome(prom):
    return install_outcome(prom.read_text())


# nginx, reloaded by the hook -----------------------------------------------------------------

HOOK_SCRIPT = """\
echo "$CERTGRAB_SHA256" >> {log}
[ -e {noop} ] && exit 0
if [ -e {breaks} ] && ! cmp -s "$RENEWED_LINEAGE/cert.pem" {first}; then
    cp {conf}.broken {conf}
else
    cp {conf}.good {conf}
fi
kill -HUP {pid}
"""


class Site(object):
    """A real nginx (master and workers, so that it reloads on SIGHUP) serving --out-dir's
    fullchain.pem with ec1's key, and the deploy hook of a follower that runs it: the hook
    logs each run, does nothing while `noop` exists, and while `breaks` exists writes an
    nginx config whose listener speaks plain HTTP instead of TLS (as a broken reload would
    leave a service), unless the installed leaf is the first one (ec1)."""

    def __init__(self, root, certs, out):
        import acme
        self.out, self.dir = out, os.path.join(root, "hook")
        os.makedirs(self.dir)
        self.nginx = acme.Nginx(root, "nginx", sites=[(str(out / "fullchain.pem"),
                                                       str(certs / "ec1" / "key.pem"))])
        self.nginx.start()
        self.port = self.nginx.ports["tls0"]
        self.address = "127.0.0.1:%d" % self.port
        conf = self.nginx.path("nginx.conf")
        with open(conf) as f:
            good = f.read()
        listen = "listen 127.0.0.1:%d ssl;" % self.port
        assert listen in good
        for suffix, text in ((".good", good), (".broken", good.replace(
                listen, "listen 127.0.0.1:%d;" % self.port))):
            with open(conf + suffix, "w") as f:
                f.write(text)
        self.log, self.noop, self.breaks = (os.path.join(self.dir, name)
                                            for name in ("hook.log", "noop", "breaks"))
        self.script = os.path.join(self.dir, "hook.sh")
        with open(self.script, "w") as f:
            f.write(HOOK_SCRIPT.format(log=self.log, noop=self.noop, breaks=self.breaks,
                                       first=certs / "ec1" / "cert.pem", conf=conf,
                                       pid=self.nginx.procs[0].pid))

    def flag(self, path, on):
        if on:
            open(path, "w").close()
        elif os.path.exists(path):
            os.unlink(path)

    def hook_runs(self):
        return hook_runs(self.log)

    def served(self, chain_dir, within=10.0):
        """True once nginx hands out the leaf of chain_dir (within seconds)."""
        import acme
        want = make_certs.read_ders(chain_dir / "cert.pem")[0]
        deadline = time.monotonic() + within
        while acme.served_leaf(self.port) != want:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self):
        self.nginx.stop()


@pytest.fixture
def site(run, served, certs, tmp_path):
    """ec1 installed in tmp_path/out by certgrab, then nginx serving it."""
    tool("nginx")
    out = tmp_path / "out"
    installed_ec1(run, served, certs, out)
    root = tempfile.mkdtemp(prefix="certgrab-confirm-")   # nginx's workers read here
    os.chmod(root, 0o755)
    try:
        import daemons
        running = Site(root, certs, out)
    except daemons.DaemonMissing as exc:
        shutil.rmtree(root)
        pytest.skip(str(exc))
    assert running.served(certs / "ec1")
    yield running
    running.stop()
    shutil.rmtree(root, ignore_errors=True)


def follow(certs, server, site, *extra):
    return grab_args(server, certs / "ec1", "--out-dir", site.out,
                     "--deploy-hook", "sh %s" % site.script,
                     "--confirm", site.address, "--confirm-timeout", "3", *extra)


def test_a_hook_that_reloads_nothing_stays_pending_until_a_reload_confirms(run, served, certs,
                                                                           site):
    """Acceptance 2, first half: exit 7 naming the leaf still served; the next run runs the
    hook again and, after a real reload, says "confirmed"."""
    old, new = load_cert(certs / "ec1" / "cert.pem"), load_cert(certs / "ec1new" / "cert.pem")
    source = served("ec1new")
    site.flag(site.noop, True)
    first = run(*follow(certs, source, site))
    assert first.rc == HOOK_PENDING, first.err
    assert error_lines(first.err)[-1] == (
        "certgrab: the deploy hook ran, but after 3 s (--confirm-timeout) %s serves the leaf "
        "%s, not the leaf just installed (%s); the hook stays pending: the next run runs it "
        "again" % (site.address, describe(old), describe(new)))
    assert files_ders(site.out) == expected(certs, "ec1new")
    assert all(int(os.stat(str(site.out / name)).st_mtime) == PENDING_MTIME
               for name in ("cert.pem", "fullchain.pem"))
    assert site.hook_runs() == [sha256(new)] and site.served(certs / "ec1", within=0)

    site.flag(site.noop, False)
    second = run(*follow(certs, source, site))
    assert second.rc == 0, second.err
    assert "certgrab: retrying the deploy hook, which did not complete after an earlier run " \
        "installed " in second.err
    assert "certgrab: confirmed: %s serves the leaf just installed (serial %s) after " % (
        site.address, serial_hex(new.serial_number)) in second.err
    assert site.hook_runs() == [sha256(new)] * 2 and site.served(certs / "ec1new")
    assert all(int(os.stat(str(site.out / name)).st_mtime) > PENDING_MTIME for name in OUT_FILES)
    assert entries(site.out) == sorted(OUT_FILES), "nothing kept any more"
    assert_verifies(certs / "ec1" / "root.pem", site.out)

    third = run(*follow(certs, source, site))
    assert third.rc == 0 and site.hook_runs() == [sha256(new)] * 2


@pytest.mark.parametrize("way_out", ["newer", "force"])
def test_a_hook_that_breaks_tls_gets_the_previous_files_back(run, served, certs, tmp_path, site,
                                                             way_out):
    """Acceptance 2, second half: restored, hook rerun, nginx serves the old chain again,
    exit 7; that leaf is refused by every run (exit 7) until a newer leaf or --force."""
    old, new = load_cert(certs / "ec1" / "cert.pem"), load_cert(certs / "ec1new" / "cert.pem")
    prom = tmp_path / "www.prom"
    source = served("ec1new")
    site.flag(site.breaks, True)
    broke = run(*follow(certs, source, site, "--prometheus", prom))
    assert broke.rc == HOOK_PENDING, broke.err
    line = error_lines(broke.err)[-1]
    record = site.out / ".cert.pem.certgrab-rolled-back"
    assert line.startswith("certgrab: %s completes no TLS handshake 3 s after the deploy hook "
                           "(before the install it served the leaf %s): restored the previous "
                           "%s %s; ran the deploy hook again; now %s serves the leaf %s; the "
                           "leaf %s is not installed again until a newer leaf appears" % (
                               site.address, describe(old), site.out / "cert.pem",
                               site.out / "fullchain.pem", site.address, describe(old),
                               describe(new))), line
    assert files_ders(site.out) == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", site.out)
    assert site.hook_runs() == [sha256(new), sha256(old)]
    assert site.served(certs / "ec1")
    assert all(int(os.stat(str(site.out / name)).st_mtime) > PENDING_MTIME for name in OUT_FILES)
    assert oct(os.stat(str(record)).st_mode & 0o777) == "0o600"
    assert make_certs.read_ders(record) == make_certs.read_ders(certs / "ec1new" / "cert.pem")
    assert entries(site.out) == sorted(OUT_FILES + [record.name])
    assert outcome(prom) == "restored"

    before = snapshot(site.out)
    refused = run(*follow(certs, source, site, "--prometheus", prom))
    assert refused.rc == HOOK_PENDING, refused.err
    assert error_lines(refused.err) == [
        "certgrab: %s serves the leaf %s, which left a --confirm service completing no TLS "
        "handshake after the deploy hook at an earlier run; it was rolled back (%s) and is not "
        "installed again until a newer leaf appears" % (source.address, describe(new), record)]
    assert snapshot(site.out) == before and len(site.hook_runs()) == 2
    assert outcome(prom) == "restored"

    site.flag(site.breaks, False)
    if way_out == "force":
        done = run(*follow(certs, source, site, "--force", "--prometheus", prom))
        chain = "ec1new"
    else:
        assert run(*follow(certs, source, site)).rc == HOOK_PENDING, "still the same leaf"
        done = run(*follow(certs, served("ec1short"), site, "--prometheus", prom))
        chain = "ec1short"
    assert done.rc == 0, done.err
    assert "certgrab: confirmed: %s serves the leaf just installed" % site.address in done.err
    assert files_ders(site.out) == expected(certs, chain) and site.served(certs / chain)
    assert_verifies(certs / "ec1" / "root.pem", site.out)
    assert not record.exists()
    assert outcome(prom) == "installed"
    leaf = load_cert(certs / chain / "cert.pem")
    assert 'serial="%s"' % serial_hex(leaf.serial_number) in confirm_line(prom)
    assert_promtool_accepts(prom.read_text())


# 4. after the port onto issue 19's main ------------------------------------------------------

@pytest.fixture
def keyed_service(certs, tmp_path, started):
    """A service like a real one: it serves tmp_path/service.pem (a copy of ec1's fullchain,
    which a hook may replace) with tmp_path/service.key (ec1's key), read again for every
    connection; a certificate that does not go with the key leaves it completing no TLS
    handshake at all, as a reload with the wrong files leaves nginx."""
    served_file, key = tmp_path / "service.pem", tmp_path / "service.key"
    shutil.copy(str(certs / "ec1" / "fullchain.pem"), str(served_file))
    shutil.copy(str(certs / "ec1" / "key.pem"), str(key))
    return started(InstalledFilesServer(served_file, key)), served_file, key


def copying_hook(log, served_file, fails_unless=None):
    """A hook that logs $CERTGRAB_SHA256, then copies the installed fullchain.pem to the
    service (a reload); with fails_unless (a path and a sha256): while the path exists, a
    run for another leaf fails at once, copying nothing."""
    fail = "" if fails_unless is None else \
        '[ -e %s ] && [ "$CERTGRAB_SHA256" != %s ] && exit 4; ' % fails_unless
    return 'echo "$CERTGRAB_SHA256" >> %s; %scp "$RENEWED_LINEAGE/fullchain.pem" %s' % (
        log, fail, served_file)


def pending(out):
    return [name for name in OUT_FILES if int(os.stat(str(out / name)).st_mtime) == PENDING_MTIME]


def test_a_first_install_that_breaks_the_service_stays_with_its_hook_pending(
        run, certs, tmp_path, dated, keyed_service):
    """Nothing was installed before, so nothing can be put back: the message says which leaf
    is installed and why it stays. Nothing is recorded as rolled back, so the next runs run
    the hook again (never "not installed again"), and confirm once the service is fixed."""
    service, served_file, key = keyed_service
    out, log = tmp_path / "out", tmp_path / "hook.log"
    source, leaf = dated("newkey", 0)
    args = grab_args(source, certs / "ec1", "--out-dir", out, "--deploy-hook",
                     copying_hook(log, served_file), "--confirm", service.address,
                     "--confirm-timeout", "1")
    broke = run(*args)
    assert broke.rc == HOOK_PENDING, broke.err
    assert error_lines(broke.err)[-1] == (
        "certgrab: %s completes no TLS handshake 1 s after the deploy hook (before the install "
        "it served the leaf %s): nothing was installed before, so there are no previous files "
        "to put back: the new files stay installed with the leaf %s, and their deploy hook "
        "stays pending (the next run runs it again)" % (
            service.address, describe(load_cert(certs / "ec1" / "cert.pem")), describe(leaf)))
    assert files_ders(out)["cert.pem"] == [leaf.public_bytes(Encoding.DER)]
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert pending(out) == OUT_FILES and entries(out) == sorted(OUT_FILES), "nothing recorded"
    assert hook_runs(log) == [sha256(leaf)]

    again = run(*args)
    assert again.rc == HOOK_PENDING, again.err
    assert "not installed again" not in again.err
    assert "certgrab: retrying the deploy hook, which did not complete after an earlier run " \
        "installed " in again.err
    line = error_lines(again.err)[-1]
    assert line.startswith("certgrab: the deploy hook ran, but after 1 s (--confirm-timeout) "
                           "%s completes no TLS handshake (" % service.address), line
    assert line.endswith(", as before the install, not the leaf just installed (%s); the hook "
                         "stays pending: the next run runs it again" % describe(leaf)), line
    assert hook_runs(log) == [sha256(leaf)] * 2 and pending(out) == OUT_FILES

    shutil.copy(str(tmp_path / "chains" / "newkey" / "key.pem"), str(key))   # fixed
    fixed = run(*args)
    assert fixed.rc == 0, fixed.err
    assert "certgrab: confirmed: %s serves the leaf just installed (serial %s) after " % (
        service.address, serial_hex(leaf.serial_number)) in fixed.err
    assert pending(out) == [] and hook_runs(log) == [sha256(leaf)] * 3


def test_the_hook_run_again_for_the_previous_files_fails(run, served, certs, tmp_path, dated,
                                                         keyed_service):
    """The roll back put the previous files back, but the hook run for them fails: exit 7
    saying so, the previous files stay hook-pending, and the next run runs the hook for
    them (the service is whole again) before it refuses the leaf again."""
    service, served_file, _ = keyed_service
    out, log, fail = tmp_path / "out", tmp_path / "hook.log", tmp_path / "fail"
    old = installed_ec1(run, served, certs, out)
    source, leaf = dated("newkey", 0)
    fail.write_text("")
    args = grab_args(source, certs / "ec1", "--out-dir", out, "--deploy-hook",
                     copying_hook(log, served_file, (fail, sha256(leaf))),
                     "--confirm", service.address, "--confirm-timeout", "1")
    record = out / ".cert.pem.certgrab-rolled-back"
    broke = run(*args)
    assert broke.rc == HOOK_PENDING, broke.err
    restored = " ".join(str(out / name) for name in OUT_FILES)
    assert error_lines(broke.err)[-1] == (
        "certgrab: %s completes no TLS handshake 1 s after the deploy hook (before the install "
        "it served the leaf %s): restored the previous %s; the deploy hook, run again, failed: "
        "--deploy-hook failed (exit status 4); the next run retries it" % (
            service.address, describe(old), restored))
    assert "certgrab: hint: the previous files are back, their hook pending; the leaf %s is " \
        "not installed again until a newer leaf appears (%s records it)" % (
            describe(leaf), record) in broke.err
    assert files_ders(out) == expected(certs, "ec1")
    assert_verifies(certs / "ec1" / "root.pem", out)
    assert pending(out) == OUT_FILES
    assert entries(out) == sorted(OUT_FILES + [record.name])
    assert hook_runs(log) == [sha256(leaf), sha256(old)]
    assert make_certs.read_ders(served_file)[0] == leaf.public_bytes(Encoding.DER), \
        "the failed hook copied nothing: the service is still broken"

    fail.unlink()
    again = run(*args)
    assert again.rc == HOOK_PENDING, again.err
    assert "certgrab: retrying the deploy hook, which did not complete for %s" % restored \
        in again.err
    assert error_lines(again.err)[-1].startswith(
        "certgrab: %s serves the leaf %s, which left a --confirm service completing no TLS "
        "handshake after the deploy hook at an earlier run; it was rolled back" % (
            source.address, describe(leaf)))
    assert hook_runs(log) == [sha256(leaf), sha256(old), sha256(old)]
    assert make_certs.read_ders(served_file) == expected(certs, "ec1")["fullchain.pem"]
    assert pending(out) == [] and files_ders(out) == expected(certs, "ec1")


@pytest.mark.parametrize("plant", ["link", "group-writable", "other-owner", "fifo"])
def test_a_kept_file_certgrab_did_not_write_is_refused(run, served, certs, tmp_path, plant):
    """The previous version --confirm keeps is read as outputs are (never through a link,
    never waiting on a FIFO) and only when it is root's and writable by no one else: else
    the run is refused before anything is written."""
    out, log = tmp_path / "out", tmp_path / "hook.log"
    installed_ec1(run, served, certs, out)
    before = snapshot(out)
    kept = out / ".cert.pem.certgrab-previous"
    if plant == "link":
        (tmp_path / "elsewhere.pem").write_text("not a certificate\n")
        os.symlink(str(tmp_path / "elsewhere.pem"), str(kept))
    elif plant == "fifo":
        os.mkfifo(str(kept))
    else:
        kept.write_text("not a certificate\n")
        os.chmod(str(kept), 0o664 if plant == "group-writable" else 0o600)
        if plant == "other-owner":
            os.chown(str(kept), 65534, 65534)
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--deploy-hook",
                  "echo ran >> %s" % log, "--confirm", served("ec1").address)
    assert result.rc == 6, result.err
    why = {"link": "it is a symbolic link", "fifo": "it is not a regular file",
           "group-writable": "it is writable by group or others (mode 0664)",
           "other-owner": "it belongs to nobody"}[plant]
    assert error_lines(result.err) == ["certgrab: %s is not a file certgrab wrote: %s" % (
        kept, why)]
    assert "certgrab: hint: remove it; the previous files are unchanged" in result.err
    kept.unlink()
    assert snapshot(out) == before and hook_runs(log) == []


def test_a_bug_while_a_service_is_tried_is_no_broken_service(run, served, certs, tmp_path,
                                                             certgrab, monkeypatch):
    """A --confirm service is tried as any source is fetched: a bug met then (injected here)
    is that try's internal error, said as such, and never taken for a service that stopped
    completing handshakes: nothing is rolled back, the hook stays pending."""
    out = tmp_path / "out"
    installed_ec1(run, served, certs, out)
    service, real, tries = served("ec1"), certgrab._fetch_into, []

    def buggy(result, *args):
        if result.source.text == service.address:
            tries.append(result.source)
            if len(tries) > 1:                  # the try before the install goes through
                raise RuntimeError("injected bug")
        return real(result, *args)

    monkeypatch.setattr(certgrab, "_fetch_into", buggy)
    result = grab(run, served("ec1new"), certs / "ec1", "--out-dir", out, "--deploy-hook", "true",
                  "--confirm", service.address, "--confirm-timeout", "1")
    assert result.rc == HOOK_PENDING, result.err
    line = error_lines(result.err)[-1]
    assert line.startswith("certgrab: the deploy hook ran, but after 1 s (--confirm-timeout) "
                           "%s could not be tried (%s: internal error in certgrab " % (
                               service.address, service.address)), line
    assert "(RuntimeError: injected bug); please report it), not the leaf just installed" \
        in line
    assert files_ders(out) == expected(certs, "ec1new")
    assert pending(out) == ["cert.pem", "fullchain.pem"], "ec1new's chain.pem is ec1's"
    assert not (out / ".cert.pem.certgrab-rolled-back").exists()
