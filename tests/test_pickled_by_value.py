"""Prefect 3.9 hands served and worker-submitted flow runs to their process as cloudpickle bundles that pickle our
modules by value (they live outside site-packages): the flow, its configs and its helpers must survive that.

A fast guard; tests/test_server.py runs the real thing (a served deployment, a worker's bundle).
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PICKLE = """
import pkgutil, sys, cloudpickle, importlib
import flows.two_stage
for package in ("configs", "flows", "models", "tasks"):  # what Prefect's bundler registers: every local module
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        cloudpickle.register_pickle_by_value(importlib.import_module(module.name))
from configs.schema import PipelineConfig
sys.stdout.buffer.write(cloudpickle.dumps((flows.two_stage.two_stage, PipelineConfig)))
"""

UNPICKLE = """
import sys, cloudpickle
flow, PipelineConfig = cloudpickle.loads(sys.stdin.buffer.read())
assert "flows.two_stage" not in sys.modules  # rebuilt from the pickle, not imported
config = PipelineConfig.model_validate({"name": "tiny", "pretrain": {"objective": "denoising"}})
try:
    PipelineConfig.model_validate({"pretrain": {"objective": "contrastive"}})
    raise SystemExit("a contrastive config without augmentation was accepted")
except ValueError as error:
    assert "contrastive compares two augmentations" in str(error)
helpers = flow.fn.__globals__["pipeline"].__wrapped__.__globals__  # flows/runner.py's, rebuilt by value
device = helpers["resolve_device"](config.device)
print(flow.name, config.name, device, helpers["resolve_amp"](config.amp, device).enabled in (True, False))
"""


def test_the_flow_and_its_validated_configs_survive_being_pickled_by_value(tmp_path):
    pickled = subprocess.run([sys.executable, "-c", PICKLE], cwd=REPO, capture_output=True)
    assert pickled.returncode == 0, pickled.stderr.decode()[-3000:]
    loaded = subprocess.run([sys.executable, "-c", UNPICKLE], cwd=tmp_path, input=pickled.stdout, capture_output=True)
    assert loaded.returncode == 0, loaded.stderr.decode()[-3000:]
    assert loaded.stdout.decode().split() == ["two-stage", "tiny", "cpu", "True"]
