"""Fixtures of the model-loading tests: SmolLM2 written once as a bf16 checkpoint."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from slimformer.models.loading import ModelBundle


@pytest.fixture(scope="session")
def bf16_folder(smollm_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M saved in bf16, as checkpoints on the Hub are (the alias is stored in fp32)."""
    folder = tmp_path_factory.mktemp("smollm2-bf16")
    copy.deepcopy(smollm_bundle.model).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm_bundle.folder) / name, folder / name)
    return folder
