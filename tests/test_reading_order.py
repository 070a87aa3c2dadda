"""certgrab.py is read once and trusted (issue 20): these tests walk its syntax tree.

- One reading direction. STYLE.md: "Inside a section, helpers come before their callers,
  as the sections themselves do: a reader never scrolls down to learn what a call does."
  Each use of a module-level function or class defined further down is named: across
  sections (the weaker rule), and anywhere at all (the rule the file keeps). A function
  that calls itself is the one exception.
- Settings are declared in one place, each field once, and every field is read.
- No decision reads the text of a message: comparisons and prefix tests go by codes,
  kinds and classes, never by what str(exc) or a message says.
"""

import ast
import os
import re

import pytest

CERTGRAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "certgrab.py")
BANNER = re.compile(r"# -{20,}\n# (.+)\n(?:#.*\n)*?# -{20,}\n")


def read_source(path=CERTGRAB):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def sections(source):
    """[(first line, title)] of the banner-commented sections, in file order."""
    return [(source.count("\n", 0, match.start()) + 1, match.group(1).split(":")[0])
            for match in BANNER.finditer(source)]


def section_of(line, banners):
    """The index of the section that holds line (-1: above the first banner)."""
    return sum(1 for start, _ in banners if start <= line) - 1


def _bound_names(node):
    """Names a definition binds inside itself (parameters, assignments, nested
    definitions, loop and comprehension targets): a use of one is no module-level use."""
    bound = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.arg):
            bound.add(inner.arg)
        elif isinstance(inner, ast.Name) and not isinstance(inner.ctx, ast.Load):
            bound.add(inner.id)
        elif isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and inner is not node:
            bound.add(inner.name)
        elif isinstance(inner, ast.ExceptHandler) and inner.name:
            bound.add(inner.name)
        elif isinstance(inner, ast.alias):
            bound.add((inner.asname or inner.name).split(".")[0])
    return bound


def uses(source):
    """[(user, its line, used, its line)] for every module-level function or class that
    a module-level function or class (its methods included) names, itself aside."""
    tree = ast.parse(source)
    defined = dict((node.name, node.lineno) for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        local, seen = _bound_names(node), set()
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load) and \
                    inner.id in defined and inner.id != node.name and \
                    inner.id not in local and inner.id not in seen:
                seen.add(inner.id)
                found.append((node.name, node.lineno, inner.id, defined[inner.id]))
    return found


def later_sections(source):
    """Uses of a function or class that a later section defines."""
    banners = sections(source)
    return ["%s (line %d, %s) uses %s (line %d, %s)" % (
        user, line, banners[section_of(line, banners)][1], used, where,
        banners[section_of(where, banners)][1])
        for user, line, used, where in uses(source)
        if section_of(where, banners) > section_of(line, banners)]


def further_down(source):
    """Uses of a function or class defined below its user, anywhere in the file."""
    return ["%s (line %d) uses %s (line %d)" % use for use in uses(source)
            if use[3] > use[1]]


def test_no_section_uses_a_later_one():
    assert later_sections(read_source()) == []


def test_every_helper_is_defined_above_its_caller():
    assert further_down(read_source()) == []


def test_the_sections_are_found():
    """The banners this test goes by are there, in the order STYLE.md gives."""
    titles = [title for _, title in sections(read_source())]
    assert titles[:3] == ["Compatibility", "Constants", "Errors and messages"]
    assert titles[-1] == "The run"
    assert len(titles) >= 10


def test_a_use_further_down_is_found():
    """The walk itself: a call down, a class used as a value, and recursion, which is allowed."""
    source = ("# %s\n# First\n# %s\n"
              "def top():\n    return helper() + [Later]\n\n"
              "def again(n):\n    return again(n - 1) if n else 0\n\n"
              "# %s\n# Second\n# %s\n"
              "def helper():\n    return []\n\n"
              "class Later(object):\n    pass\n") % (("-" * 30,) * 4)
    assert further_down(source) == ["top (line 4) uses helper (line 13)",
                                    "top (line 4) uses Later (line 16)"]
    assert later_sections(source) == [
        "top (line 4, First) uses helper (line 13, Second)",
        "top (line 4, First) uses Later (line 16, Second)"]


