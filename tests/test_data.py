"""uniql_jax.data: documents, hold-out, token streams, calibration windows, offline dataset ids."""

import time

import numpy as np
import pytest

from uniql_jax import data

STORIES = (
    "Spot. The end of a story the file starts inside.\n\n"
    "Once upon a time, there was a cat.\n\nThe cat liked milk.\n\n"
    "Once there was a dog named Max. Max ran.\n\n"
    "Lily and Ben are twins. They play.\n\nThey laugh.\n\n"
    "Long ago, a king lived in a castle.\n"
)


class CharTokenizer:
    """A transformers-style tokenizer with a BOS (id 0): one id per character."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        def enc(t):
            return ([0] if add_special_tokens else []) + [ord(c) for c in t]

        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


class NoBosTokenizer(CharTokenizer):
    def __call__(self, text, add_special_tokens=True):
        return super().__call__(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- documents


def test_documents_start_at_story_openers_and_keep_text_verbatim():
    docs = data.split_documents(STORIES)
    assert docs == [
        "Spot. The end of a story the file starts inside.",
        "Once upon a time, there was a cat.\n\nThe cat liked milk.",
        "Once there was a dog named Max. Max ran.\n\nLily and Ben are twins. They play.\n\nThey laugh.",
        "Long ago, a king lived in a castle.",
    ]


def test_text_without_openers_is_one_document():
    text = " = Valkyria = \n \n Senjou no Valkyria is a game . \n \n It was released . \n"
    assert data.split_documents(text) == [text.strip()]
    assert data.split_documents(STORIES, opener=None) == [STORIES.strip()]


def test_holdout_is_the_last_tenth_of_documents():
    docs = [f"doc {i}" for i in range(25)]
    train, held = data.holdout(docs, 0.1)
    assert held == docs[-3:] and train == docs[:-3]  # ceil(2.5) = 3
    assert len(data.holdout(docs[:20], 0.1)[1]) == 2 and len(data.holdout(docs + docs[:5], 0.1)[1]) == 3  # 30 docs
    with pytest.raises(data.DataError):
        data.holdout(docs[:1], 0.1)


def test_shared_tinystories_split(shared_data):
    path = shared_data / "tinystories" / "tinystories_valid_900.txt"
    text = path.read_text()
    docs = data.load_documents(path)
    held = data.load_documents(path, part="heldout")
    train = data.load_documents(path, part="train")
    assert train + held == docs and len(held) == -(-len(docs) // 10)
    assert all(d.startswith("Once") for d in held)  # the split falls on a story opening
    assert 0.08 < sum(map(len, held)) / len(text) < 0.15
    assert text.rstrip().endswith(held[-1])
    # the documents partition the file's text, in order (whitespace aside)
    assert " ".join(docs).split() == text.split()


# ----------------------------------------------------------------------------- token streams


def test_token_stream_starts_each_document_with_bos_and_adds_nothing_else():
    docs = ["ab", "cde", "f"]
    stream = data.token_stream(docs, CharTokenizer())
    assert stream.dtype == np.int32
    assert stream.tolist() == [0, 97, 98, 0, 99, 100, 101, 0, 102]


def test_token_stream_without_bos_joins_documents_by_a_blank_line():
    stream = data.token_stream(["ab", "c"], NoBosTokenizer())
    assert "".join(map(chr, stream)) == "ab\n\nc"


def test_llama2c_tokenizer_stream(shared_data):
    from converters import llama2c

    tok = llama2c.load_tokenizer(shared_data / "stories260K" / "tok512.bin")
    docs = ["Once upon a time, Tom ran.", "The end."]
    stream = data.token_stream(docs, tok)
    assert stream.tolist() == tok.encode(docs[0], bos=True) + tok.encode(docs[1], bos=True)


# ----------------------------------------------------------------------------- calibration windows


def test_calibration_windows_are_real_contiguous_slices_without_padding():
    stream = np.arange(1000, 1000 + 1037, dtype=np.int32)  # distinct values: position is recoverable
    wins = data.calibration_windows(stream, 20, 50, seed=3)
    assert wins.shape == (20, 50) and wins.dtype == np.int32
    starts = wins[:, 0] - 1000
    for w, s in zip(wins, starts):
        np.testing.assert_array_equal(w, stream[s:s + 50])  # contiguous, every token real
    assert np.all(np.diff(starts) >= 50)  # non-overlapping, in stream order
    assert starts[-1] + 50 <= len(stream)  # never past the end, so never padded


def test_calibration_windows_use_every_slot_when_asked_for_all():
    stream = np.arange(1, 10 * 32 + 1, dtype=np.int32)
    wins = data.calibration_windows(stream, 10, 32, seed=0)
    np.testing.assert_array_equal(np.sort(wins.ravel()), stream)


def test_calibration_windows_determinism_under_a_seed():
    stream = np.random.default_rng(0).integers(0, 500, 20_000).astype(np.int32)
    a = data.calibration_windows(stream, 16, 128, seed=7)
    b = data.calibration_windows(stream, 16, 128, seed=7)
    c = data.calibration_windows(stream, 16, 128, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_calibration_windows_refuse_a_too_short_stream():
    with pytest.raises(data.DataError, match="fewer than"):
        data.calibration_windows(np.arange(100), 4, 30)


# ----------------------------------------------------------------------------- sources


def test_local_file_needs_no_network(tmp_path, monkeypatch):
    f = tmp_path / "story.txt"
    f.write_text(STORIES)

    def no_network(*a, **k):
        raise AssertionError("a local file must not touch the network")

    monkeypatch.setattr(data, "_dataset_rows", no_network)
    monkeypatch.setattr(data.socket, "create_connection", no_network)
    assert data.load_documents(f) == data.split_documents(STORIES)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_text(tmp_path / "missing.txt")
    with pytest.raises(data.DataError, match="no such file"):
        data.read_text("some/deep/missing/path")


def test_dataset_id_syntax():
    assert data.is_dataset_id("wikitext:wikitext-2-raw-v1@test")
    assert data.is_dataset_id("roneneldan/TinyStories@validation")
    assert not data.is_dataset_id("notes.txt")
    assert not data.is_dataset_id("a/b/c")


def test_dataset_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # conftest sets it too; `datasets` read it at import
    t0 = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.read_text("uniql-test/no-such-dataset@train")  # goes through datasets.load_dataset, cache only
    assert str(err.value) == ("uniql-test/no-such-dataset@train: cannot load dataset "
                              "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local cache)")
    assert time.perf_counter() - t0 < 30  # no retry loop (online, datasets retries the Hub for ~30 s)


def test_dataset_id_with_unreachable_hub_fails_fast(monkeypatch):
    import datasets

    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")

    def must_not_run(*a, **k):
        raise AssertionError("an unreachable Hub must be refused before datasets starts retrying")

    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    t0 = time.perf_counter()
    with pytest.raises(data.DataError, match="the Hugging Face Hub is unreachable"):
        data.read_text("wikitext:wikitext-2-raw-v1@test")
    assert time.perf_counter() - t0 < 10


def test_dataset_rows_become_documents(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"id": [1, 2], "story": ["Once upon a time A.\n\nThen B.", "Once upon C."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.read_text("someone/stories:v2@validation") == "Once upon a time A.\n\nThen B.\n\nOnce upon C."
    assert calls == [("someone/stories", "v2", "validation")]
    assert data.load_documents("someone/stories") == ["Once upon a time A.\n\nThen B.", "Once upon C."]
    assert calls[-1] == ("someone/stories", None, "train")
