"""The private names of megatron-core, PyTorch and others that the package touches are all
listed in megatron/early_exit/private_api.py, and all still exist: a dependency upgrade
that moves one fails here by name."""

import ast
import os
from importlib.metadata import version

from megatron.early_exit import private_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron", "early_exit")


def _sources():
    for top in (PACKAGE, os.path.join(ROOT, "tools")):
        for directory, _, files in os.walk(top):
            yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))
    yield os.path.join(ROOT, "pretrain_early_exit_gpt.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_used() -> dict:
    """Private attribute name -> files: attributes reached on anything but self/cls, and
    private names or modules imported from other packages."""
    found = {}
    for path in _sources():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    names.append(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("megatron.early_exit"):
                names += [a.name for a in node.names if _private(a.name)]
                names += [part for part in node.module.split(".") if _private(part)]
            for name in names:
                found.setdefault(name, set()).add(os.path.relpath(path, ROOT))
    return found


def test_every_listed_private_name_exists():
    gone = private_api.missing()
    installed = {"megatron-core": version("megatron-core"), "torch": version("torch")}
    assert not gone, (
        f"installed {installed}, the list was checked against {private_api.CHECKED_AGAINST}; "
        "these private names moved:\n" + "\n".join(gone)
    )


def test_the_package_touches_no_unlisted_private_name():
    listed = set(private_api.OWN)
    for use in private_api.PRIVATE_USES:
        listed.update(part for part in f"{use.module}.{use.path}".split(".") if _private(part))
    unlisted = {name: sorted(files) for name, files in private_names_used().items() if name not in listed}
    assert not unlisted, f"private names not in megatron/early_exit/private_api.py: {unlisted}"


def test_every_listed_use_is_where_the_list_says():
    for use in private_api.PRIVATE_USES:
        attribute = use.path.rsplit(".", 1)[-1]
        for path in use.used_in:
            assert attribute in open(os.path.join(PACKAGE, path)).read(), f"{use.name}: not in {path} any more"


def test_a_moved_name_is_reported_with_its_user(monkeypatch):
    moved = private_api.PrivateUse("megatron.core.timers", "Timers._no_such_attribute", ("training/timers.py",), "why")
    monkeypatch.setattr(private_api, "PRIVATE_USES", (moved,))
    (report,) = private_api.missing()
    assert report.startswith("megatron.core.timers.Timers._no_such_attribute (used by training/timers.py: why)")
