"""The development environment is exactly the lock, and the lock honours pyproject.toml's ranges."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from conftest import REPO


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    return {canonical(name): version for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", text, re.M)}


def test_the_venv_holds_exactly_the_locked_versions():
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = {canonical(name): version for name, version in re.findall(r"^([\w.-]+)==(\S+)", freeze, re.M)}
    installed.pop("pip")  # the venv's own, which Python brings
    assert installed == locked(), "the venv differs from requirements.lock: run `make install`"


def test_every_range_in_pyproject_admits_its_locked_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    ranges = [*project["project"]["dependencies"], *project["build-system"]["requires"],
              *(item for extra in project["project"]["optional-dependencies"].values() for item in extra)]
    pins = locked()
    for text in ranges:
        requirement = Requirement(text)
        assert canonical(requirement.name) in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert pins[canonical(requirement.name)] in requirement.specifier, f"{text}: locked {pins[canonical(requirement.name)]}"
