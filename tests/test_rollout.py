"""Running certgrab for years: contrib/'s systemd units and the Ansible rollout, for real.

  * contrib/ansible passes ansible-lint's production profile;
  * `systemd-analyze verify` accepts contrib/certgrab.service and certgrab.timer with no
    warning at all (an unknown or misspelt directive is only a warning: it fails here too),
    including the unit's Documentation=man:certgrab(1), which verify looks up with man;
  * contrib/ansible/site.yml runs with ansible-playbook against two hosts of this machine:
    local connections, each host a directory tree (certgrab_root), one scheduled by systemd
    (units installed and the timer enabled offline with systemctl --root, then verified in
    that root), one by cron. Both get the man page, and `man certgrab` finds it there. The
    key comes out of an ansible-vault file; each host then
    serves its installed files (servers.InstalledFilesServer, as nginx reloaded by the hook
    would), and the role's last step, `certgrab --check --same` over the leader and both
    hosts, passes. A second run changes nothing.
"""

import os
import shutil
import subprocess
import sys

from helpers import ROOT, expected, files_ders, tool
from make_certs import NAME
from servers import InstalledFilesServer

CONTRIB = os.path.join(ROOT, "contrib")
MAN_PAGE = os.path.join(ROOT, "docs", "certgrab.1")
ANSIBLE = os.path.join(CONTRIB, "ansible")
BIN = os.path.dirname(sys.executable)  # the test venv: ansible-playbook, ansible-vault
PLAYBOOK_TIMEOUT = 120  # seconds; a run takes about 15 s on this 2-core machine


def verify_units(*paths, **kw):
    """systemd-analyze verify PATHS (with the drop-ins beside them): (exit code, output).
    man_path: where the man pages of Documentation= are (verify runs man to find them)."""
    completed = subprocess.run([tool("systemd-analyze"), "verify"] + list(paths),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True, timeout=60, cwd=kw.get("cwd"),
                               env=dict(os.environ, MANPATH=kw.get("man_path", "")))
    return completed.returncode, completed.stdout


def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in ("certgrab.service", "certgrab.timer"):
        shutil.copy(os.path.join(CONTRIB, name), str(tmp_path / name))
    (tmp_path / "man" / "man1").mkdir(parents=True)
    shutil.copy(MAN_PAGE, str(tmp_path / "man" / "man1" / "certgrab.1"))
    code, output = verify_units("./certgrab.service", "./certgrab.timer", cwd=str(tmp_path),
                                man_path=str(tmp_path / "man"))
    assert (code, output) == (0, "")


def test_verify_looks_up_the_documentation_man_page(tmp_path):
    """Without the man page, the unit's Documentation= is reported: the check above sees it."""
    shutil.copy(os.path.join(CONTRIB, "certgrab.service"), str(tmp_path / "certgrab.service"))
    (tmp_path / "man").mkdir()
    code, output = verify_units("./certgrab.service", cwd=str(tmp_path),
                                man_path=str(tmp_path / "man"))
    assert "Command 'man certgrab(1)' failed" in output


def test_a_bad_unit_fails_the_same_check(tmp_path):
    """The check above can fail: a misspelt directive is reported."""
    with open(os.path.join(CONTRIB, "certgrab.service")) as f:
        (tmp_path / "certgrab.service").write_text(f.read().replace("PrivateTmp=", "PrivatTmp="))
    code, output = verify_units("./certgrab.service", cwd=str(tmp_path))
    assert "Unknown key 'PrivatTmp'" in output


# Ansible -------------------------------------------------------------------------------------

def test_the_role_passes_ansible_lint(tmp_path):
    """ansible-lint's strictest profile, offline, over site.yml and the role."""
    lint = tool(os.path.join(BIN, "ansible-lint"))
    completed = subprocess.run(
        [lint, "--offline", "--nocolor", "--profile", "production", "site.yml",
         "roles/certgrab"], cwd=ANSIBLE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=PLAYBOOK_TIMEOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, ANSIBLE_HOME=str(tmp_path),
                 PATH=BIN + ":" + os.environ.get("PATH", os.defpath)))
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert "Profile 'production' was required, and it passed" in completed.stdout


INVENTORY = """\
[certgrab]
web1 certgrab_root={root}/web1 certgrab_scheduler=systemd certgrab_check_endpoint=127.0.0.1:{port1}
web2 certgrab_root={root}/web2 certgrab_scheduler=cron certgrab_check_endpoint=127.0.0.1:{port2}

[certgrab:vars]
ansible_connection=local
ansible_become=false
ansible_python_interpreter={python}
certgrab_python={python}
"""

GROUP_VARS = """\
---
certgrab_sources: ["{leader}"]
certgrab_defaults:
  cafile: "{cafile}"
  timeout: "5"
certgrab_check_options: ["--cafile", "{cafile}"]
certgrab_write_dirs: [/var/lib/prometheus/node-exporter]
certgrab_certificates:
  - name: www
    servername: {name}
    key_file: "{vault_key}"
"""


