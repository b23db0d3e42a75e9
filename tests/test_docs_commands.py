"""Every docs/ page starts with a command that runs as written on a fresh clone after
`make setup`: the first command of each page's first ```bash block (comments dropped,
backslash continuations joined) is run in a copy of the repository's files (tracked and
untracked, not ignored) with the set-up virtual environment first on PATH. The README's first
screen holds the set-up, main-job and test commands and the map of what comes next."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DOCS = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def first_command(markdown: str) -> str:
    block = re.search(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, re.M | re.S)
    assert block, "no ```bash block"
    lines, command = block.group(1).splitlines(), ""
    for line in lines:
        if not command and (not line.strip() or line.lstrip().startswith("#")):
            continue
        command += line.rstrip()
        if command.endswith("\\"):
            command = command[:-1] + " "
            continue
        return command
    raise AssertionError("the block holds no command")


def test_first_command_is_read_from_the_first_bash_block():
    page = "# T\n\n```\ndiagram\n```\n\n```bash\n# a comment\npython a.py --x 1 \\\n  --y 2\npython b.py\n```\n"
    assert first_command(page) == "python a.py --x 1    --y 2"


def test_readme_first_screen_has_the_commands_and_the_map():
    screen = "\n".join(open(os.path.join(ROOT, "README.md")).read().splitlines()[:40])
    for command in ("make setup", "make demo", "make test"):
        assert re.search(rf"^{command}\b", screen, re.M), command
    for task in ("train", "tune exits", "convert", "serve", "evaluate", "benchmark"):
        assert re.search(rf"^\| {task}", screen, re.M), task
    for page in DOCS + ["gpu.md", "serving.md", "early_exit_decoding.md"]:
        assert f"(docs/{page})" in screen, page


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The repository's files as a clone would have them, with the set-up .venv."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in files:
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
            shutil.copy2(source, os.path.join(root, name))
    if os.path.exists(os.path.join(ROOT, ".venv")):
        os.symlink(os.path.realpath(os.path.join(ROOT, ".venv")), os.path.join(root, ".venv"))
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS)
def test_first_command_of_each_docs_page_runs(fresh_clone, page):
    command = first_command(open(os.path.join(ROOT, "docs", page)).read())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=fresh_clone,
        CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", ""),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", "-c", command], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"{page}: `{command}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{page}: `{command}` printed nothing"
