"""The manual against the code (issue 20). README.md and docs/ state facts that certgrab.py
states too; each such fact is compared here, so that changing one side fails until the other
follows. Every check is a function that returns the problems it found: its test asserts there
are none, and a companion test breaks one fact of the real text and expects the check to say
so (a check that cannot fail would prove nothing).

    1. docs/options.md lists every option of OPTIONS under its group's heading, in --help's
       order, with its metavar, and no option that does not exist
    2. the defaults the docs state (--port, --timeout, --parallel, --hook-timeout,
       --confirm-timeout, --mode, --warn, --crit) are the constants' values
    3. README's exit-code table and its `case $?` example have the docstring's codes
    4. the threshold table of docs/certificates.md is WARN_SHARE and CRIT_SHARE computed
    5. docs/starttls.md's protocols and default ports are STARTTLS's
    6. every relative link in README.md and docs/*.md leads to a file, and to a heading there
    7. docs/development.md names every file of tests/ and every package .ci/run installs
    8. docs/certgrab.1 is what tests/make_man.py makes from certgrab.py now (so an option
       added without `make man` fails here); groff -ww, man -l and lexgrog read it without
       a warning. That the Ansible role installs it: test_rollout.py.
    9. docs/install.md's sandbox names every hardening setting of contrib/certgrab.service
       and no other, and the directories it says the unit may write are the unit's
"""

import os
import re
import subprocess

import make_man
from helpers import ROOT, docstring_exit_codes, tool
from make_certs import DAY
from profiles import renewal_left

DOCS = os.path.join(ROOT, "docs")


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def manual():
    """{name: text} of README.md and every docs/*.md, names relative to the repository."""
    names = ["README.md"] + sorted("docs/" + name for name in os.listdir(DOCS)
                                   if name.endswith(".md"))
    return dict((name, read(name)) for name in names)


def without_code_blocks(text):
    """text with every fenced code block blanked (lines kept, so headings stay headings)."""
    return re.sub(r"^ *```.*?^ *```", lambda block: "\n" * block.group(0).count("\n"), text,
                  flags=re.M | re.S)


