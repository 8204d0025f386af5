"""Importing slimformer changes no process-wide state: Python's and torch's random streams, the
environment, warnings filters, torch's backend flags and thread counts, logging."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Runs in a fresh interpreter: in this one, pytest and other tests have imported everything already.
SCRIPT = textwrap.dedent("""
    import logging, os, random, sys, warnings

    plain = (random.getstate(), dict(os.environ))
    # torch adds warnings filters of its own when imported (TracerWarning, "numpy.ndarray size
    # changed", ...) and slimformer cannot import without torch: filters and torch's own state are
    # compared against a baseline that imported torch first. torch changes neither `random` nor the
    # environment, so those two are compared against the bare interpreter.
    import torch

    def state():
        return {
            "warnings.filters": list(warnings.filters),
            "torch rng": torch.get_rng_state().tolist(),
            "default dtype": torch.get_default_dtype(),
            "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
            "matmul precision": torch.get_float32_matmul_precision(),
            "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "grad mode": torch.is_grad_enabled(),
            "root logger": (logging.root.level, list(logging.root.handlers)),
        }

    def changed(before):
        now = state()
        diff = [key for key in before if before[key] != now[key]]
        if (random.getstate(), dict(os.environ)) != plain:
            diff.append("random state or os.environ")
        return diff

    before = state()
    import slimformer, slimformer.api, slimformer.cli
    print("top-level:", changed(before), "sklearn" in sys.modules)

    import importlib, pkgutil
    from slimformer import registry
    registry.known_methods()  # imports every built-in method module
    for info in pkgutil.walk_packages(slimformer.__path__, "slimformer."):
        if info.name != "slimformer.__main__":
            importlib.import_module(info.name)
    print("every module:", changed(before))
""")


def test_import_changes_no_global_state() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    top, every = done.stdout.strip().splitlines()
    # scikit-learn seeds `random`, sets KMP_* variables and adds warnings filters when imported
    assert top == "top-level: [] False", top
    assert every == "every module: []", every
