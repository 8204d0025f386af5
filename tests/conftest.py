"""Shared fixtures: the real built-in models, loaded once per test session (converted once on disk)."""

from __future__ import annotations

import copy

import pytest

from slimformer.models.loading import ModelBundle, load_bundle


@pytest.fixture(scope="session")
def smollm_bundle() -> ModelBundle:
    return load_bundle("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_bundle() -> ModelBundle:
    return load_bundle("minilm-l6")


@pytest.fixture
def smollm(smollm_bundle: ModelBundle) -> ModelBundle:
    """A private copy that a test may compress in place."""
    return ModelBundle(copy.deepcopy(smollm_bundle.model), smollm_bundle.tokenizer, "decoder", smollm_bundle.name)


@pytest.fixture(scope="session")
def smollm_windows(smollm_bundle: ModelBundle):
    """The first 8 evaluation windows of lee-news (evaluation protocol, docs/design.md), enough for ratio checks."""
    from slimformer.data.sources import load_data
    from slimformer.data.windows import lm_windows

    return lm_windows(smollm_bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows=8)


@pytest.fixture(scope="session")
def smollm_fp32_ppl(smollm_bundle: ModelBundle, smollm_windows) -> float:
    from slimformer.evaluate.perplexity import perplexity

    return perplexity(smollm_bundle.model, smollm_windows, progress=False)["ppl"]
