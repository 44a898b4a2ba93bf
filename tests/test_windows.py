"""Truncation strategies: unit tests on token ids, and one chunked model that must pool its windows the same way in
training-time validation, evaluation, the MLflow pyfunc, batch scoring and the service (its own ASGI app)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from tasks.serving.windows import Windowing, content_windows, encode_windows, pool_logits, softmax

IDS = list(range(100, 150))  # a 50-token text


def test_head_tail_and_head_plus_tail_keep_the_promised_ends():
    assert content_windows(IDS, 10, Windowing("head")) == [IDS[:10]]
    assert content_windows(IDS, 10, Windowing("tail")) == [IDS[-10:]]
    (both,) = content_windows(IDS, 12, Windowing("head+tail", head_share=0.25))
    assert both == IDS[:3] + IDS[-9:]  # round(0.25 * 12) from the start, the rest from the end
    assert content_windows(IDS, 12, Windowing("head+tail", head_share=1.0)) == [IDS[:12]]
    assert content_windows(IDS, 12, Windowing("head+tail", head_share=0.0)) == [IDS[-12:]]


@pytest.mark.parametrize("strategy", ["head", "tail", "head+tail", "chunks"])
def test_a_text_that_fits_is_one_window_unchanged(strategy):
    assert content_windows(IDS[:7], 10, Windowing(strategy)) == [IDS[:7]]
    assert content_windows([], 10, Windowing(strategy)) == [[]]


@pytest.mark.parametrize(
    ("length", "budget", "overlap"), [(50, 10, 0.25), (50, 10, 0.0), (11, 10, 0.25), (1000, 126, 0.25), (127, 126, 0.4)]
)
def test_chunks_cover_the_whole_text_in_overlapping_windows(length, budget, overlap):
    ids = list(range(length))
    windows = content_windows(ids, budget, Windowing("chunks", chunk_overlap=overlap, max_chunks=1000))
    assert all(len(w) == budget for w in windows)
    assert windows[0][0] == 0 and windows[-1][-1] == length - 1  # starts at the start, ends at the end
    assert set().union(*map(set, windows)) == set(ids)  # every token is in some window
    starts = [w[0] for w in windows]
    assert all(b - a <= budget - round(overlap * budget) for a, b in itertools.pairwise(starts))  # at least the overlap
    assert all(w == ids[w[0] : w[0] + budget] for w in windows)  # contiguous, in order


def test_chunks_stop_at_max_chunks_and_keep_the_end():
    windows = content_windows(list(range(1000)), 10, Windowing("chunks", max_chunks=3))
    assert len(windows) == 3 and windows[0][0] == 0 and windows[-1][-1] == 999
    assert content_windows(list(range(1000)), 10, Windowing("chunks", max_chunks=1)) == [list(range(10))]


def test_bad_windowing_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="truncation 'middle' is not one of head, tail, head\\+tail, chunks"):
        Windowing("middle")
    with pytest.raises(ValueError, match="chunk_overlap"):
        Windowing("chunks", chunk_overlap=1.0)


def test_a_model_saved_before_strategies_reads_heads():
    assert Windowing.from_dict({"max_length": 64}) == Windowing("head", 64)
    settings = Windowing("chunks", 32, chunk_overlap=0.1).as_dict()
    assert Windowing.from_dict({**settings, "base_model": "x"}) == Windowing("chunks", 32, chunk_overlap=0.1)


def test_pool_logits_averages_each_texts_windows():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]], dtype=np.float32)
    pooled = pool_logits(logits, np.array([0, 0, 1]), 2)
    assert np.allclose(pooled, [[2.0, 1.0], [0.0, 5.0]])
    assert np.allclose(softmax(pooled).sum(axis=1), 1.0)


def test_encode_windows_adds_the_tokenizers_special_tokens_to_every_window(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_text = " ".join(["match goal team coach"] * 5)  # 20 words, 20 tokens
    encoded = encode_windows(tokenizer, [long_text, "match goal"], Windowing("chunks", max_length=8))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert encoded.truncated == [True, False]
    assert encoded.windows_per_text.tolist() == [5, 1]  # 6 content tokens a window, starts 0, 4, 8, 12 and 14
    assert all(ids[0] == cls and ids[-1] == sep and len(ids) <= 8 for ids in encoded.input_ids)
    content = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    covered = [t for ids, owner in zip(encoded.input_ids, encoded.owner) if owner == 0 for t in ids[1:-1]]
    assert set(covered) == set(content)
    head = encode_windows(tokenizer, [long_text], Windowing("head", max_length=8))
    assert head.input_ids == [tokenizer(long_text, truncation=True, max_length=8)["input_ids"]]  # as the tokenizer cuts
    # Each text's whole length, special tokens included (the evaluation's length slices read it; no second pass).
    whole = [len(ids) for ids in tokenizer([long_text, "match goal"], truncation=False)["input_ids"]]
    assert encoded.token_lengths == whole == [22, 4]


# --- One chunked model, pooled the same everywhere -------------------------------------------------------------------

MAX_LENGTH = 12  # the fixture texts have 4-14 tokens: the longer ones need two windows of 10


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, prepared_fixture, tiny_model_dir):
    from tasks.training.fine_tune import FineTuneConfig, fine_tune
    from tasks.training.preprocess import PreprocessConfig, preprocess

    snapshot, _ = prepared_fixture
    root = tmp_path_factory.mktemp("chunked")
    prepared = preprocess(
        snapshot,
        PreprocessConfig(
            tokenizer=str(tiny_model_dir), max_length=MAX_LENGTH, truncation="chunks", chunks_per_training_text=2
        ),
        root / "cache",
    )
    config = FineTuneConfig(
        base_model=str(tiny_model_dir), epochs=4, batch_size=8, learning_rate=2e-3, early_stopping_patience=0
    )
    tuned = fine_tune(prepared, config, root / "fine-tune")
    texts = prepared.split("validation")["text"].tolist()
    return prepared, tuned, config, texts


def test_a_chunked_model_reads_its_windowing_from_its_folder(chunked):
    from tasks.serving.classifier import TextClassifier

    prepared, tuned, _, texts = chunked
    settings = json.loads((tuned.model_dir / "textclf.json").read_text())
    assert settings["truncation"] == "chunks" and settings["max_length"] == MAX_LENGTH
    classifier = TextClassifier(tuned.model_dir)
    probabilities, truncated = classifier.classify(texts)
    assert 0 < np.mean(truncated) < 1  # some texts fit one window, others do not
    # By hand: every window through the model on its own, logits averaged per text.
    import torch

    encoded = encode_windows(classifier.tokenizer, texts, classifier.windowing)
    with torch.inference_mode():
        logits = np.concatenate(
            [classifier.model(input_ids=torch.tensor([ids])).logits.numpy() for ids in encoded.input_ids]
        )
    expected = softmax(pool_logits(logits, encoded.owner, len(texts)))
    assert np.allclose(probabilities, expected, atol=1e-5)
    # Training data: with chunks_per_training_text=2, the first and the last window of each long training text.
    import datasets

    train = datasets.load_from_disk(str(prepared.tokenized_path))["train"]
    per_text = np.bincount(train["text_index"])
    assert per_text.max() == 2 and per_text.min() == 1


def test_training_time_validation_pools_windows_as_the_classifier_does(chunked, tmp_path):
    import datasets
    from sklearn.metrics import f1_score

    from tasks.serving.classifier import TextClassifier
    from tasks.training.fine_tune import build_trainer, pooled_macro_f1

    prepared, tuned, config, texts = chunked
    validation = datasets.load_from_disk(str(prepared.tokenized_path))["validation"]
    assert len(validation) > len(texts)  # windows, not texts
    trainer = build_trainer(config, prepared, tmp_path / "checkpoints", "cpu", "fp32")
    trainer.model = trainer.model.from_pretrained(tuned.model_dir)  # the fine-tuned weights
    window_logits = trainer.predict(validation).predictions
    classifier = TextClassifier(tuned.model_dir)
    pooled = pool_logits(window_logits, np.asarray(validation["text_index"]), len(texts))
    assert np.allclose(softmax(pooled), classifier.predict_proba(texts), atol=1e-5)
    labels = prepared.split("validation")["label_id"].to_numpy()
    scores = pooled_macro_f1(validation["text_index"])(trainer.predict(validation))
    assert scores["macro_f1"] == pytest.approx(
        f1_score(labels, classifier.predict_proba(texts).argmax(axis=1), average="macro")
    )


def test_pyfunc_and_batch_scoring_pool_the_same(chunked, tmp_path):
    import mlflow.pyfunc

    from tasks.contracts import ScoringSource
    from tasks.scoring.batch_score import score_in_process
    from tasks.serving.classifier import TextClassifier
    from tasks.training.register import save_pyfunc_model

    _, tuned, _, texts = chunked
    expected = TextClassifier(tuned.model_dir).predict(texts)
    save_pyfunc_model(tuned, texts[:2], tmp_path / "pyfunc" / "model")
    from_pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc" / "model")).predict(texts)
    pd.testing.assert_frame_equal(from_pyfunc, expected, atol=1e-5)

    source = tmp_path / "incoming.csv"
    pd.DataFrame({"text": texts}).to_csv(source, index=False)
    summary = score_in_process(
        ScoringSource(source=str(source)), tuned.model_dir, "chunked/1", tmp_path / "out.parquet"
    )
    scored = pd.read_parquet(summary.output_path)
    assert scored["label"].tolist() == expected["label"].tolist()
    proba = [c for c in expected.columns if c.startswith("proba_")]
    assert np.allclose(scored[proba].to_numpy(), expected[proba].to_numpy(), atol=1e-5)


def test_the_service_pools_the_same_and_says_which_texts_were_truncated(chunked):
    from tasks.promotion.bento import import_to_bento_store
    from tasks.serving.classifier import TextClassifier
    from tests.fixtures import service_in_process

    _, tuned, _, texts = chunked
    tag = import_to_bento_store(tuned.model_dir, "text-classifier", "chunked", 3)
    with service_in_process(tag) as client:  # the service's own app, in this process (tests/fixtures.py)
        response = client.post("/classify", json={"texts": texts[:20]})
    assert response.status_code == 200, response.text
    answers = response.json()
    classifier = TextClassifier(tuned.model_dir)
    probabilities, truncated = classifier.classify(texts[:20])
    assert [a["truncated"] for a in answers] == truncated and any(truncated)
    served = np.array([[a["probabilities"][name] for name in classifier.label_names] for a in answers])
    assert np.allclose(served, probabilities, atol=1e-5)
    assert {a["model_version"] for a in answers} == {"chunked/3+pytorch"}
