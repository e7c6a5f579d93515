"""`nas prepare`: text -> tokenizer.json and train/val/test .bin shards, read back by
nas.training.data, trained on, and refused in one line where the input is bad."""

import json
import random
import tracemalloc

import numpy as np
import pytest
import yaml

from nas.cli import main
from nas.config import from_dict
from nas.errors import ConfigError
from nas.training import prepare as prep
from nas.training.data import read_shard
from nas.training.train import train

WORDS = ("value residual layer attention head token model train loss shard byte merge "
         "naïve façade 東京 ✓ über").split()


def text(n_lines: int, seed: int) -> str:
    """Lines of words, with the odd tab, CRLF and blank line: what a round trip must keep."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
             + rng.choice(["\n", "\n", "\r\n", "\t\n", "\n\n"]) for _ in range(n_lines)]
    return "".join(lines)


def split_ids(folder, split):
    return [np.asarray(read_shard(p), dtype=np.int64)
            for p in sorted(folder.glob(f"{split}_*.bin"))]


def decoded(folder, tokenizer):
    """The text of all shards in split order, <|endoftext|> dropped, and how many there were."""
    ids = np.concatenate([a for split in prep.PREPARED_SPLITS for a in split_ids(folder, split)])
    eot = tokenizer.token_to_id(prep.EOT)
    return tokenizer.decode(ids.tolist()), int((ids == eot).sum())


@pytest.fixture
def corpus(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text(text(600, 0), encoding="utf-8", newline="")
    files[1].write_text(text(200, 1), encoding="utf-8", newline="")
    return files


def test_nas_prepare_round_trips_text_through_its_shards_and_tokenizer(tmp_path, corpus,
                                                                        capsys):
    from tokenizers import Tokenizer

    out = tmp_path / "prepared"
    code = main(["prepare", *map(str, corpus), "--vocab-size", "300", "--out", str(out),
                 "--shard-tokens", "1000", "--val-fraction", "0.15", "--test-fraction", "0.1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Encoding" not in printed.err  # no progress bar where no terminal shows it
    assert f"data.source: {out}" in printed.out
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 300
    text_back, separators = decoded(out, tokenizer)
    assert text_back == "".join(p.read_bytes().decode("utf-8") for p in corpus)
    assert separators == 2  # one <|endoftext|> before each file
    tokens = {s: sum(len(a) for a in split_ids(out, s)) for s in ("train", "val", "test")}
    assert len(split_ids(out, "train")) > 1 and all(  # full shards of 1000 tokens, then the rest
        len(a) == 1000 for a in split_ids(out, "train")[:-1])
    total = sum(tokens.values())
    # the splits in the stream's order, near their shares (lines are never cut)
    assert 0.1 < tokens["val"] / total < 0.2 and 0.05 < tokens["test"] / total < 0.15
    # b.txt, the last 25% of the bytes, holds all the test text: the held-out split is its end
    assert tokenizer.decode(np.concatenate(split_ids(out, "test")).tolist()) in text_back[-len(
        corpus[1].read_bytes().decode("utf-8")):]


def test_a_run_config_on_prepared_shards_takes_their_vocab_and_trains(tmp_path, corpus, capsys):
    out = tmp_path / "prepared"
    done = prep.prepare(corpus, out, vocab_size=320, progress=False)
    raw = {"model": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16},
           "train": {"steps": 6, "batch_size": 4, "eval_batches": 1, "compile": False},
           "data": {"source": str(out)}}
    cfg = from_dict(raw)
    assert cfg.model.vocab_size == done.vocab_size == 320  # not the default 256
    run = tmp_path / "run"
    m = train(cfg, run, progress=False)
    assert np.isfinite(m["val_loss"]) and m["test_loss"] is not None  # test_*.bin scores it
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model"]["vocab_size"] == 320  # the resolved config is what is stored
    assert json.loads((run / "tokenizer.json").read_text()) == json.loads(
        (out / "tokenizer.json").read_text())
    # ... so `nas generate` decodes the run's tokens with it
    assert main(["generate", str(run), "--prompt", "value residual", "--max-new-tokens", "5",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("value residual")
    # a glob of the shards finds the tokenizer beside them too
    assert from_dict({**raw, "data": {"source": f"{out}/train_*.bin"}}).model.vocab_size == 320


@pytest.mark.parametrize("data, model, fragment", [
    ({"val_fraction": 0.2}, {}, "data.val_fraction: the folder is split already"),
    ({"test_fraction": 0.1}, {}, "data.test_fraction: the folder is split already"),
    ({}, {"vocab_size": 100}, "model.vocab_size: 100 is smaller than the 300 tokens"),
])
def test_a_config_that_contradicts_a_prepared_folder_is_refused(tmp_path, corpus, data, model,
                                                                 fragment):
    from nas.training.data import TokenDataModule

    out = tmp_path / "prepared"
    prep.prepare(corpus, out, vocab_size=300, progress=False)
    with pytest.raises(ConfigError, match=fragment):
        cfg = from_dict({"model": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16,
                                   **model}, "data": {"source": str(out), **data}})
        TokenDataModule.for_run(cfg)


def test_reading_streams_in_pieces_and_keeps_every_byte(tmp_path, monkeypatch):
    """Pieces far smaller than the input, lines longer than a piece, multi-byte characters cut
    by a read: the text comes back exactly, and the reading holds a few pieces at a time."""
    seed = tmp_path / "seed.txt"
    seed.write_text(text(300, 4), encoding="utf-8")
    prep.prepare([seed], tmp_path / "seed", vocab_size=280, progress=False)
    tokenizer_file = tmp_path / "seed" / "tokenizer.json"
    monkeypatch.setattr(prep, "PIECE_BYTES", 4096)
    monkeypatch.setattr(prep, "ENCODE_BATCH", 2)
    long_line = "東京 façade " * 2000  # 30 KB without a newline
    body = text(60000, 2) + long_line + "\n" + text(2000, 3)
    path = tmp_path / "big.txt"
    path.write_text(body, encoding="utf-8", newline="")
    tracemalloc.start()
    try:
        prep.prepare([path], tmp_path / "out", tokenizer=str(tokenizer_file), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 2_000_000 and peak < size / 8, (size, peak)  # no slurping of the input
    assert decoded(tmp_path / "out", prep.load_tokenizer(tokenizer_file))[0] == body


BAD = {
    "missing": (["{tmp}/nope.txt", "--vocab-size", "300"], "nope.txt: file not found"),
    "empty": (["{tmp}/empty.txt", "--vocab-size", "300"], "empty.txt: file is empty"),
    "binary": (["{tmp}/binary.txt", "--vocab-size", "300"],
               "binary.txt: a binary file (a NUL byte at offset 3)"),
    "not-utf8": (["{tmp}/latin1.txt", "--vocab-size", "300"],
                 "latin1.txt: not UTF-8 text (near byte 3)"),
    "vocab-low": (["{tmp}/a.txt", "--vocab-size", "255"], "--vocab-size: must be in 256..65535"),
    "vocab-high": (["{tmp}/a.txt", "--vocab-size", "65536"],
                   "--vocab-size: must be in 256..65535"),
    "neither": (["{tmp}/a.txt"], "--vocab-size: give it"),
    "both": (["{tmp}/a.txt", "--vocab-size", "300", "--tokenizer", "{tmp}/a.txt"],
             "--vocab-size: give it"),
    "not-a-tokenizer": (["{tmp}/a.txt", "--tokenizer", "{tmp}/a.txt"],
                        "--tokenizer: {tmp}/a.txt: not a tokenizer file"),
    "fractions": (["{tmp}/a.txt", "--vocab-size", "300", "--val-fraction", "0.6",
                   "--test-fraction", "0.5"], "--test-fraction: must be in [0, 1)"),
    "one-line": (["{tmp}/one-line.txt", "--vocab-size", "300"],
                 "the val split came out empty"),
    "out-not-empty": (["{tmp}/a.txt", "--vocab-size", "300", "--out", "{tmp}"],
                      "--out: {tmp} exists and is not an empty folder"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    (tmp_path / "a.txt").write_text(text(50, 5), encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"abc\0def\n" * 10)
    (tmp_path / "latin1.txt").write_bytes("abcé\n".encode("latin-1") * 10)
    (tmp_path / "one-line.txt").write_text("one line and no other " * 20, encoding="utf-8")
    args, fragment = BAD[case]
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    code = main(["prepare", *args, *([] if "--out" in args else ["--out", str(out)]),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("nas prepare: error: ") and err.count("\n") == 1, err
    assert fragment.format(tmp=tmp_path) in err
    assert not out.exists() and not list(tmp_path.glob("*.incomplete-*"))