def sections(text, level="##"):
    """[(heading, body)] of the headings of this level, outside code blocks."""
    parts = re.split(r"^%s (.+)$" % level, without_code_blocks(text), flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def section(text, heading):
    found = [body for title, body in sections(text) if title == heading]
    assert len(found) == 1, "no single heading '## %s'" % heading
    return found[0]


def flat(text):
    """Whitespace as single spaces, so that a phrase may be wrapped anywhere."""
    return " ".join(text.split())


# ---------------------------------------------------------------- 1. options and their groups

BULLET = re.compile(r"^- \*\*((?:`[^`]+`(?:, )?)+)\*\*", re.M)  # - **`-n`, `--servername NAME`**


def group_heading(title):
    """The heading docs/options.md gives a group of --help: its title up to a ( or :."""
    return re.split(r" \(|:", title)[0].lower()


def documented_options(text):
    """[(heading, flag, metavar shown)] of every option bullet, in the page's order."""
    found = []
    for heading, body in sections(text):
        for lead in BULLET.findall(body):
            for token in re.findall(r"`([^`]+)`", lead):
                flag, _, shown = token.partition(" ")
                found.append((heading.lower(), flag, shown))
    return found


def option_problems(certgrab, text):
    documented = documented_options(text)
    where = {}
    for heading, flag, shown in documented:
        where.setdefault(flag, []).append((heading, shown))
    problems, order = [], []
    for title, options in certgrab.OPTIONS:
        for flags, value, _ in options:
            metavar = "" if value is certgrab.SWITCH else value.rstrip(".")
            for flag in flags:
                order.append(flag)
                places = where.get(flag, [])
                if len(places) != 1:
                    problems.append("%s is documented %d times" % (flag, len(places)))
                    continue
                heading, shown = places[0]
                if heading != group_heading(title):
                    problems.append("%s is under '%s', not under its group '%s'" % (
                        flag, heading, group_heading(title)))
                expected = metavar if flag.startswith("--") else ""
                if shown != expected:
                    problems.append("%s is shown as `%s`, not `%s`" % (
                        flag, " ".join((flag + " " + shown).split()),
                        " ".join((flag + " " + expected).split())))
    problems += ["%s is documented, but certgrab has no such option" % flag
                 for flag in where if flag not in order]
    shown_order = [flag for _, flag, _ in documented if flag in order]
    if not problems and shown_order != order:
        problems.append("the options are not in --help's order: %s" % shown_order)
    headings = [title.lower() for title, _ in sections(text)]
    groups = [group_heading(title) for title, _ in certgrab.OPTIONS]
    if [h for h in headings if h in groups] != groups:
        problems.append("the group headings are not --help's groups in order: %s" % headings)
    return problems


def test_options_reference_lists_every_option_under_its_group(certgrab):
    assert option_problems(certgrab, read("docs/options.md")) == []


def test_options_check_fails_on_a_missing_a_misplaced_and_an_invented_option(certgrab):
    text = read("docs/options.md")
    assert option_problems(certgrab, text.replace("`--ehlo NAME`", "`--helo NAME`")) == [
        "--ehlo is documented 0 times", "--helo is documented, but certgrab has no such option"]
    moved = text.replace("- **`--privkey`**", "- **`--no-privkey`**").replace(
        "- **`--verified-chain`**", "- **`--privkey`**, **`--verified-chain`**")
    assert "--privkey is under 'output', not under its group 'install gate'" in \
        option_problems(certgrab, moved)
    assert option_problems(certgrab, text.replace("`--timeout SECONDS`", "`--timeout N`")) == [
        "--timeout is shown as `--timeout N`, not `--timeout SECONDS`"]


# ---------------------------------------------------------------- 2. defaults

def stated_defaults(certgrab):
    """{option: its default as the docs must write it}, from the constants."""
    return {"--port": "%d" % certgrab.DEFAULT_PORT,
            "--timeout": "%g" % certgrab.DEFAULT_TIMEOUT,
            "--parallel": "%d" % certgrab.DEFAULT_PARALLEL,
            "--hook-timeout": "%g" % certgrab.HOOK_TIMEOUT,
            "--confirm-timeout": "%g" % certgrab.CONFIRM_TIMEOUT,
            "--mode": "%04o" % certgrab.NEW_FILE_MODE,
            "--warn": "%g%%" % (certgrab.WARN_SHARE * 100),
            "--crit": "%g%%" % (certgrab.CRIT_SHARE * 100)}


def default_problems(certgrab, texts):
    """Every "`--opt VALUE`** (default X" anywhere must give the constant's X; the options
    reference must state each default, and --parallel's upper bound."""
    problems = []
    for flag, value in sorted(stated_defaults(certgrab).items()):
        pattern = re.compile(r"`%s(?: [A-Z]+)?`[^`()]{0,24}\(default ([^),;]+)" % flag)
        in_reference = False
        for name, text in sorted(texts.items()):
            for stated in pattern.findall(flat(text)):
                if stated != value:
                    problems.append("%s says %s defaults to %s; the code: %s" % (
                        name, flag, stated, value))
                in_reference |= name == "docs/options.md"
        if not in_reference:
            problems.append("docs/options.md states no default for %s" % flag)
    bound = re.search(r"`--parallel N`\*\* \(default \d+, at most (\d+)\)",
                      flat(texts["docs/options.md"]))
    if not bound or bound.group(1) != "%d" % certgrab.PARALLEL_LIMIT:
        problems.append("docs/options.md does not give --parallel's bound %d" %
                        certgrab.PARALLEL_LIMIT)
    shares = re.search(r"The defaults are shares of each certificate's own lifetime: "
                       r"`--warn (\S+)` and `--crit (\S+)`", flat(texts["docs/certificates.md"]))
    if not shares or shares.groups() != (stated_defaults(certgrab)["--warn"],
                                         stated_defaults(certgrab)["--crit"]):
        problems.append("docs/certificates.md does not give the default shares")
    return problems


def test_the_defaults_the_docs_state_are_the_code_s(certgrab):
    assert default_problems(certgrab, manual()) == []


def test_defaults_check_fails_on_a_stale_default(certgrab):
    defaults, texts = stated_defaults(certgrab), manual()
    hook = defaults["--hook-timeout"]
    texts["docs/install.md"] = texts["docs/install.md"].replace("(default %s;" % hook,
                                                                "(default 1%s;" % hook)
    assert default_problems(certgrab, texts) == [
        "docs/install.md says --hook-timeout defaults to 1%s; the code: %s" % (hook, hook)]
    texts = manual()
    texts["docs/options.md"] = texts["docs/options.md"].replace(
        "`--mode MODE`** (default %s)" % defaults["--mode"], "`--mode MODE`**")
    assert default_problems(certgrab, texts) == ["docs/options.md states no default for --mode"]
    texts = manual()
    texts["docs/certificates.md"] = texts["docs/certificates.md"].replace(
        "`--crit %s`" % defaults["--crit"], "`--crit 1%s`" % defaults["--crit"])
    assert default_problems(certgrab, texts) == [
        "docs/certificates.md does not give the default shares"]


# ---------------------------------------------------------------- 3. exit codes

def exit_code_problems(certgrab, readme):
    text = section(readme, "Exit codes")
    codes = docstring_exit_codes(certgrab)
    table = dict(re.findall(r"^\| (\d) \| (.+) \|$", text, re.M))
    problems = []
    if sorted(table) != sorted(codes):
        problems.append("README's table has codes %s; the docstring %s" % (
            " ".join(sorted(table)), " ".join(sorted(codes))))
    for code in sorted(set(table) & set(codes)):
        if not table[code].startswith(codes[code] + ":") and \
                not table[code].startswith(codes[code] + " ("):
            problems.append("README's code %s does not begin with the docstring's '%s:'" % (
                code, codes[code]))
    example = re.search(r"^```sh\n(.*?)^```", readme_exit_section(readme), re.M | re.S)
    labels = re.findall(r"^\s+(\d|\*)\)", example.group(1), re.M) if example else []
    if sorted(label for label in labels if label != "*") != sorted(codes) or "*" not in labels:
        problems.append("the `case $?` example handles %s; the docstring has %s, and * for a "
                        "crash" % (" ".join(labels), " ".join(sorted(codes))))
    plugin = ", ".join("%d %s" % pair for pair in enumerate(certgrab.NAGIOS))
    if plugin not in flat(text):
        problems.append("README does not give the plugin's codes '%s'" % plugin)
    return problems


def readme_exit_section(readme):
    """The Exit codes section with its code blocks (section() blanks them)."""
    return readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]


