"""Smoke tests: every example under examples/ runs end to end, with the command its row
of examples/README.md gives, exactly as written (``.venv/bin/...`` being this test run's
virtualenv)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_README = ROOT / "examples" / "README.md"


def readme_commands(name: str) -> list[str]:
    """The shell commands in the "run" column of ``name``'s row of examples/README.md."""
    for line in EXAMPLES_README.read_text().splitlines():
        if line.startswith(f"| [`{name}/`]({name}/) |"):
            run_column = line.rstrip(" |").rsplit(" | ", 1)[1]
            return re.findall(r"`([^`]+)`", run_column)
    raise AssertionError(f"examples/README.md has no row for {name}/")


def run_example(name: str, timeout: float = 120) -> str:
    """Run ``name``'s README command from the repository root; return its output.

    The README's set-up (``python3 -m venv .venv && .venv/bin/pip install -e .``) makes a
    ``.venv`` and activates nothing, so every step must name the virtualenv's programs;
    here ``.venv/bin/python`` is this test run's interpreter. ``pip install`` steps are the
    test extra's, already installed.
    """
    script = f"examples/{name}/app.py"
    ran_script = False
    for command in readme_commands(name):
        for step in command.split("&&"):
            argv = shlex.split(step)
            assert argv[0].startswith(".venv/bin/"), f"{step.strip()!r} does not run from .venv"
            if argv[0] == ".venv/bin/pip":
                assert argv[1] == "install", step
            elif argv[0] == ".venv/bin/flask":
                assert (ROOT / argv[argv.index("--app") + 1]).is_file(), step
            else:
                assert argv == [".venv/bin/python", script], step
                ran_script = True
    assert ran_script, f"no `.venv/bin/python {script}` in {name}'s row"
    result = subprocess.run(
        [sys.executable, script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_demo_runs_and_each_task_sees_its_own_context() -> None:
    out = run_example("demo")
    assert "thread task for alice: mailed alice@example.com from /signup" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "'SECRET_KEY in worker': None" in out
    assert "done: every task saw its own request, g and config." in out


@pytest.mark.slow
def test_dask_demo_runs_the_same_app_on_a_cluster() -> None:
    out = run_example("dask_demo", timeout=180)
    assert "2. dask pool" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "done: every task saw its own request, g and config." in out


def test_every_example_has_its_folder_readme_and_row() -> None:
    examples = ROOT / "examples"
    folders = sorted(p.name for p in examples.iterdir() if p.is_dir())
    assert folders == ["dask_demo", "demo", "progress", "quickstart", "sqlalchemy_factory"]
    for name in folders:
        assert (examples / name / "README.md").is_file(), name
        assert (examples / name / "app.py").is_file(), name
        assert readme_commands(name), name
    # No bare scripts beside the folders.
    assert sorted(p.name for p in examples.iterdir() if p.is_file()) == ["README.md"]


@pytest.mark.slow
def test_quickstart_tasks_see_the_form_and_g() -> None:
    out = run_example("quickstart")
    assert "send_email saw: form email=alice@example.com, g.user=alice, path=/signup" in out
    assert "view answered: Welcome! Check your inbox." in out
    assert "poll: done" in out
    assert "'requested by': 'bob'" in out and "'year': 2024" in out
    assert out.rstrip().endswith("done.")


@pytest.mark.slow
def test_progress_updates_arrive_while_the_job_runs() -> None:
    out = run_example("progress")
    assert "GET / has a <progress> bar" in out
    running = re.findall(r"^\s+running\s+progress=([\d.]+)", out, flags=re.MULTILINE)
    assert len(set(running)) >= 3, out
    assert all(0 <= float(value) < 1 for value in running), out
    assert re.search(r"^\s+finished\s+progress=1\.0 \(done\)$", out, flags=re.MULTILINE), out
    assert out.index("running") < out.index("finished")
    assert "state: finished" in out
    assert "result: 285" in out


@pytest.mark.slow
def test_sqlalchemy_factory_workers_use_db_session() -> None:
    out = run_example("sqlalchemy_factory")
    assert "POST /reports/eu: {'grand_total': 245, 'reports': 1," in out
    assert "POST /reports/us: {'grand_total': 545, 'reports': 2," in out
    web_pid = re.search(r"web process \(pid (\d+)\)", out)
    rows = re.findall(r"^  (\w+): total=(\d+), written by pid (\d+)$", out, flags=re.MULTILINE)
    assert web_pid and [row[:2] for row in rows] == [("eu", "245"), ("us", "300")], out
    assert all(pid != web_pid.group(1) for _, _, pid in rows), out


def test_gitignore_ignores_no_example() -> None:
    # The shape of .gitignore's patterns (directory names, globs), matched as git does
    # against any path component or the whole relative path.
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    files = [p.relative_to(ROOT) for p in (ROOT / "examples").rglob("*") if p.is_file()]
    shipped = [f for f in files if "__pycache__" not in f.parts]
    assert shipped
    for path in shipped:
        for pattern in patterns:
            hit = fnmatch.fnmatch(str(path), pattern.lstrip("/")) or any(
                fnmatch.fnmatch(part, pattern) for part in path.parts
            )
            assert not hit, f".gitignore pattern {pattern!r} ignores {path}"
