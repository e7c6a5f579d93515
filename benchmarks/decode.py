"""Decoding through the KV cache, per value-residual mode: the cache's bytes measured, and tokens/s.

SVFormer's case is a smaller KV cache, and `nas.model.decoder.kv_bytes_per_token` computes it from
the plan. This benchmark measures it instead. For every mode of `nas.modes.MODES`, and for resformer
and svformer with the value-embedding source as well (svformer's receiving layers then read
their values from the table by token id, which the cache keeps), one fresh random-init model of
one size decodes the same prompt greedily with `Decoder.generate`, and the benchmark reports:

- the cache's bytes per token, measured: the `KVCache` that `generate` builds is caught as it
  is built, and after generation the storages of its tensors are added up (each storage once,
  by `untyped_storage()`, so a view cannot count twice) and divided by the positions it
  allocated, which `generate` sizes to exactly the tokens it feeds (the prompt and every new
  token but the last). That sits next to `kv_bytes_per_token` and its ratio to vanilla, and a
  verdict says whether measured == formula for every variant;
- decode tokens/s and its ratio to vanilla, measured as benchmarks/throughput.py measures
  training. Each round decodes the prompt with every variant from a fresh cache, and every
  token of the round steps all of them in turn, in an order that rotates from token to token,
  so a slow patch on a shared machine hits every variant alike. A variant's tokens/s in a round
  is taken at its median step time (forward of one token through the cache, then the greedy
  pick), so a step stalled by another process does not count, and the prefill is left out:
  the steady state, where the cache is read. The stepped loop is `generate`'s. The table gives
  the median tokens/s over rounds, the median of the per-round ratios and their min-max. An
  untimed warm-up comes first: per variant one `generate`, whose cache is the one measured, and
  one stepped decode, which must give the same tokens.

    python benchmarks/decode.py --threads 2     # 6 layers, d_model 256, 32 + 256 tokens
    python benchmarks/decode.py --threads 1 --rounds 2 --new-tokens 16 --d-model 64  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch import Tensor

import nas.model.decoder
from nas.config import RunConfig, from_dict
from nas.model.decoder import (
    Decoder,
    KVCache,
    build_model,
    kv_bytes_per_token,
    precision_dtype,
    sample,
)
from nas.modes import MODES


@dataclass(frozen=True)
class Variant:
    label: str
    mode: str
    source: str = "first_layer"


VARIANTS: tuple[Variant, ...] = (
    *(Variant(mode, mode) for mode in MODES),
    Variant("resformer (value_embedding)", "resformer", "value_embedding"),
    Variant("svformer (value_embedding)", "svformer", "value_embedding"),
)
VANILLA = VARIANTS[0]


@dataclass
class Result:
    """One variant: its cache measured once, and its tokens/s and ratio to vanilla per round."""

    variant: Variant
    n_params: int
    cache_bytes: int  # every storage the cache's tensors hold, after generation
    cache_positions: int
    formula_bytes_per_token: int
    tokens_per_s: list[float]
    ratios: list[float]

    @property
    def bytes_per_token(self) -> float:
        return self.cache_bytes / self.cache_positions

    @property
    def matches_formula(self) -> bool:
        return self.cache_bytes == self.formula_bytes_per_token * self.cache_positions


def run_config(args: argparse.Namespace, variant: Variant) -> RunConfig:
    """seq_len fits the prompt and every new token, so `generate` never shifts its context:
    one cache, filled once, the steady state of decoding."""
    return from_dict({
        "model": {"n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head,
                  "seq_len": args.prompt + args.new_tokens},
        "value_residual": {"mode": variant.mode, "source": variant.source},
        "train": {"precision": args.precision},
    }, where=f"benchmark {variant.label}")


def fresh_model(cfg: RunConfig, seed: int) -> Decoder:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if not cfg.train.precision.endswith("-mixed"):
        model.to(precision_dtype(cfg.train.precision))  # a "-true" precision: the weights too
    return model


def precision_context(precision: str) -> AbstractContextManager[object]:
    """Autocast for a mixed precision (as training and `decode_tokens_per_s` run it)."""
    return torch.autocast("cpu", dtype=precision_dtype(precision),
                          enabled=precision.endswith("-mixed"))


@contextmanager
def recorded_caches() -> Iterator[list[KVCache]]:
    """Every KVCache that `Decoder.generate` builds inside the block, kept for inspection
    (generate builds its cache itself and returns only the tokens)."""
    built: list[KVCache] = []

    def build(model: Decoder, batch_size: int, capacity: int) -> KVCache:
        built.append(KVCache(model, batch_size, capacity))
        return built[-1]

    with mock.patch.object(nas.model.decoder, "KVCache", build):
        yield built


def allocated_bytes(cache: KVCache) -> int:
    """The bytes of every storage behind the cache's tensors (attributes, and lists of them),
    each storage counted once. A module it refers to (the value-embedding table that svformer's
    keys-only layers look up) is the model's weights, not cache, and is not walked."""
    storages: dict[int, int] = {}
    pending: list[object] = list(vars(cache).values())
    while pending:
        item = pending.pop()
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return sum(storages.values())


