"""3x3 max-pool: torch's ``max_pool2d`` vs :func:`stembed.models.layers.max_pool3x3`, side by side.

Measures, in one run on the same tensors, the op alone on the encoder's map shapes (a batch of 256
patches x 11 frames) and the whole small-preset fusion ``embed`` of 256 patches with each pooling
(the model's pooling swapped in place). Also checks that both give identical outputs.

    .venv/bin/python benchmarks/max_pool.py

Last line: one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from stembed.config import ae_preset, fusion_preset
from stembed.models import layers
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import FusionModel, SensorInput


def median_ms(f: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``f()`` in ms over ``repeats`` calls, after one warm-up call."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def torch_pool(x: torch.Tensor) -> torch.Tensor:
    """torch's own 3x3 max-pool, stride 1, padding 1: what ``max_pool3x3`` replaces."""
    return F.max_pool2d(x, 3, 1, 1)


def main() -> None:
    """Print the op timings per shape and the embed timing, then the JSON."""
    torch.manual_seed(0)
    ops: dict[str, dict[str, object]] = {}
    out: dict[str, object] = {"torch_threads": torch.get_num_threads(), "ops": ops}
    print(f"{'case':<28}{'max_pool2d ms':>15}{'max_pool3x3 ms':>16}{'ratio':>8}  equal")
    for shape in ((2816, 32, 15, 15), (2816, 32, 7, 7), (2816, 8, 4, 4)):
        x = torch.randn(shape)
        a, b = median_ms(partial(torch_pool, x)), median_ms(partial(layers.max_pool3x3, x))
        equal = torch.equal(torch_pool(x), layers.max_pool3x3(x))
        print(f"{'op ' + 'x'.join(map(str, shape)):<28}{a:>15.1f}{b:>16.1f}{a / b:>8.2f}  {equal}")
        ops[str(shape)] = {"max_pool2d_ms": a, "max_pool3x3_ms": b, "ratio": a / b, "equal": equal}

    model = FusionModel({k: SensorAutoencoder(ae_preset("small", k)) for k in ("s1", "s2")},
                        fusion_preset("small")).eval()
    n = 256
    x1, x2 = torch.rand(n, 11, 2, 15, 15), torch.rand(n, 11, 10, 15, 15)
    gaps, dt = torch.full((n, 10), 5.0), torch.zeros(n)
    inputs = {"s1": SensorInput(x1, gaps, dt), "s2": SensorInput(x2, gaps)}
    fast = layers.max_pool3x3
    results = {}
    for name, pool in (("max_pool2d", torch_pool), ("max_pool3x3", fast)):
        layers.max_pool3x3 = pool  # PooledResidual looks the function up at call time
        with torch.no_grad():
            results[name] = (median_ms(lambda: model.embed(inputs), repeats=5), model.embed(inputs))
    layers.max_pool3x3 = fast
    a, b = results["max_pool2d"][0], results["max_pool3x3"][0]
    equal = torch.equal(results["max_pool2d"][1], results["max_pool3x3"][1])
    print(f"{'small-preset embed, 256':<28}{a:>15.1f}{b:>16.1f}{a / b:>8.2f}  {equal}")
    out["embed_small_256"] = {"max_pool2d_ms": a, "max_pool3x3_ms": b, "ratio": a / b, "equal": equal,
                              "ms_per_patch": {"max_pool2d": a / n, "max_pool3x3": b / n}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
