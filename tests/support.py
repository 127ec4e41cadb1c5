"""Paths shared by tests (importable as `support` through pytest.ini's pythonpath)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
