#!/usr/bin/env python3
"""Make certgrab's man page, docs/certgrab.1, from certgrab.py itself (issue 20).

    python3 tests/make_man.py                    print the page on stdout
    python3 tests/make_man.py docs/certgrab.1    write it there (make man)

Everything the page states comes from certgrab.py, read the way --help reads it: the
summary and the description (DESCRIPTION, and the docstring's opening paragraph), the
synopsis (USAGE), every option in the groups and the order of --help with its metavar and
its help text, defaults filled in (OPTIONS, as build_parser uses it), the --starttls
protocols and their ports (STARTTLS), the examples (EXAMPLES), and the security model and
the exit codes of the module docstring (as epilog() takes them). Only the SEE ALSO section
is written here. tests/test_docs.py fails while docs/certgrab.1 differs from what this
script makes now, so an option added without `make man` is noticed.
"""

import os
import re
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, ROOT)

import certgrab  # noqa: E402  (needs the path above)

WIDTH = 78  # characters per line of the page's source; man fills the text itself
SEE_ALSO = ("openssl(1)", "certbot(1)", "systemd.timer(5)", "crontab(5)")


def escape(text):
    """roff text: a backslash shows as \\e, every - as \\- (an option's dash, which
    man-db renders as ASCII), and a line may not begin with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def paragraph(text):
    """Plain text as filled roff lines: wrapped here for a readable source, escaped."""
    lines = textwrap.wrap(" ".join(text.split()), WIDTH, break_on_hyphens=False,
                          break_long_words=False)
    return [escape(line) for line in lines]


def docstring_section(title):
    """The lines of one section of the module docstring (indented, up to a blank line or
    the end), as epilog() takes the exit codes."""
    block = certgrab.__doc__.split("\n%s\n" % title, 1)[1]
    return block.split("\n\n", 1)[0].rstrip("\n").split("\n")


def items(lines, start):
    """[(head, text)] of lines where each item begins with the pattern start (its head in
    group 1) and goes on over the lines indented deeper; other lines make items with head None."""
    found = []
    for line in lines:
        match = re.match(start, line)
        if match:
            found.append([match.group(1), line[match.end():].strip()])
        elif found and found[-1][0] is not None and line.startswith("      "):
            found[-1][1] += " " + line.strip()
        elif found and found[-1][0] is None:
            found[-1][1] += " " + line.strip()
        else:
            found.append([None, line.strip()])
    return [tuple(item) for item in found]


def header():
    summary = certgrab.DESCRIPTION.split("\n", 1)[0].rstrip(".")
    return [".\\\" certgrab.1: made by tests/make_man.py from certgrab.py; run `make man`, "
            "do not edit.",
            '.TH CERTGRAB 1 "" "certgrab %s" "User Commands"' % certgrab.__version__,
            ".nh", ".ad l",                     # option names are never hyphenated or stretched
            ".SH NAME",
            "certgrab \\- " + escape(summary[0].lower() + summary[1:])]


def synopsis():
    program, arguments = certgrab.USAGE.split(" ", 1)
    return [".SH SYNOPSIS", ".B " + escape(program), escape(arguments)]


def description():
    why = certgrab.__doc__.split("\n\n")[1]
    rest = certgrab.DESCRIPTION.split("\n", 1)[1].strip("\n").split("\n\n")
    lines = [".SH DESCRIPTION"]
    for text in [why] + rest:
        lines += [".PP"] + paragraph(text)
    return lines


def option_tag(flags, value):
    """The .TP tag of an option: its flags in bold, its metavar in italics."""
    tag = ", ".join("\\fB%s\\fR" % escape(flag) for flag in flags)
    if value is not certgrab.SWITCH:
        tag += " \\fI%s\\fR" % escape(value.rstrip("."))
    return tag


def options():
    lines = [".SH OPTIONS"]
    for title, group in certgrab.OPTIONS:
        lines += [".SS " + escape(title[0].upper() + title[1:])]
        for flags, value, text in group:
            lines += [".TP", option_tag(flags, value)] + paragraph(text % {})  # argparse's %%
    return lines


def protocols():
    lines = [".SH STARTTLS PROTOCOLS"] + paragraph(
        "--starttls PROTOCOL talks the protocol's plaintext opening, then starts TLS on the "
        "same connection; a SOURCE without a port gets the protocol's default port:")
    lines += [".PP", ".PD 0"]
    for name in sorted(certgrab.STARTTLS):
        lines += [".TP 18", "\\fB%s\\fR" % escape(name), "port %d" % certgrab.STARTTLS[name][1]]
    return lines + [".PD"]


def exit_status():
    lines = [".SH EXIT STATUS"]
    for code, text in items(docstring_section("Exit codes"), r"^    (\d)  "):
        lines += ([".TP", "\\fB%s\\fR" % code] if code else [".PP"]) + paragraph(text)
    return lines


def security():
    lines = [".SH SECURITY"]
    for _, text in items(docstring_section("Security model"), r"^    (-) "):
        lines += [".IP \\(bu 2"] + paragraph(text)
    return lines


def examples():
    lines = [".SH EXAMPLES", ".nf"]
    lines += [escape(line.strip()) for line in certgrab.EXAMPLES.split("\n")[1:]]
    return lines + [".fi"]


def see_also():
    lines = [".SH SEE ALSO"] + paragraph(
        "The full manual is README.md and the docs/ directory of certgrab's source "
        "(docs/README.md lists its pages).")
    lines += [".PP", ",\n".join(".BR %s (%s)" % tuple(page[:-1].split("("))
                                for page in SEE_ALSO)]
    return lines


def man_page():
    """The whole page, as text."""
    lines = []
    for part in (header, synopsis, description, options, protocols, exit_status, security,
                 examples, see_also):
        lines += part()
    return "\n".join(lines) + "\n"


def main(argv):
    page = man_page()
    if len(argv) > 1:
        with open(argv[1], "w") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
