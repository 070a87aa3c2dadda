"""certgrab.py reads in one direction: every function and class it uses is defined above.

STYLE.md: "Inside a section, helpers come before their callers, as the sections themselves
do: a reader never scrolls down to learn what a call does." These tests walk the file's
syntax tree (nothing of it is run) and name each use of a module-level function or class
defined further down: across sections (the weaker rule), and anywhere at all (the rule the
file keeps). A function that calls itself is the one exception.
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