def test_readme_exit_codes_are_the_docstring_s(certgrab):
    assert exit_code_problems(certgrab, read("README.md")) == []


def test_exit_code_check_fails_on_a_missing_code(certgrab):
    """README without its row for 6, then without the case label 6, then with code 3 worded
    otherwise: each is reported (the lists are the docstring's, whatever they hold)."""
    readme, codes = read("README.md"), sorted(docstring_exit_codes(certgrab))
    without_6 = " ".join(code for code in codes if code != "6")
    row = re.search(r"^\| 6 \|.*\n", readme, re.M).group(0)
    assert exit_code_problems(certgrab, readme.replace(row, "")) == [
        "README's table has codes %s; the docstring %s" % (without_6, " ".join(codes))]
    case = re.search(r"^    6\) .*\n", readme, re.M).group(0)
    assert exit_code_problems(certgrab, readme.replace(case, "")) == [
        "the `case $?` example handles %s *; the docstring has %s, and * for a crash" % (
            without_6, " ".join(codes))]
    reworded = readme.replace("| 3 | %s:" % docstring_exit_codes(certgrab)["3"], "| 3 | no fetch:")
    assert exit_code_problems(certgrab, reworded) == [
        "README's code 3 does not begin with the docstring's '%s:'" %
        docstring_exit_codes(certgrab)["3"]]


