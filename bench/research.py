"""What a training loop's engine calls cost: sleep mode (device memory asleep and awake, seconds to
sleep and to wake at both levels, TPOT after waking) and LoRA (TPOT with an adapter, with LoRA on
and no adapter, and with LoRA off: run it once with --enable-lora and once without).

    PYTHONPATH=. python3 bench/research.py --model bench/configs/llama-3-8b --load-format dummy \\
        --dtype bfloat16 --max-model-len 512 --enforce-eager [--enable-lora --max-lora-rank 16]

The adapter is random, of rank --max-lora-rank on every attention and MLP projection of every
layer (PEFT's layout, written to a temporary directory). TPOT is the median over a batch's requests
of (last token - first token) / (tokens - 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import common


def tpot_ms(llm, prompts: list, output_len: int, lora=None) -> float:
    from jaxvllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                        lora_request=lora)
    return statistics.median((o.metrics["finished_time"] - o.metrics["first_token_time"])
                             / max(len(o.outputs[0].token_ids) - 1, 1) * 1e3 for o in outs)


def device_gib() -> float:
    """Bytes the allocator holds on the first device (live arrays' bytes where it has no stats)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    used = stats.get("bytes_in_use")
    if used is None:
        used = sum(a.nbytes for a in jax.live_arrays() if a.sharding.memory_kind == "device")
    return used / 2**30


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sleep_cycle(llm, prompts: list, output_len: int) -> dict:
    res = {"gib_awake": device_gib()}
    res["sleep1_s"] = timed(lambda: llm.sleep(level=1))
    res["gib_asleep1"] = device_gib()
    res["wake1_s"] = timed(llm.wake_up)
    res["tpot_ms_after_wake"] = tpot_ms(llm, prompts, output_len)
    # Again, as a loop that sleeps every iteration does (host buffers may be reused by then).
    res["sleep1_again_s"] = timed(lambda: llm.sleep(level=1))
    res["wake1_again_s"] = timed(llm.wake_up)
    res["sleep2_s"] = timed(lambda: llm.sleep(level=2))
    res["gib_asleep2"] = device_gib()
    res["wake2_weights_s"] = timed(lambda: llm.wake_up(tags=["weights"]))
    res["wake2_kv_cache_s"] = timed(lambda: llm.wake_up(tags=["kv_cache"]))
    res["gib_woken"] = device_gib()
    return res


def random_adapter(cfg, rank: int) -> str:
    """A PEFT adapter directory: random A and B of `rank` on every projection of every layer."""
    import numpy as np
    from safetensors.numpy import save_file
    from jaxvllm.lora.peft import TARGETS
    from jaxvllm.models.params import layer_shapes
    rng = np.random.default_rng(0)
    weights = {}
    for i in range(cfg.num_layers):
        shapes = layer_shapes(cfg, i)
        for hf_name, name in TARGETS.items():
            if name not in shapes:
                continue
            fan_in, fan_out = shapes[name]
            part = "mlp" if name in ("gate", "up", "down") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{part}.{hf_name}"
            weights[key + ".lora_A.weight"] = rng.normal(0, 0.01, (rank, fan_in)).astype(np.float32)
            weights[key + ".lora_B.weight"] = rng.normal(0, 0.01, (fan_out, rank)).astype(np.float32)
    path = tempfile.mkdtemp(prefix="jaxvllm-bench-lora-")
    save_file(weights, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"r": rank, "lora_alpha": rank, "peft_type": "LORA",
                   "target_modules": list(TARGETS)}, f)
    return path


def run(args: argparse.Namespace) -> int:
    from jaxvllm import LoRARequest
    llm = common.build_llm(args)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    lora = (LoRARequest("bench", 1, random_adapter(engine.model_config, args.max_lora_rank))
            if args.enable_lora else None)
    result: dict = {"tpot": {}}
    rows = []
    for b in args.batch_sizes:
        reqs = common.make_requests(b, common.LenSpec(args.input_len, args.input_len),
                                    common.LenSpec(args.output_len, args.output_len), vocab, b)
        prompts = [r.prompt_token_ids for r in reqs]
        tpot_ms(llm, prompts, 4, lora)  # compile this batch's buckets
        tpot_ms(llm, prompts, 4)
        plain = tpot_ms(llm, prompts, args.output_len)
        adapter = tpot_ms(llm, prompts, args.output_len, lora) if lora else None
        result["tpot"][b] = {"tpot_ms": plain, "tpot_ms_adapter": adapter}
        rows.append([b, "on" if lora else "off", plain, "-" if adapter is None else adapter])
    table = common.table(rows, ["batch", "LoRA", "TPOT ms, no adapter", "TPOT ms, adapter"])
    if args.sleep:
        s = result["sleep"] = sleep_cycle(llm, prompts, args.output_len)
        table += "\n\n" + common.table(
            [[f"{s['gib_awake']:.2f}", f"{s['gib_asleep1']:.2f}", s["sleep1_s"], s["wake1_s"],
              s["sleep1_again_s"], s["wake1_again_s"],
              f"{s['gib_asleep2']:.2f}", s["sleep2_s"], s["wake2_weights_s"],
              s["wake2_kv_cache_s"], s["tpot_ms_after_wake"]]],
            ["GiB awake", "GiB asleep (1)", "sleep(1) s", "wake_up s", "sleep(1) again s",
             "wake_up again s", "GiB asleep (2)",
             "sleep(2) s", "wake weights s", "wake KV cache s",
             f"TPOT ms after waking (batch {args.batch_sizes[-1]})"])
    common.emit(result, args, table)
    return 0


def add_args(parser: argparse.ArgumentParser) -> None:
    from jaxvllm.config import EngineArgs
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--sleep", action=argparse.BooleanOptionalAction, default=True,
                        help="Time a sleep/wake cycle at both levels after the TPOT runs.")
    common.add_output_args(parser)
    EngineArgs.add_cli_args(parser.add_argument_group("engine (EngineArgs)"))


if __name__ == "__main__":
    raise SystemExit(common.script_main("research", __doc__, add_args, run))
