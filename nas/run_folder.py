"""A run folder (`nas train --out`, and a trial's artifacts): the name of each file in it, one
place for every reader and writer. Its tokenizer.json is `nas.corpus_files.TOKENIZER_FILE`,
copied from beside the shards it trained on."""

CONFIG_FILE = "config.yaml"  # the run config, as `nas train` reads it again
MODEL_FILE = "model.pt"  # the trained weights: a state dict of tensors only
METRICS_FILE = "metrics.json"  # written last: a folder that has it holds a whole run
KEPT_CHECKPOINTS = "checkpoints"  # the run's checkpoints, kept where train.keep_checkpoints
