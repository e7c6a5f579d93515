"""Tiny run configs shared by the tests."""

from __future__ import annotations

from nas.config import RunConfig, from_dict


def tiny(mode: str = "vanilla", *, layers="all", source: str = "first_layer", lambda1=0.5,
         lambda2=0.5, n_layer: int = 3, d_model: int = 32, n_head: int = 4, seq_len: int = 16,
         steps: int | None = 20, batch_size: int = 8, seed: int = 0, **train) -> RunConfig:
    return from_dict({
        "model": {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "seq_len": seq_len},
        "value_residual": {"mode": mode, "layers": layers, "source": source,
                           "lambda1": lambda1, "lambda2": lambda2},
        "train": {**({"steps": steps} if steps is not None else {}), "batch_size": batch_size,
                  "seed": seed, "eval_batches": 2, **train},
    })