def playbook(tmp_path, inventory):
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "tmp"), ANSIBLE_HOME=str(tmp_path / "home"),
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_GATHERING="explicit",
               ANSIBLE_PIPELINING="1", PATH=BIN + ":" + os.environ.get("PATH", os.defpath))
    return subprocess.run(
        [tool(os.path.join(BIN, "ansible-playbook")), "-i", str(inventory), "--vault-password-file",
         str(tmp_path / "vault-pass"), os.path.join(ANSIBLE, "site.yml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, env=env,
        timeout=PLAYBOOK_TIMEOUT, stdin=subprocess.DEVNULL)


def recap(output):
    """{host: {"ok": n, "changed": n, "failed": n, ...}} from PLAY RECAP."""
    hosts = {}
    for line in output.split("PLAY RECAP", 1)[1].splitlines()[1:]:
        if " : " in line:
            host, counts = line.split(" : ", 1)
            hosts[host.strip()] = dict((k, int(v)) for k, v in
                                       (item.split("=") for item in counts.split()))
    return hosts


def assert_man_certgrab_works(man_path):
    """The role installed docs/certgrab.1 there, and `man certgrab` (that manpath) shows it."""
    page = man_path / "man1" / "certgrab.1"
    with open(MAN_PAGE, "rb") as f:
        assert page.read_bytes() == f.read()
    assert oct(page.stat().st_mode & 0o777) == "0o644"
    completed = subprocess.run([tool("man"), "-M", str(man_path), "certgrab"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60,
                               env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80"))
    assert (completed.returncode, completed.stderr) == (0, "")
    assert "certgrab - fetch the certificate chain a TLS server presents" in completed.stdout


def test_ansible_rollout_to_two_hosts_then_check_same(certs, served, started, tmp_path):
    tool("systemctl")
    leader = served("ec1")
    root = tmp_path / "hosts"
    members = [started(InstalledFilesServer(root / host / "etc/ssl/certgrab/www/fullchain.pem",
                                            root / host / "etc/ssl/private/www.key"))
               for host in ("web1", "web2")]
    (tmp_path / "vault-pass").write_text("correct horse battery staple\n")
    vault_key = tmp_path / "www.key.vault"
    subprocess.run([tool(os.path.join(BIN, "ansible-vault")), "encrypt", "--vault-password-file",
                    str(tmp_path / "vault-pass"), "--output", str(vault_key),
                    str(certs / "ec1" / "key.pem")], check=True, timeout=60,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, ANSIBLE_HOME=str(tmp_path)))
    assert b"$ANSIBLE_VAULT" in vault_key.read_bytes()
    inventory = tmp_path / "inventory" / "hosts.ini"
    (tmp_path / "inventory" / "group_vars").mkdir(parents=True)
    inventory.write_text(INVENTORY.format(root=root, port1=members[0].port,
                                          port2=members[1].port, python=sys.executable))
    (tmp_path / "inventory" / "group_vars" / "certgrab.yml").write_text(GROUP_VARS.format(
        leader=leader.address, cafile=certs / "ec1" / "root.pem", name=NAME,
        vault_key=vault_key))

    first = playbook(tmp_path, inventory)
    assert first.returncode == 0, first.stdout[-6000:]
    assert "Every member serves the leaf the sources serve" in first.stdout
    for host in ("web1", "web2"):
        assert recap(first.stdout)[host]["failed"] == 0
        assert files_ders(root / host / "etc/ssl/certgrab/www") == expected(certs, "ec1")
        key = root / host / "etc/ssl/private/www.key"
        assert key.read_bytes() == (certs / "ec1" / "key.pem").read_bytes()
        assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert all(member.handshakes >= 1 for member in members)   # the group check dialled them

    for host in ("web1", "web2"):
        assert_man_certgrab_works(root / host / "usr/local/share/man")

    web1 = root / "web1"
    assert (web1 / "etc/systemd/system/timers.target.wants/certgrab.timer").is_symlink()
    code, output = verify_units("./certgrab.service", "./certgrab.timer",   # and its drop-in
                                cwd=str(web1 / "etc/systemd/system"),
                                man_path=str(web1 / "usr/local/share/man"))
    assert (code, output) == (0, "")
    with open(str(web1 / "etc/systemd/system/certgrab.service.d/paths.conf")) as f:
        assert "ReadWritePaths=/etc/ssl/certgrab/www /var/lib/prometheus/node-exporter\n" in f.read()
    with open(str(root / "web2" / "etc/cron.d/certgrab")) as f:
        cron = f.read().splitlines()[-1].split()
    assert 0 <= int(cron[0]) <= 59 and cron[1:6] == ["*", "*", "*", "*", "root"]
    assert cron[-3:] == ["/etc/certgrab/certgrab.conf", "--syslog", "-q"]

    again = playbook(tmp_path, inventory)
    assert again.returncode == 0, again.stdout[-6000:]
    assert all(counts["changed"] == 0 for counts in recap(again.stdout).values()), \
        again.stdout[-3000:]
