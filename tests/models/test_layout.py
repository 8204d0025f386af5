"""Finding blocks and linear layers generically, across architecture families."""

from __future__ import annotations

import pytest
import transformers
from torch import nn

from slimformer.errors import UserError
from slimformer.models.layout import find_blocks, select_linears

TINY = {
    "llama": transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1),
    "gpt2": transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32),
    "opt": transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                  num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32),
    "qwen2": transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1),
    "bert": transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=32),
}
# linear layers per block in each family
PER_BLOCK = {"llama": 7, "gpt2": 4, "opt": 6, "qwen2": 7, "bert": 6}


@pytest.mark.parametrize("family", sorted(TINY))
def test_blocks_and_default_targets(family: str) -> None:
    config = TINY[family]
    model = (transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM).from_config(config)
    name, blocks = find_blocks(model)
    assert len(blocks) == config.num_hidden_layers
    layers = select_linears(model, None)
    assert len(layers) == PER_BLOCK[family] * config.num_hidden_layers
    assert all(n.startswith(name + ".") for n in layers)  # lm_head / pooler are not default targets


def test_patterns_and_errors() -> None:
    model = transformers.AutoModelForCausalLM.from_config(TINY["llama"])
    mlp = select_linears(model, ["re:.*mlp.*"])
    assert len(mlp) == 3 * 2 and all(".mlp." in n for n in mlp)
    assert list(select_linears(model, ["lm_head"])) == ["lm_head"]
    assert len(select_linears(model, None, ignore=["down_proj"])) == 6 * 2
    assert len(select_linears(model, ["Linear"])) == 7 * 2 + 1
    with pytest.raises(UserError, match="matches no linear layer"):
        select_linears(model, ["re:nothing_here"])
    with pytest.raises(UserError, match="no layer"):
        select_linears(model, ["re:.*mlp.*"], ignore=["re:.*"])
    with pytest.raises(UserError, match="could not find Transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
