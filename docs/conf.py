"""Sphinx configuration for the flask-executor documentation."""

from importlib.metadata import version as distribution_version

project = "flask-executor"
copyright = "flask-executor contributors"
author = "flask-executor contributors"
release = distribution_version("flask-executor")
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

# No intersphinx: the docs build without network access.
nitpicky = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

root_doc = "index"
exclude_patterns = ["_build"]
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"flask-executor {version}"
html_theme_options = {
    "description": (
        "Flask background tasks in threads, processes or a Dask cluster, with the Flask context."
    ),
}
