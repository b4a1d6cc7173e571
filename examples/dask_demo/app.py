"""The demo app of ``examples/demo/app.py`` with its reports on a Dask cluster.

Nothing in the app or its tasks changes: only ``REPORTS_EXECUTOR_TYPE`` is
``'dask'``. With no ``REPORTS_EXECUTOR_DASK_ADDRESS`` an embedded
``LocalCluster`` (two single-threaded worker processes) starts on the first
submit and closes at shutdown; set the address to use a real cluster.

Needs the extra: ``.venv/bin/pip install -e '.[dask]'``. Run it with
``.venv/bin/python examples/dask_demo/app.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DEMO_REPORTS_BACKEND", "dask")
# The demo's module, importable here and (Dask workers get this sys.path) on the workers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demo"))

import app as demo  # noqa: E402  (reads the variable above when it builds the app)

if __name__ == "__main__":
    demo.main()
