"""The kernels' layout (issue 23): ``heta_fast.kernels`` never shadows, and is never shadowed by,
another distribution's top-level ``kernels`` package (Hugging Face's, which transformers >= 5.x
imports with its model classes).

Each check runs in a subprocess whose working directory is the repository root, so the root is
first on ``sys.path``, as under ``python -m pytest`` or ``python -m benchmarks.NAME``. On the
layout before issue 23 (``kernels/__init__.py``) ``import kernels`` found our folder there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    """``IMPORTS`` in a fresh interpreter started in ``cwd`` (so ``cwd`` is first on ``sys.path``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORTS)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def other_kernels(tmp_path) -> tuple[list[Path], Path]:
    """Another distribution's top-level ``kernels``: ``(PYTHONPATH entries, its __init__.py)``.

    Hugging Face's where it is installed (transformers' model classes then import it, so a stand-in
    in front of it would break them); else a regular package the test writes, which transformers
    ignores (it has no distribution metadata).
    """
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        package = tmp_path / "other" / "kernels"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text('OWNER = "stand-in"\n')
        return [package.parent], package / "__init__.py"
    return [], Path(dist.locate_file("kernels/__init__.py"))


IMPORTS = """
    import heta_fast, heta_fast.kernels._common, heta_fast.kernels.linear_kl
    from heta_fast.backends.triton_kernels import triton_status
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM
    import kernels
    print(kernels.__file__)
    print(heta_fast.kernels.linear_kl.__file__)
"""


def test_another_kernels_package_and_ours_both_import_from_the_repository_root(other_kernels):
    pythonpath, theirs = other_kernels
    run = _run(cwd=ROOT, pythonpath=pythonpath)
    assert run.returncode == 0, run.stderr[-3000:]
    found, ours = run.stdout.splitlines()
    assert Path(found).resolve() == theirs.resolve()
    assert Path(ours).resolve() == ROOT / "kernels" / "linear_kl.py"


def test_our_kernels_folder_is_a_namespace_portion_and_heta_fast_kernels_links_to_it():
    """A regular package anywhere on the path wins over a namespace portion: ours must stay one."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "heta_fast" / "kernels"
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "kernels")


@pytest.mark.slow
def test_a_built_wheel_ships_the_kernels_inside_heta_fast_only(tmp_path, other_kernels):
    """Built as pip builds it, then imported from the unpacked wheel beside a stand-in ``kernels``."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # setuptools builds in the source tree: build from a copy
    for name in ("heta_fast", "kernels"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("heta_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    kernel_files = sorted(n for n in names if "kernels" in n.split("/")[:-1])
    assert kernel_files == ["heta_fast/kernels/_common.py", "heta_fast/kernels/hvp_reduce.py",
                            "heta_fast/kernels/linear_kl.py", "heta_fast/kernels/probes.py"]
    assert not any(n.startswith("kernels/") for n in names)
    shutil.rmtree(tmp_path / "dist")
    pythonpath, theirs = other_kernels
    run = _run(cwd=tmp_path, pythonpath=[tmp_path / "site", *pythonpath])
    assert run.returncode == 0, run.stderr[-3000:]
    found, ours = run.stdout.splitlines()
    assert Path(found).resolve() == theirs.resolve()
    assert Path(ours) == tmp_path / "site" / "heta_fast" / "kernels" / "linear_kl.py"
