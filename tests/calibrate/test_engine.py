"""The layer-wise engine reproduces the model's own forward pass when it changes nothing."""

from __future__ import annotations

import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.calibrate.engine import run_layerwise


def test_engine_matches_full_forward() -> None:
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=3, max_position_embeddings=2048)
    windows = torch.randint(0, 64, (5, 24))
    seen = []
    final = {}

    def process(index, block, inputs):
        seen.append((index, len(inputs.calls)))

    def after(index, inputs):
        final["hidden"] = torch.cat([args[0] for args, _ in inputs.calls])

    run_layerwise(model, windows, process, batch_size=2, after_block=after)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    with torch.inference_mode():
        out = model(input_ids=windows, output_hidden_states=True, use_cache=False)
    # hidden_states[-1] has the final norm applied; compare the pre-norm output through the norm
    assert torch.allclose(model.model.norm(final["hidden"]), out.hidden_states[-1], atol=1e-5)