# ---------------------------------------------------------------- 4. the threshold table

def threshold_table(text):
    """{lifetime in days: (renews, warn, crit)} of docs/certificates.md's table."""
    rows = re.findall(r"^\| (\d+) days \| (.+?) left \| (.+?) left \| (.+?) left \|$",
                      section(text, "Short-lived certificates"), re.M)
    return dict((int(days), (renews, warn, crit)) for days, renews, warn, crit in rows)


def computed_thresholds(certgrab):
    """Each row from certgrab's default shares and its own wording of a span."""
    expected = {}
    for days in (6, 45, 90, 200):
        leaf = certgrab.Certificate(b"")
        leaf.not_after = days * DAY
        expected[days] = tuple(certgrab.format_span(seconds) for seconds in (
            renewal_left(leaf.lifetime),
            certgrab.threshold_seconds((certgrab.WARN_SHARE, True), leaf),
            certgrab.threshold_seconds((certgrab.CRIT_SHARE, True), leaf)))
    return expected


def test_threshold_table_is_what_the_code_does(certgrab):
    assert threshold_table(read("docs/certificates.md")) == computed_thresholds(certgrab)


def test_threshold_table_check_fails_on_a_stale_row(certgrab):
    stale = read("docs/certificates.md").replace("| 14 hours left |", "| 1 day left |")
    assert threshold_table(stale) != computed_thresholds(certgrab)


# ---------------------------------------------------------------- 5. STARTTLS

def starttls_ports(text):
    return dict((name, int(port)) for name, port in
                re.findall(r"^\| `([a-z0-9-]+)` \| (\d+) \|", section(text, "Protocols"), re.M))


def test_starttls_protocols_and_ports_are_the_code_s(certgrab):
    assert starttls_ports(read("docs/starttls.md")) == dict(
        (name, port) for name, (_, port) in certgrab.STARTTLS.items())


def test_starttls_check_fails_on_a_wrong_port(certgrab):
    wrong = read("docs/starttls.md").replace("| `smtp` | 25 |", "| `smtp` | 587 |")
    assert starttls_ports(wrong)["smtp"] == 587 != certgrab.STARTTLS["smtp"][1]


# ---------------------------------------------------------------- 6. links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(text):
    """GitHub's anchors for the headings of text: lower case, punctuation dropped, spaces
    as dashes, -1, -2 ... for repeats."""
    found = []
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeats = found.count(slug) + len([a for a in found if a.startswith(slug + "-")
                                           and a[len(slug) + 1:].isdigit()])
        found.append(slug if not repeats else "%s-%d" % (slug, repeats))
    return found


def link_problems(texts):
    problems = []
    for name, text in sorted(texts.items()):
        prose = re.sub(r"`[^`\n]*`", "", without_code_blocks(text))   # code shows no links
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target):
                continue                                        # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path \
                else name
            if not os.path.exists(os.path.join(ROOT, resolved)):
                problems.append("%s: %s: no such file" % (name, target))
            elif anchor and anchor not in anchors(texts.get(resolved) or read(resolved)):
                problems.append("%s: %s: no such heading in %s" % (name, target, resolved))
    return problems


def test_every_link_leads_to_a_file_and_a_heading():
    assert link_problems(manual()) == []


def test_link_check_fails_on_a_broken_anchor_and_a_missing_file():
    texts = manual()
    texts["README.md"] = texts["README.md"].replace("](#key-rollover)", "](#key-rolover)", 1)
    texts["docs/fleet.md"] = texts["docs/fleet.md"].replace("](config.md)", "](conf.md)", 1)
    assert link_problems(texts) == ["README.md: #key-rolover: no such heading in README.md",
                                    "docs/fleet.md: conf.md: no such file"]


