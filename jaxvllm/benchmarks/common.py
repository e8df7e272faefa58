"""Helpers shared by the benchmarks: length specs, random token-id prompts, stats, tables, JSON,
engine construction (with a synthetic tokenizer for config-only dummy models)."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# ---------------------------------------------------------------------------------------------
# Lengths and prompts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LenSpec:
    """A fixed length ("128") or a uniform integer range, both ends included ("128:1024")."""
    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str) -> "LenSpec":
        text = str(text).strip()
        try:
            if ":" in text:
                a, b = text.split(":", 1)
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
        if lo < 1 or hi < lo:
            raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
        return cls(lo, hi)

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.fixed else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.fixed else f"{self.lo}:{self.hi}"


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def make_requests(n: int, input_len: LenSpec, output_len: LenSpec, vocab_size: int, seed: int,
                  low_id: int = 0) -> list[BenchRequest]:
    """`n` requests with random token-id prompts; lengths drawn from the specs (seeded, so the same
    arguments give the same requests in every process and backend)."""
    rng = random.Random(seed)
    hi = vocab_size - 1
    lo = min(low_id, hi)
    out = []
    for _ in range(n):
        il, ol = input_len.sample(rng), output_len.sample(rng)
        out.append(BenchRequest([rng.randint(lo, hi) for _ in range(il)], ol))
    return out


# ---------------------------------------------------------------------------------------------
# Statistics and output
# ---------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    f = math.floor(k)
    c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v)


def table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[str]] = None) -> str:
    """A GitHub-markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    cells = [[fmt(c) for c in r] for r in rows]
    if header is None:
        header, cells = cells[0], cells[1:]
    header = [str(h) for h in header]
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) if cells else len(header[i])
              for i in range(len(header))]
    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _clean(obj: Any) -> Any:
    """JSON without NaN/Infinity (null instead), so any parser reads it."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit(result: dict, args: argparse.Namespace, text: str) -> None:
    """Print the table, or with --json the result as one JSON document on stdout; --output-json
    also writes the JSON to a file."""
    doc = json.dumps(_clean(result), indent=2, sort_keys=False)
    if getattr(args, "json", False):
        print(doc, flush=True)
    else:
        print(text, flush=True)
    path = getattr(args, "output_json", None)
    if path:
        with open(path, "w") as f:
            f.write(doc + "\n")


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout stays the table or the JSON document."""
    print(msg, file=sys.stderr, flush=True)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="Print one machine-readable JSON document instead of the table.")
    parser.add_argument("--output-json", default=None, metavar="PATH",
                        help="Also write the JSON result to PATH.")


def add_len_args(parser: argparse.ArgumentParser, input_default: str, output_default: str) -> None:
    parser.add_argument("--input-len", type=LenSpec.parse, default=LenSpec.parse(input_default),
                        help="Prompt tokens: N (fixed) or LO:HI (uniform, seeded) "
                             "(default %(default)s).")
    parser.add_argument("--output-len", type=LenSpec.parse, default=LenSpec.parse(output_default),
                        help="Output tokens (ignore_eos): N or LO:HI (default %(default)s).")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="Seed for lengths and prompt token ids (default 0).")


# ---------------------------------------------------------------------------------------------
# Engine construction
# ---------------------------------------------------------------------------------------------
def engine_args_from(args: argparse.Namespace) -> Any:
    from jaxvllm.config import EngineArgs
    return EngineArgs.from_cli_args(args)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The EngineArgs flags in `args` that differ from the defaults, as a command line."""
    import dataclasses
    from jaxvllm.config import EngineArgs
    out: list[str] = []
    for f in dataclasses.fields(EngineArgs):
        if not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            out += [flag, *[str(x) for x in v]]
        elif v is not None:
            out += [flag, str(v)]
    return out


def model_config_dict(model: Optional[str]) -> Optional[dict]:
    """config.json of an HF-style directory (None for the default model or a .gguf file)."""
    if not model or not os.path.isdir(model):
        return None
    path = os.path.join(model, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def has_tokenizer(model: Optional[str]) -> bool:
    if model is None or not os.path.isdir(model):
        return True  # the default model and GGUF files carry their tokenizer
    return any(os.path.exists(os.path.join(model, n)) for n in TOKENIZER_FILES)


def synthetic_tokenizer_dir(vocab_size: int, root: Optional[str] = None) -> str:
    """A word-level HF tokenizer with `vocab_size` tokens "t0".."t{V-1}" (no special tokens; text
    "t5 t9" encodes to [5, 9]). For dummy models that ship only config.json: the engine detokenizes
    every output token and needs a tokenizer to do it. Built once per vocab size (~0.2 s for 128k)."""
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "jaxvllm", "bench-tokenizers")
    path = os.path.join(root, f"wordlevel-{vocab_size}")
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}, f)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tokenizer(args: argparse.Namespace) -> Optional[str]:
    """If the model is a config-only directory and no --tokenizer was given, point --tokenizer at a
    synthetic one of the model's vocab size. Returns the path used (or None)."""
    if getattr(args, "tokenizer", None) or has_tokenizer(args.model):
        return None
    cfg = model_config_dict(args.model)
    vocab = (cfg or {}).get("vocab_size") or (cfg or {}).get("text_config", {}).get("vocab_size")
    if not vocab:
        return None
    args.tokenizer = synthetic_tokenizer_dir(int(vocab))
    log(f"{args.model}: no tokenizer files; using a synthetic word-level tokenizer "
        f"({vocab} tokens) at {args.tokenizer}")
    return args.tokenizer


