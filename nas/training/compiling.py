"""torch.compile for training runs: whether a run compiles (`train.compile`).

What compiles is the decoder's forward for the training steps (`LitDecoder.compile_model`), not
the LightningModule, whose `self.log` breaks Dynamo. `train.compile`:

- `false`: eager.
- `true`: compiled; where torch.compile cannot run here (no C++ compiler for the CPU, no Triton
  for a GPU, a Python that Dynamo does not support) a ConfigError, before any training.
- `auto` (the default): compiled when the run is long enough to repay the compilation, that is
  when its training work, 6 x the non-embedding parameters of the vanilla model of its shape x
  its tokens, reaches `AUTO_COMPILE_FLOPS` for the device; where torch.compile cannot run, eager
  with a one-line warning. The work is a property of the config, not a timing: whether a run
  compiles never varies between two runs of one config, and every plan of one shape and budget
  compiles alike, so a comparison of plans never mixes compiled and eager numerics.

On the CPU, benchmarks/compile.py measured (2 threads, docs/benchmarks.md): 16 s of compiler
start-up per process, 27 s to compile a model's training step, 1.19-1.33x the eager speed after,
hence break-evens of 0.5e13 (4 layers, d 64) and 1.1e13 (6 layers, d 128) training FLOPs, 3 to 5
minutes of eager training there. The CPU threshold is twice the larger, for the noise of that
shared machine and for deeper models, whose compilation takes longer. No GPU was measured here.
"""

from __future__ import annotations

import functools
import json
import logging

import torch

from nas.config import RunConfig
from nas.errors import ConfigError, first_line
from nas.params import vanilla_non_embedding_params

logger = logging.getLogger(__name__)

# Training FLOPs from which `auto` compiles, by device type (another type: the CPU's).
AUTO_COMPILE_FLOPS: dict[str, float] = {
    "cpu": 2e13,  # measured: see the module docstring
    # An estimate, not measured: a 60 s compilation repaid at 1.3x the speed of an eager
    # 3e13 FLOP/s (a small model in bf16) takes 60 / (1 - 1 / 1.3) s x 3e13 FLOP/s = 8e15.
    "cuda": 1e16,
}


_last_structure: str | None = None  # of the last run this process compiled


def structure(cfg: RunConfig) -> str:
    """What the compiled training graph depends on: the model's shape and plan, the batch
    and the precision; not coefficients, learning rate, seed or length."""
    vr = cfg.value_residual
    return json.dumps({"model": cfg.to_dict()["model"], "mode": vr.mode, "source": vr.source,
                       "receiving": vr.receiving(cfg.model.n_layer),
                       "batch_size": cfg.train.batch_size, "precision": cfg.train.precision},
                      sort_keys=True)


def forget_other_graphs(cfg: RunConfig) -> None:
    """Before compiling a run: drop Dynamo's graphs if the last run compiled in this process
    had another structure. Dynamo compiles one function at most `recompile_limit` (8) times,
    then runs it eagerly for good, which a search worker trying many shapes and plans would
    reach; runs of one structure (a sweep of lambdas, learning rates, seeds) share a graph."""
    global _last_structure
    key = structure(cfg)
    if key != _last_structure:
        torch._dynamo.reset()
        _last_structure = key


def training_flops(cfg: RunConfig) -> float:
    """6 N D: the FLOPs of the run's training steps, forward and backward (Kaplan et al.)."""
    tokens = cfg.train.steps * cfg.tokens_per_step
    return 6.0 * vanilla_non_embedding_params(cfg.model) * tokens


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


@functools.cache
def compiler_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on this device type here, or None where it can: a tiny
    function compiled the way a model is (Dynamo, then Inductor's C++ or Triton code), once
    per process."""
    try:
        torch.compile(_probe, dynamic=False)(torch.zeros(2, device=device_type))
    except Exception as exc:  # Dynamo and Inductor raise many kinds (BackendCompilerFailed...)
        return first_line(exc)
    return None


def should_compile(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the run trains through torch.compile on `device` (see the module docstring)."""
    setting = cfg.train.compile
    if setting is False:
        return False
    threshold = AUTO_COMPILE_FLOPS.get(device.type, AUTO_COMPILE_FLOPS["cpu"])
    if setting == "auto" and training_flops(cfg) < threshold:
        return False
    problem = compiler_problem(device.type)
    if problem is None:
        return True
    if setting is True:
        raise ConfigError(f"train.compile: true, but torch.compile cannot run on {device.type} "
                          f"here ({problem}); set it to false or auto")
    logger.warning("train.compile: auto: torch.compile cannot run on %s here (%s); training "
                   "eagerly", device.type, problem)
    return False
