"""The Dockerfile installs pyproject.toml's dependencies with the same pins (except the documented ones the
NGC base image provides), never reinstalls torch, and installs the package itself with --no-deps."""

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# Provided by the NGC PyTorch base image, built for its CUDA (see the Dockerfile's comments).
FROM_BASE_IMAGE = {"torch", "nvidia-dali-cuda130", "transformer-engine"}


def _run_commands(text):
    """The Dockerfile's RUN instructions, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip()[4:] for line in joined.splitlines() if line.strip().startswith("RUN ")]


def _pip_installs(text):
    """Every ``pip install`` in the Dockerfile: (options, requirements)."""
    installs = []
    for command in _run_commands(text):
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words_list, words = [], []
        for token in lexer:
            if token in ("&&", "||", "|", ";", ">", ">>"):
                words_list.append(words)
                words = []
            else:
                words.append(token)
        words_list.append(words)
        for words in words_list:
            if "pip" in words and "install" in words:
                args = words[words.index("install") + 1 :]
                opts, reqs, skip = [], [], False
                for arg in args:
                    if skip:
                        opts.append(arg)
                        skip = False
                    elif arg.startswith("-"):
                        opts.append(arg)
                        skip = arg in ("-c", "-e", "-r", "--constraint")
                    else:
                        reqs.append(Requirement(arg))
                installs.append((opts, reqs))
    return installs


def _pyproject():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    reqs += [Requirement(r) for r in data["project"]["optional-dependencies"]["gpu"]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_dockerfile_pins_agree_with_pyproject():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    installs = _pip_installs(text)
    assert installs, "no pip install found"
    project = _pyproject()
    installed = {}
    for opts, reqs in installs:
        for req in reqs:
            name = canonicalize_name(req.name)
            assert name not in installed, f"{name} installed twice"
            installed[name] = (req, opts)
    # Same specifiers (and extras) as pyproject for everything installed; nothing pyproject doesn't list.
    for name, (req, opts) in installed.items():
        assert name in project, f"Dockerfile installs {req}, which pyproject.toml does not list"
        assert str(req.specifier) == str(project[name].specifier), (str(req), str(project[name]))
        assert req.extras == project[name].extras, (str(req), str(project[name]))
        assert "-c" in opts, f"{req} is installed without the base image's constraints"
    # Everything in pyproject is installed, except what the base image provides.
    missing = set(project) - set(installed) - FROM_BASE_IMAGE
    assert not missing, f"Dockerfile does not install {sorted(missing)}"
    assert not FROM_BASE_IMAGE & set(installed), "torch / TE / DALI must come from the base image"


def test_package_is_installed_without_dependencies():
    text = (REPO / "Dockerfile").read_text()
    package_installs = [opts for opts, reqs in _pip_installs(text) if not reqs]
    assert package_installs, "the package itself is never installed"
    for opts in package_installs:
        assert "--no-deps" in opts, opts
        assert "-e" in opts and "/workspace/flux-nemo" in opts, opts


def test_dockerignore_keeps_environments_out_of_the_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "results", "nemo_experiments"):
        assert entry in ignored