# Settings: declared in one place, each field read ---------------------------------------------

def settings_fields(tree):
    """The fields Settings declares (its __slots__), in order."""
    settings = next(node for node in tree.body
                    if isinstance(node, ast.ClassDef) and node.name == "Settings")
    return next(ast.literal_eval(statement.value) for statement in settings.body
                if isinstance(statement, ast.Assign)
                and statement.targets[0].id == "__slots__")


def settings_read(tree):
    """The attributes read from something called settings (settings.X, section.settings.X)."""
    return set(node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
               and (isinstance(node.value, ast.Name) and node.value.id == "settings"
                    or isinstance(node.value, ast.Attribute) and node.value.attr == "settings"))


def test_every_setting_is_declared_once_and_read():
    tree = ast.parse(read_source())
    fields = settings_fields(tree)
    assert len(set(fields)) == len(fields)
    assert [field for field in fields if field not in settings_read(tree)] == []
    assert sorted(settings_read(tree) - set(fields)) == []      # nothing read is undeclared


def test_settings_take_every_field_and_no_other(certgrab):
    parser = certgrab.build_parser()
    args, sources = certgrab.parse_command_line(parser, ["127.0.0.1"])
    settings = certgrab.validate_settings(args, sources, certgrab.Reporter())
    values = dict((field, getattr(settings, field)) for field in certgrab.Settings.__slots__)
    with pytest.raises(TypeError):
        certgrab.Settings(**dict(values, unread=1))
    del values["timeout"]
    with pytest.raises(TypeError):
        certgrab.Settings(**values)


# Decisions read data: codes, kinds, classes; never the text made for people -----------------

TEXT_CALLS = ("str", "ssl_reason", "printable")   # what turns an exception or data into text
TEXT_NAMES = ("message", "lower", "trust", "detail", "verify_error", "hint")
# A variable called reason holds OpenSSL's words; SSLError.reason is a code (HTTP_REQUEST).
TEXT_VARIABLES = TEXT_NAMES + ("reason",)
# An outcome is a code, compared whole: a prefix of one is a prefix of its text.
PREFIXED = ("outcome",)


def _is_text(node, names=()):
    """True for an expression that holds text for people: a call that makes it, or a name
    (or attribute) that STYLE.md's rule keeps out of decisions (and one of names)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in TEXT_CALLS
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
            node.func.attr == "lower":
        return _is_text(node.func.value, names)
    if isinstance(node, ast.Name):
        return node.id in TEXT_VARIABLES + names
    return isinstance(node, ast.Attribute) and node.attr in TEXT_NAMES


def decisions_on_text(source):
    """[line] of each comparison (==, !=, in, not in) or startswith/endswith whose subject
    is text for people: what STYLE.md calls deciding on message text."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            if any(_is_text(side) for side in [node.left] + node.comparators):
                found.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith") and \
                _is_text(node.func.value, PREFIXED):
            found.append(node.lineno)
    return sorted(found)


def test_no_decision_reads_the_text_of_a_message():
    source = read_source()
    assert ["%d: %s" % (line, source.splitlines()[line - 1].strip())
            for line in decisions_on_text(source)] == []


def test_deciding_on_text_is_found():
    """The walk itself, on the kinds of line the rule is about."""
    source = ('keys = [key for key in options if "--" + key in str(exc)]\n'
              'notice = outcome.startswith("installed")\n'
              'system = trust == "the system store"\n'
              'name = "match" in reason.lower() or "match" in lower\n'
              'fine = exc.reason in NOT_TLS_REASONS and problem.code in CHECK_WARNS\n')
    assert decisions_on_text(source) == [1, 2, 3, 4, 4]
