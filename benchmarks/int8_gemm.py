"""Raw GEMM throughput on this machine: fp32 vs onnxruntime's int8 MatMulInteger (uint8 x int8),
with and without run-time activation quantization (DynamicQuantizeLinear). It bounds what int8
can gain for a whole model whose linear layers are a fraction of its time.

    python benchmarks/int8_gemm.py [--m 4096 --k 384 --n 1536] [--threads 2] [--json out/int8_gemm.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
import harness  # benchmarks/harness.py: write_json

from slimformer.evaluate.latency import time_calls


def _session(nodes: list, x_type: int, shape: list[int], weight: np.ndarray, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", x_type, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    return statistics.median(time_calls(lambda: session.run(None, {"x": x}), runs, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096, help="rows (tokens: batch 32 x sequence 128)")
    parser.add_argument("--k", type=int, default=384)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", default="out/int8_gemm.json")
    args = parser.parse_args()
    m, k, n = args.m, args.k, args.n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w_int8 = rng.integers(-127, 128, (k, n)).astype(np.int8)
    cast = helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)
    cases = {
        "fp32 MatMul": (_session([helper.make_node("MatMul", ["x", "w"], ["y"])], TensorProto.FLOAT, [m, k],
                                 rng.standard_normal((k, n), dtype=np.float32), args.threads), x),
        "MatMulInteger u8 x s8": (_session([helper.make_node("MatMulInteger", ["x", "w"], ["acc"]), cast],
                                           TensorProto.UINT8, [m, k], w_int8, args.threads),
                                  rng.integers(0, 256, (m, k)).astype(np.uint8)),
        "DynamicQuantizeLinear + MatMulInteger": (_session(
            [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"]), cast],
            TensorProto.FLOAT, [m, k], w_int8, args.threads), x),
    }
    results = {}
    for name, (session, feed) in cases.items():
        ms = _median_ms(session, feed, args.runs)
        results[name] = {"ms": round(ms, 2), "gops": round(2 * m * k * n / ms / 1e6, 1)}
    base = results["fp32 MatMul"]["ms"]
    print(f"| {m}x{k} @ {k}x{n}, {args.threads} threads, onnxruntime {ort.__version__} | ms | G(FL)OP/s | vs fp32 |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']} | {r['gops']} | {base / r['ms']:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, {"shape": [m, k, n], "threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
