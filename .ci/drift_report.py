"""Print which installed packages differ from the lock: what `make drift` tests beyond what users get today.

Usage: python .ci/drift_report.py requirements.lock   (run by the venv to report on; always exits 0)
"""

import re
import sys
from importlib.metadata import distributions
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


locked = {canonical(name): version
          for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", Path(sys.argv[1]).read_text(), re.M)}
installed = {canonical(d.metadata["Name"]): d.version for d in distributions() if canonical(d.metadata["Name"]) != "pip"}
installed.pop("twostage", None)
# Only what is installed: the drift venv has the test extra, not the stack extra's packages (pip's resolver gave
# up on `.[test,stack]` with --upgrade-strategy eager: s3fs and aiobotocore pin fsspec and botocore exactly).
changed = sorted(name for name in installed if locked.get(name) != installed[name])
print(f"drift: {len(changed)} of {len(installed)} installed packages differ from {sys.argv[1]}")
for name in changed:
    print(f"  {name:<32} {locked.get(name, '-'):>16} -> {installed.get(name, '-')}")