def build_llm(args: argparse.Namespace) -> Any:
    """An `LLM` from the EngineArgs flags in `args` (synthetic tokenizer for config-only models)."""
    ensure_tokenizer(args)
    from jaxvllm.entrypoints.llm import LLM
    from jaxvllm.config import EngineArgs
    kw = {k: v for k, v in vars(args).items() if k in EngineArgs.field_names() and k != "model"}
    return LLM(args.model, **kw)


def device_description(engine: Any) -> str:
    """The engine's devices, e.g. "gpu:NVIDIA H200 x2" (a data-parallel front asks its replicas:
    touching the devices from the front would reserve memory on them)."""
    return engine.startup_info()["device"]


def measure_bandwidth(nbytes: int, iters: int = 10) -> float:
    """Device memory bandwidth in bytes/s: median time of a jitted elementwise read+write of an
    `nbytes` bf16 array (counts 2 * nbytes per call, as the GPU notes' 2 GiB figure)."""
    import jax
    import jax.numpy as jnp
    n = max(1, nbytes // 2)
    f = jax.jit(lambda x: x * jnp.bfloat16(1.0009765625))
    x = jnp.ones((n,), jnp.bfloat16)
    for _ in range(2):
        x = f(x)
    x.block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    del x
    return 2 * n * 2 / median(times)


# Weight shapes of an 8B Llama layer (fused q/k/v, o, fused gate/up, down): K x N.
GEMV_SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
GEMV_ROWS = 8  # the engine's smallest token bucket: what a batch-1 decode step multiplies


def measure_gemv_bandwidth(nbytes: int, shapes: tuple = GEMV_SHAPES, iters: int = 10,
                           rows: int = GEMV_ROWS) -> dict[tuple[int, int], float]:
    """Read bandwidth in bytes/s per weight shape of `rows`-row bf16 matmuls, x[rows,K] @ W[K,N], over
    distinct weights of `nbytes` in all (far beyond L2), each product depending on the one before
    and all in one program, as a decode step's layers are: what a batch-1 step's weight reads can
    reach. The copy above counts reads and writes, which contend; a decode step only reads. (One
    row measured 0.6-0.7 TB/s on an H200, in a loop and unrolled alike, far below the decode
    step's own rate; the engine never multiplies one row.)"""
    import jax
    import jax.numpy as jnp
    out = {}
    for k, n in shapes:
        ws = [jnp.full((k, n), 1 + i, jnp.bfloat16) for i in range(max(1, nbytes // (2 * k * n)))]

        def chain(x, ws):
            for w in ws:
                x = x + (x @ w)[:, :1] * jnp.bfloat16(1e-3)
            return x
        f, x = jax.jit(chain), jnp.ones((rows, k), jnp.bfloat16)
        out[(k, n)] = len(ws) * k * n * 2 / median_call_s(f, iters, x, ws)
        del ws
    return out


def measure_matmul_flops(n: int = 8192, iters: int = 10, fp8: bool = False) -> float:
    """GEMM throughput in FLOP/s: median time of a jitted n x n x n matmul of bf16 operands, or
    (`fp8`) of e4m3 operands contracted on their last axes, as models/quant.fp8_linear lays out
    its GEMM (which XLA gives to cuBLASLt's FP8 GEMM), into a bf16 output."""
    import jax
    import jax.numpy as jnp
    if fp8:
        a = jnp.ones((n, n), jnp.float8_e4m3fn)
        f = jax.jit(lambda x: jax.lax.dot_general(x, x, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.bfloat16))
    else:
        a = jnp.ones((n, n), jnp.bfloat16)
        f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / median_call_s(f, iters, a)


def median_call_s(f: Callable[..., Any], iters: int, *args: Any) -> float:
    """Median seconds of `iters` calls `f(*args)` (a device computation, waited for), after one
    that compiles it."""
    f(*args).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return median(times)


def repo_root() -> str:
    """The directory holding the `jaxvllm` package (for PYTHONPATH of child processes)."""
    import jaxvllm
    return os.path.dirname(os.path.dirname(os.path.abspath(jaxvllm.__file__)))


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def parse_rates(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        r = float("inf") if part in ("inf", "infinity") else float(part)
        if not r > 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0 or inf, got {part!r}")
        out.append(r)
    if not out:
        raise argparse.ArgumentTypeError("no request rate given")
    return out


def iter_chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def time_engine_phases(engine: Any) -> dict[str, list]:
    """Wraps an LLMEngine's per-step calls with timers: name -> [seconds, calls] (ms per step =
    seconds / steps). "fetch" is collect()'s wait for the device and the copy of the samples, so
    the engine thread's own time is step - fetch."""
    phases: dict[str, list] = {}

    def wrap(obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        acc = phases.setdefault(name, [0.0, 0])

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[0] += time.perf_counter() - t
                acc[1] += 1
        setattr(obj, attr, timed)

    runner, sched = engine.runner, engine.scheduler
    for obj, attr, name in ((engine, "step", "step"), (sched, "schedule", "schedule"),
                            (runner, "dispatch", "dispatch"), (runner, "collect", "collect"),
                            (runner, "_fetch", "fetch"), (sched, "update_from_output", "update"),
                            (engine, "_process", "outputs")):
        wrap(obj, attr, name)
    return phases


def script_main(name: str, doc: Optional[str], add_args: Callable[[argparse.ArgumentParser], Any],
                run: Callable[[argparse.Namespace], int], argv: Optional[list[str]] = None) -> int:
    """`python bench/NAME.py ...`: the same flags as `jaxvllm bench NAME`."""
    parser = argparse.ArgumentParser(prog=f"jaxvllm bench {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    return run(parser.parse_args(argv))
