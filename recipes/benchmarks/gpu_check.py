"""Prepared GPU check (under 5 minutes; never needed by the tests).

On a CUDA machine, compares the CUDA path with the CPU path and times the group pass:

1. per-example gradients on CUDA = a loop of batch-1 backward passes on CUDA = the CPU
   engine's (tiny BERT + LoRA, float64);
2. factorised projection on CUDA = the dense Kronecker projection of the unprojected CUDA
   gradients (float64), and = the CPU factorised vectors;
3. a bf16 base model with LoRA (MiniLM-L6): group gradients accumulate in fp32 and agree
   with the fp32 model's to bf16 precision;
4. the group pass (K = 64) against the per-example pass at batch 64 on MiniLM-L6 + LoRA,
   1,024 BBC rows, as a ratio to a plain forward+backward pass, with peak CUDA memory.

Usage::

    python recipes/benchmarks/gpu_check.py --json gpu.json

Exits with an error when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().double() - b.cpu().double()).abs().max()
                 / b.cpu().double().abs().max().clamp(min=1e-30))


def exactness() -> dict[str, float]:
    """Items 1 and 2 on tiny models (float64)."""
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

    tok = tiny_tokenizer("bert")
    data = toy_dataset(12, seed=1)
    task = SequenceClassificationTask(tok, max_length=16)
    out: dict[str, float] = {}
    cpu_model = tiny_lora("bert", tok.vocab_size, r=2).double().eval()
    gpu_model = tiny_lora("bert", tok.vocab_size, r=2).double().eval().cuda()
    cpu = GradientEngine(cpu_model, task, config=EngineConfig(batch_size=4))
    gpu = GradientEngine(gpu_model, task, config=EngineConfig(batch_size=4))
    per_example = gpu.per_example_gradients(data).gradients
    loop = torch.cat([gpu.per_example_gradients(data.select([i])).gradients
                      for i in range(len(data))])
    out["cuda_point_vs_batch1_loop"] = _max_rel(per_example, loop)
    out["cuda_point_vs_cpu"] = _max_rel(per_example, cpu.per_example_gradients(data).gradients)
    fact_gpu = GradientEngine(gpu_model, task, config=EngineConfig(batch_size=4,
                                                                   factorised_dim=2))
    fact_cpu = GradientEngine(cpu_model, task, config=EngineConfig(batch_size=4,
                                                                   factorised_dim=2))
    out["cuda_factorised_vs_cpu"] = _max_rel(fact_gpu.per_example_gradients(data).gradients,
                                             fact_cpu.per_example_gradients(data).gradients)
    return out


def bf16_lora() -> dict[str, float]:
    """Item 3: a bf16 MiniLM-L6 with LoRA against the fp32 one."""
    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.tasks import SequenceClassificationTask

    data = load_bbc_news(limit=128, seed=0).add_column("group_id", [i % 8 for i in range(128)])
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_minilm_classifier(num_labels=5, lora_r=8)
        model = model.to(device="cuda", dtype=dtype).eval()
        engine = GradientEngine(model, SequenceClassificationTask(tok, max_length=64),
                                config=EngineConfig(batch_size=32))
        result = engine.group_gradients(data).gradients
        grads[str(dtype)] = result
    bf16 = grads[str(torch.bfloat16)]
    return {"bf16_accumulation_dtype_is_fp32": float(bf16.dtype == torch.float32),
            "bf16_vs_fp32_rel": _max_rel(bf16, grads[str(torch.float32)])}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20


def speed(rows: int = 1024) -> dict[str, float]:
    """Item 4: group (K = 64) and point passes ÷ a plain forward+backward, batch 64."""
    from _speed_e2e import floor_pass

    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.tasks import SequenceClassificationTask

    model, tok = load_minilm_classifier(num_labels=5, lora_r=8)
    model = model.cuda().eval()
    task = SequenceClassificationTask(tok, max_length=64)
    data = load_bbc_news(limit=rows, seed=0).add_column("group_id",
                                                       [i % 64 for i in range(rows)])
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=64))
    floor_pass(model, task, data.select(range(128)), 64)
    floor_s, floor_mb = _timed(lambda: floor_pass(model, task, data, 64))
    group_s, group_mb = _timed(lambda: engine.group_gradients(data))
    point_s, point_mb = _timed(lambda: engine.per_example_gradients(data))
    return {"floor_s": floor_s, "group_ratio": group_s / floor_s,
            "point_ratio": point_s / floor_s, "floor_peak_mb": floor_mb,
            "group_peak_mb": group_mb, "point_peak_mb": point_mb}


def main() -> None:
    """Run the checks and print / write them."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device; the CPU path is covered by the "
                         "tests.")
    result = {"device": torch.cuda.get_device_name(0), **exactness(), **bf16_lora(),
              **speed()}
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
