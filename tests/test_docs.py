"""README.md, docs/ and the modules' docstrings: every test they cite exists, so a claim backed by "a test shows
it" points at a real test."""

import glob
import os
import re

from conftest import ROOT


def cited_tests(text):
    """(test function names, test file names) named in a text: `test_x` and `tests/test_x.py` / `test_x.py`."""
    names = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", text))
    files = set(re.findall(r"\b(test_[a-z0-9_]+\.py)\b", text))
    return names, files


def test_cited_tests_parse_from_prose():
    names, files = cited_tests("a test (`test_s2_never_sees_the_future`) in tests/test_attention.py; `test_X.py` tests X.py")
    assert names == {"test_s2_never_sees_the_future"} and files == {"test_attention.py"}


def test_every_test_the_readme_and_the_docstrings_cite_exists():
    sources = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
               *sorted(glob.glob(os.path.join(ROOT, "*.py"))), *sorted(glob.glob(os.path.join(ROOT, "longlora", "*.py")))]
    test_files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    defined = set()
    for f in test_files:
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)\(", open(f, encoding="utf-8").read(), re.M))
    missing = []
    for src in sources:
        names, files = cited_tests(open(src, encoding="utf-8").read())
        missing += [f"{os.path.basename(src)}: {n}" for n in sorted(names - defined)]
        missing += [f"{os.path.basename(src)}: tests/{f}" for f in sorted(files - {os.path.basename(t) for t in test_files})]
    assert not missing, missing