def test_anchors_are_github_s():
    assert anchors("# A\n## `--prometheus`: metrics for node_exporter\n```\n# no\n```\n## A\n") \
        == ["a", "--prometheus-metrics-for-node_exporter", "a-1"]


# ---------------------------------------------------------------- 7. development and CI

def ci_packages(run_script):
    """The Debian packages .ci/run installs: its PACKAGES and DAEMONS lists."""
    lists = re.findall(r'^(?:PACKAGES|DAEMONS)="([^"]*)"', run_script, re.M)
    return set(" ".join(lists).split())


def development_problems(text, run_script, test_files):
    problems = ["docs/development.md does not name tests/%s" % name for name in sorted(test_files)
                if not re.search(r"(?<![\w.-])%s(?![\w.-])" % re.escape(name), text)]
    ci = re.search(r"^- \*\*CI\*\*:(.*?)(?=^- |\Z)", text, re.M | re.S).group(1)
    named = set(word for word in re.findall(r"`([^`]+)`", ci)
                if re.match(r"^[a-z0-9][a-z0-9.+-]*$", word))
    if named != ci_packages(run_script):
        problems.append("docs/development.md's CI packages differ from .ci/run's: "
                        "only in the docs %s, only in .ci/run %s" % (
                            sorted(named - ci_packages(run_script)),
                            sorted(ci_packages(run_script) - named)))
    return problems


def files_in_tests():
    return [name for name in os.listdir(os.path.join(ROOT, "tests"))
            if not name.startswith((".", "__"))]


def test_development_names_every_test_file_and_ci_package():
    assert development_problems(read("docs/development.md"), read(".ci/run"), files_in_tests()) == []


def test_development_check_fails_on_a_new_file_and_a_new_package():
    run_script = read(".ci/run").replace('PACKAGES="openssl ', 'PACKAGES="openssl jq ')
    assert development_problems(read("docs/development.md"), run_script,
                                files_in_tests() + ["test_new.py"]) == [
        "docs/development.md does not name tests/test_new.py",
        "docs/development.md's CI packages differ from .ci/run's: only in the docs [], "
        "only in .ci/run ['jq']"]


def test_development_check_wants_the_name_itself_not_a_longer_one():
    """helpers.py is not named by a line that names old_helpers.py."""
    text = read("docs/development.md").replace("tests/helpers.py ", "tests/old_helpers.py ")
    assert development_problems(text, read(".ci/run"), ["helpers.py", "grow.py"]) == [
        "docs/development.md does not name tests/helpers.py"]


# ---------------------------------------------------------------- 8. the man page

MAN_PAGE = os.path.join(ROOT, "docs", "certgrab.1")


def test_man_page_is_what_make_man_makes_now():
    assert read("docs/certgrab.1") == make_man.man_page(), \
        "docs/certgrab.1 is out of date: run `make man` and commit it"


def test_man_page_check_fails_when_an_option_is_added(certgrab, monkeypatch):
    title, group = certgrab.OPTIONS[-1]
    new = (("--new-switch",), certgrab.SWITCH, "a switch added without make man")
    monkeypatch.setattr(certgrab, "OPTIONS", certgrab.OPTIONS[:-1] + ((title, group + (new,)),))
    page = make_man.man_page()
    assert page != read("docs/certgrab.1")
    assert "\\fB\\-\\-new\\-switch\\fR\na switch added without make man\n" in page


