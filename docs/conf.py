"""Sphinx configuration: `sphinx-build docs docs/_build`."""

project = "delivery"
author = "the delivery developers"
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build", "examples"]
html_theme = "alabaster"
