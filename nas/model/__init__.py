"""The model side: the decoder and its value-residual mixes in plain PyTorch (no Optuna, no
Lightning)."""
