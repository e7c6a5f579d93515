"""Compatibility with run configs stored before later keys existed: a run config is recorded
(`RunConfig.to_dict`) without the keys added since, where they hold their defaults, so that the
record of a run stays what it was and the duplicate check, which compares records, still finds
an old study's trials.
"""

from __future__ import annotations

from typing import Any

# Train and value_residual keys added after studies had stored run configs, with their defaults:
# `RunConfig.to_dict` leaves each out at its default, so the record of a run stays what it was
# before they existed (the duplicate check compares records).
LATE_VALUE_RESIDUAL_KEYS: dict[str, Any] = {"value_embeddings": 1, "v_lambda": 0.5,
                                            "ve_lambda": 0.5}
LATE_TRAIN_KEYS: dict[str, Any] = {"checkpoint_every": None, "keep_checkpoints": False,
                                   "compile": "auto", "logger": "csv", "curve_batches": None}


def as_recorded_before(record: dict[str, Any], mode: str) -> dict[str, Any]:
    """`record` (a run config's dict) less what a record made before the late keys lacks."""
    # Only neutreno records neutreno_lambda, and neutreno no lambda1: every other mode's
    # record stays as it was before the key existed.
    record["value_residual"].pop("lambda1" if mode == "neutreno" else "neutreno_lambda")
    for section, late in (("train", LATE_TRAIN_KEYS),
                          ("value_residual", LATE_VALUE_RESIDUAL_KEYS)):
        for key, default in late.items():
            if record[section][key] == default:
                record[section].pop(key)
    return record