@dataclass
class GeneratedCache:
    """What one `generate` call returned, and the cache it built."""

    tokens: Tensor  # what generate returned: the prompt and the new tokens
    allocated_bytes: int
    positions: int


def generate_and_measure(model: Decoder, prompt: Tensor, new_tokens: int, precision: str
                         ) -> GeneratedCache:
    """One greedy `generate` call (the warm-up), catching the cache it builds."""
    with recorded_caches() as built, precision_context(precision):
        tokens = model.generate(prompt, new_tokens, top_k=1)
    if len(built) != 1:
        raise RuntimeError(f"generate built {len(built)} caches: its context shifted")
    cache = built[0]
    if cache.length != cache.capacity:
        raise RuntimeError(f"the cache holds {cache.length} of the {cache.capacity} positions "
                           "it allocated")
    return GeneratedCache(tokens, allocated_bytes(cache), cache.capacity)


class Decoding:
    """One variant's greedy decode, stepped from outside: `Decoder.generate`'s loop, with the
    prefill done at construction and each later token timed."""

    def __init__(self, model: Decoder, prompt: Tensor, new_tokens: int, precision: str):
        self.model, self.precision = model, precision
        # generate's cache: room for every token fed, all but the last one sampled
        self.cache = KVCache(model, prompt.shape[0], prompt.shape[1] + new_tokens - 1)
        self.tokens = torch.cat((prompt, self.pick(prompt)), dim=1)
        self.step_seconds: list[float] = []

    @torch.no_grad()
    def pick(self, idx: Tensor) -> Tensor:
        """Feeds idx through the cache; the greedy next token, as generate samples it."""
        with precision_context(self.precision):
            logits = self.model(idx, cache=self.cache)
        return sample(logits[:, -1], top_k=1)

    def step(self) -> None:
        start = time.perf_counter()
        self.tokens = torch.cat((self.tokens, self.pick(self.tokens[:, -1:])), dim=1)
        self.step_seconds.append(time.perf_counter() - start)

    def typical_tokens_per_s(self) -> float:
        """At the median step time: one step stalled by another process does not count."""
        return 1 / statistics.median(self.step_seconds)


def stepped_tokens(model: Decoder, prompt: Tensor, new_tokens: int, precision: str) -> Tensor:
    """The tokens of one `Decoding` run alone to the end."""
    decoding = Decoding(model, prompt, new_tokens, precision)
    for _ in range(new_tokens - 1):
        decoding.step()
    return decoding.tokens