def groff_warnings(path):
    """What groff says about the page with every warning on (-ww), formatting nothing (-z)."""
    completed = subprocess.run([tool("groff"), "-man", "-ww", "-z", path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
    return completed.returncode, completed.stderr


def test_groff_finds_nothing_to_warn_about():
    assert groff_warnings(MAN_PAGE) == (0, "")


def test_groff_check_fails_on_a_broken_page(tmp_path):
    broken = tmp_path / "certgrab.1"
    broken.write_text(read("docs/certgrab.1").replace(".SH EXAMPLES\n", ".SH EXAMPLES\n.EXAMPLE\n"))
    code, warnings = groff_warnings(str(broken))
    assert "macro 'EXAMPLE' not defined" in warnings


def test_man_renders_every_option_and_the_exit_codes(certgrab):
    """man -l, as a user reads the page: no warning, every option, every exit code."""
    completed = subprocess.run(
        [tool("man"), "--warnings", "-l", MAN_PAGE], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
        env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80", LC_ALL="C.UTF-8"))
    assert (completed.returncode, completed.stderr) == (0, "")
    page = completed.stdout
    for _, options in certgrab.OPTIONS:
        for flags, value, _ in options:
            shown = ", ".join(flags) + ("" if value is certgrab.SWITCH else " " + value.rstrip("."))
            assert re.search(r"^       %s(\n| +\S)" % re.escape(shown), page, re.M), shown
    exit_status = re.split(r"\n\n(?=\S)", page.split("\nEXIT STATUS\n", 1)[1], 1)[0]
    assert re.findall(r"^       (\d)  ", exit_status, re.M) == sorted(docstring_exit_codes(certgrab))
    for name, (_, port) in certgrab.STARTTLS.items():
        assert re.search(r"^       %s +port %d$" % (name, port), page, re.M), name


def test_the_page_has_a_name_line_for_whatis():
    """lexgrog reads the NAME section as mandb will, so `man -k certgrab` finds the page."""
    completed = subprocess.run([tool("lexgrog"), MAN_PAGE], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert completed.returncode == 0, completed.stdout
    assert '"certgrab - fetch the certificate chain' in completed.stdout


# ---------------------------------------------------------------- 9. the systemd sandbox

UNIT = os.path.join(ROOT, "contrib", "certgrab.service")
NOT_HARDENING = {"Type", "ExecStart", "TimeoutStartSec", "UMask", "ReadWritePaths",
                 "CacheDirectory"}
LEFT_OUT = {"MemoryDenyWriteExecute"}   # named in the docs as left out, with the reason
DIRECTIVE = re.compile(r"`((?:No|Private|Protect|Restrict|Lock|SystemCall|MemoryDeny)[A-Za-z]*)")


def unit_settings(text):
    """{key: value} of the [Service] section of a unit file."""
    service = re.split(r"^\[Service\]$", text, flags=re.M)[1].split("\n[", 1)[0]
    return dict(line.split("=", 1) for line in service.splitlines()
                if line and not line.startswith("#"))


def sandbox_problems(unit, install_md):
    settings = unit_settings(unit)
    body = flat(section(install_md, "Under systemd: the sandbox"))
    hardening = set(settings) - NOT_HARDENING
    named = set(DIRECTIVE.findall(body)) - LEFT_OUT
    problems = ["the unit sets %s, the docs do not name it" % key for key in sorted(hardening - named)]
    problems += ["the docs name %s, the unit does not set it" % key for key in sorted(named - hardening)]
    writable = [settings["ReadWritePaths"].lstrip("-"), "/var/cache/" + settings["CacheDirectory"]]
    problems += ["the docs do not say that the unit may write %s" % path for path in writable
                 if "`%s`" % path not in body]
    return problems


def test_the_sandbox_the_docs_describe_is_the_unit_s():
    assert sandbox_problems(read("contrib/certgrab.service"), read("docs/install.md")) == []


def test_sandbox_check_fails_on_a_new_setting_and_a_moved_cache():
    unit = read("contrib/certgrab.service")
    changed = unit.replace("LockPersonality=yes\n", "LockPersonality=yes\nProtectProc=invisible\n")
    changed = changed.replace("CacheDirectory=certgrab", "CacheDirectory=certs")
    assert sandbox_problems(changed, read("docs/install.md")) == [
        "the unit sets ProtectProc, the docs do not name it",
        "the docs do not say that the unit may write /var/cache/certs"]
    assert sandbox_problems(unit, read("docs/install.md").replace("`RestrictRealtime`, ", "")) == [
        "the unit sets RestrictRealtime, the docs do not name it"]
