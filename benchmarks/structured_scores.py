"""MiniLM-L6 heads 25% + neurons 25%: every head score x neuron score, embedding cosine to fp32.

    python benchmarks/structured_scores.py

Calibration: 4 windows x 128 tokens of the tweets pool; cosine of mean-pooled embeddings on the
first 128 tweets of the evaluation split. Before any recovery fine-tuning.
"""
from __future__ import annotations

import copy
import time

import torch

from slimformer.models.loading import load_bundle
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.evaluate.embedding import embed, mean_cosine
from slimformer.prune.structured import heads, neurons, HeadsConfig, NeuronsConfig


def main() -> None:
    torch.set_num_threads(2)
    b = load_bundle("minilm-l6")
    texts = list(load_data("tweets", "eval").texts[:128])
    ref = embed(b.model, b.tokenizer, texts)
    ctx = StepContext(tokenizer=b.tokenizer, kind="encoder", calib=load_data("tweets", "calib"), progress=False)
    for hs in ("taylor", "magnitude", "information"):
        for ns in ("activation", "magnitude", "taylor"):
            if hs == "information" and ns != "activation": continue
            m = copy.deepcopy(b.model); t = time.time()
            heads(m, HeadsConfig(sparsity=0.25, score=hs, num_samples=4, seq_len=128), ctx)
            neurons(m, NeuronsConfig(sparsity=0.25, score=ns, num_samples=4, seq_len=128), ctx)
            print(hs, ns, round(time.time()-t, 1), "cos", mean_cosine(embed(m, b.tokenizer, texts), ref), flush=True)


if __name__ == "__main__":
    main()