def warm_up(model: Decoder, prompt: Tensor, new_tokens: int, precision: str,
            seed: int) -> GeneratedCache:
    """One `generate` (its cache measured) and one stepped decode, checked to give the same
    tokens. Each starts from the same random state: top_k 1 keeps tied logits (likely in
    bfloat16), and `sample` draws among them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generated = generate_and_measure(model, prompt, new_tokens, precision)
        torch.manual_seed(seed)
        if not torch.equal(stepped_tokens(model, prompt, new_tokens, precision),
                           generated.tokens):
            raise RuntimeError("the stepped decode left generate's tokens")
    return generated


def interleaved(models: dict[Variant, Decoder], prompt: Tensor, new_tokens: int,
                precision: str) -> dict[Variant, Decoding]:
    """One round: a fresh decode per variant, every token stepping all of them in turn; the
    order rotates every token, so no variant always runs right after another."""
    decodings = [Decoding(m, prompt, new_tokens, precision) for m in models.values()]
    for i in range(new_tokens - 1):  # the prefill picked the first new token
        for k in range(len(decodings)):
            decodings[(i + k) % len(decodings)].step()
    return dict(zip(models, decodings, strict=True))


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> list[Result]:
    configs = {v: run_config(args, v) for v in VARIANTS}
    models = {v: fresh_model(cfg, args.seed) for v, cfg in configs.items()}
    prompt = torch.randint(0, configs[VANILLA].model.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(args.seed))
    generated = {v: warm_up(m, prompt, args.new_tokens, args.precision, args.seed)
                 for v, m in models.items()}
    log("warm-up done: per variant one generate, its cache measured, and one stepped decode")
    rounds: list[dict[Variant, float]] = []
    for r in range(args.rounds):
        decodings = interleaved(models, prompt, args.new_tokens, args.precision)
        rounds.append({v: d.typical_tokens_per_s() for v, d in decodings.items()})
        log(f"round {r + 1}/{args.rounds} done")
    return [
        Result(v, sum(p.numel() for p in models[v].parameters()),
               cache_bytes=generated[v].allocated_bytes,
               cache_positions=generated[v].positions,
               formula_bytes_per_token=kv_bytes_per_token(configs[v]),
               tokens_per_s=[measured[v] for measured in rounds],
               ratios=[measured[v] / measured[VANILLA] for measured in rounds])
        for v in VARIANTS
    ]


def size_label(args: argparse.Namespace) -> str:
    return (f"{args.n_layer}L d{args.d_model} H{args.n_head}, "
            f"{args.prompt}+{args.new_tokens} tokens, {args.precision}")


def format_table(results: Sequence[Result], size: str) -> str:
    vanilla = next(r for r in results if r.variant == VANILLA)
    lines = [
        "| size | variant | params | kv bytes/token measured | formula | ratio to vanilla | "
        "decode tokens/s | ratio to vanilla | ratio min-max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {size} | {r.variant.label} | {r.n_params:,} | {r.bytes_per_token:,.6g} | "
            f"{r.formula_bytes_per_token:,} | {r.bytes_per_token / vanilla.bytes_per_token:.3f}x"
            f" | {statistics.median(r.tokens_per_s):,.0f} | {statistics.median(r.ratios):.3f}x"
            f" | {min(r.ratios):.3f}-{max(r.ratios):.3f} |")
    return "\n".join(lines)


def verdicts(results: Sequence[Result]) -> list[str]:
    """Whether measured == formula everywhere, then what each variant with a smaller cache
    saves, measured."""
    differ = [f"{r.variant.label} measured {r.bytes_per_token:,.6g}, formula "
              f"{r.formula_bytes_per_token:,}" for r in results if not r.matches_formula]
    lines = [f"FAIL: measured cache bytes differ from kv_bytes_per_token: {'; '.join(differ)}"
             if differ else
             f"PASS: measured cache bytes == kv_bytes_per_token for all {len(results)} variants"]
    vanilla = next(r for r in results if r.variant == VANILLA)
    for r in results:
        if r.cache_bytes < vanilla.cache_bytes:
            lines.append(
                f"{r.variant.label}: {r.cache_bytes:,} bytes cached for {r.cache_positions} "
                f"positions, vanilla {vanilla.cache_bytes:,}: "
                f"{1 - r.cache_bytes / vanilla.cache_bytes:.1%} less, measured; decode at "
                f"{statistics.median(r.ratios):.3f}x vanilla's tokens/s")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=6, help="(default 6)")
    parser.add_argument("--d-model", type=int, default=256, help="(default 256)")
    parser.add_argument("--n-head", type=int, default=4, help="(default 4)")
    parser.add_argument("--prompt", type=int, default=32,
                        help="prompt tokens, random ids of the seed (default 32)")
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="tokens generated per decode (default 256)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--precision", default="32-true",
                        help="a train.precision: 32-true (default), bf16-mixed (autocast), "
                             "bf16-true (bfloat16 weights) ...")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if min(args.n_layer, args.d_model, args.n_head, args.prompt, args.rounds) < 1:
        parser.error("sizes, --prompt and --rounds must be >= 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first comes from the prefill, untimed)")
    try:
        precision_dtype(args.precision)
    except ValueError as e:
        parser.error(str(e))
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = measure(args, log)
    print(format_table(results, size_label(args)))
    print()
    lines = verdicts(results)
    print("\n".join(lines))
    print(f"\n{args.rounds} rounds after the warm-up, fresh random-init models (seed "
          f"{args.seed}), greedy; the cache holds prompt + new tokens - 1 positions (the last "
          "token sampled is never fed); tokens/s: decode steps (prefill excluded) at the median "
          "step time, median over rounds; ratio: median of the per-round ratios to vanilla; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - started:.0f} s, load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after.")
    return 1 if lines[0].startswith("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
