"""The demo app of ``demo.py`` with its reports on a Dask cluster.

Nothing in the app or its tasks changes: only ``REPORTS_EXECUTOR_TYPE`` is
``'dask'``. With no ``REPORTS_EXECUTOR_DASK_ADDRESS`` an embedded
``LocalCluster`` (two single-threaded worker processes) starts on the first
submit and closes at shutdown; set the address to use a real cluster.

Needs the extra: ``pip install 'flask-executor[dask]'``. Run it with
``python examples/dask_demo.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DEMO_REPORTS_BACKEND", "dask")

import demo  # noqa: E402  (reads the variable above when it builds the app)

if __name__ == "__main__":
    demo.main()
