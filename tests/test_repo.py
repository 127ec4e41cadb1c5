import os
import re

from support import ROOT


def test_tests_never_import_conftest_by_name():
    """Several folders have a conftest.py; `from conftest import` picks whichever pytest loaded
    first."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                if re.search(r"^\s*from conftest import|^\s*import conftest", text, re.M):
                    offenders.append(os.path.join(folder, name))
    assert offenders == []
