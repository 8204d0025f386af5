"""Where int4 decode time goes in onnxruntime: one MatMulNBits product at decode shape against fp32
MatMul (accuracy_level 0 = fp32 compute, 4 = int8 compute), and how many ONNX nodes one decoder
block of our export holds (each costs a kernel launch per generated token, whatever the weights).

    python benchmarks/decode_ops.py [--k 576 --n 1536] [--threads 2] [--json out/decode_ops.json]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper
import harness  # benchmarks/harness.py: write_json

from slimformer.evaluate.latency import time_calls
from slimformer.export.onnx import export_onnx

BLOCK = 128


def _session(node: onnx.NodeProto, inits: list, k: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def products(k: int, n: int, threads: int, runs: int) -> dict[str, float]:
    """Median microseconds of (1, k) @ (k, n): fp32 MatMul and 4-bit MatMulNBits at levels 0 and 4."""
    rng = np.random.default_rng(0)
    blocks = (k + BLOCK - 1) // BLOCK
    nbits = [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, BLOCK // 2), dtype=np.uint8), "p"),
             numpy_helper.from_array(rng.random(n * blocks).astype(np.float32), "s"),
             numpy_helper.from_array(np.full(n * ((blocks + 1) // 2), 0x88, dtype=np.uint8), "z")]
    sessions = {"fp32 MatMul": _session(helper.make_node("MatMul", ["x", "w"], ["y"]),
                                        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")],
                                        k, threads)}
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "p", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=BLOCK, accuracy_level=level)
        sessions[f"MatMulNBits accuracy_level {level}"] = _session(node, nbits, k, threads)
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = {}
    for name, sess in sessions.items():
        times_ms = time_calls(lambda: sess.run(None, {"x": x}), runs, warmup=20)
        out[name] = round(statistics.median(times_ms) * 1e3, 1)  # microseconds
    return out


def nodes_per_block() -> dict[str, int]:
    """Node types of one block in our key/value-cache decoder export (a 2-block Llama like SmolLM2)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, "decoder", path, kv_cache=True)
        graph = onnx.load(str(path)).graph
    counts = [collections.Counter(n.op_type for n in graph.node if f"layers.{i}/" in n.name) for i in range(2)]
    return dict(counts[1].most_common()) | {"total": sum(counts[1].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", default="out/decode_ops.json")
    args = parser.parse_args()
    result = {"product_us": products(args.k, args.n, args.threads, args.runs), "block_nodes": nodes_per_block(),
              "shape": [1, args.k, args.n], "threads": args.threads}
    for name, us in result["product_us"].items():
        print(f"(1, {args.k}) @ ({args.k}, {args.n}) {name:32s} {us:8.1f} us")
    print(f"nodes in one decoder block: {result['block_nodes']['total']} ({result['block_nodes']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, result)


if __name__ == "__main__":
    main()
