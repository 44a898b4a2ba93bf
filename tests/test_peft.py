"""Parameter-efficient fine-tuning (LoRA, the peft library) on a tiny randomly initialised decoder built here (a
Llama-style model whose tokenizer has no padding token): it trains, only the adapters and the head change, the saved
(merged) model is a plain transformers model, and the registered model answers the same labels in the MLflow pyfunc
and in the service's own app. Quantized loading (bitsandbytes) needs a GPU: here only its clear error is tested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.training.fine_tune import FineTuneConfig, fine_tune, quantized_loading, with_lora_adapters


def make_tiny_decoder(folder: Path, bert_dir: Path) -> Path:
    """A 2-layer Llama (causal LM weights, random, seeded) with the tiny BERT's whole-word vocabulary as a fast
    tokenizer that has an end-of-text token but no padding token, as decoder tokenizers usually ship."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bert = AutoTokenizer.from_pretrained(bert_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bert.backend_tokenizer, eos_token="[SEP]", bos_token="[CLS]", unk_token="[UNK]"
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), tiny_model_dir)


@pytest.fixture(scope="module")
def decoder_prepared(tmp_path_factory, fixture_csv, decoder_dir):
    from tasks.training.ingest import IngestConfig, ingest
    from tasks.training.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("decoder-prepared")
    snapshot = ingest(IngestConfig(source=str(fixture_csv)), root / "snapshots")
    return snapshot, preprocess(snapshot, PreprocessConfig(tokenizer=str(decoder_dir), max_length=32), root / "cache")


LORA = {"peft": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def lora_tuned(tmp_path_factory, decoder_prepared, decoder_dir):
    _, prepared = decoder_prepared
    config = FineTuneConfig(
        base_model=str(decoder_dir), epochs=10, batch_size=8, learning_rate=1e-2, early_stopping_patience=0, **LORA
    )
    return fine_tune(prepared, config, tmp_path_factory.mktemp("lora"))


def test_lora_trains_the_decoder_and_only_the_adapters_and_the_head(lora_tuned, decoder_prepared, decoder_dir):
    from safetensors.torch import load_file

    from tasks.serving.classifier import TextClassifier

    _, prepared = decoder_prepared
    assert lora_tuned.best_validation_macro_f1 >= 0.8, lora_tuned
    assert 0 < lora_tuned.trainable_parameters < 0.2 * lora_tuned.total_parameters
    base = load_file(str(decoder_dir / "model.safetensors"))
    merged = load_file(str(lora_tuned.model_dir / "model.safetensors"))  # a plain model: no peft files needed
    assert not (lora_tuned.model_dir / "adapter_config.json").exists()
    changed = {name for name, weight in merged.items() if name in base and not np.allclose(weight, base[name])}
    # LoRA's default targets for Llama are the query and value projections: their merged weights moved, nothing else
    # of the base did; the classification head ("score") is new and trained.
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), sorted(changed)
    assert "score.weight" in merged and "score.weight" not in base
    classifier = TextClassifier(lora_tuned.model_dir)
    assert classifier.tokenizer.pad_token == "[SEP]"  # the end-of-text token pads, saved with the model
    test = prepared.split("test")
    predicted = classifier.predict(test["text"].tolist())["label"]
    assert (predicted.to_numpy() == test["label"].to_numpy()).mean() >= 0.7


def test_a_lora_target_that_is_not_in_the_model_is_named(decoder_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(decoder_dir, num_labels=3)
    config = FineTuneConfig(base_model=str(decoder_dir), peft="lora", lora_target_modules="query,value")
    with pytest.raises(ValueError, match=r"LoRA cannot wrap query,value of .*Set lora_target_modules"):
        with_lora_adapters(model, config)


def test_quantized_loading_says_it_needs_a_gpu_and_bitsandbytes(decoder_dir):
    config = FineTuneConfig(base_model=str(decoder_dir), peft="lora", load_in="4bit")
    with pytest.raises(
        ValueError, match=r"load_in=4bit quantizes the base model with bitsandbytes, which needs a CUDA"
    ):
        quantized_loading(config, "cpu")
    assert quantized_loading(FineTuneConfig(base_model="m"), "cpu") == {}


@pytest.mark.integration
@pytest.mark.parametrize("saved_as", ["lora_tuned", "lora_adapter_only"])  # merged weights; adapters and base reference
def test_the_registered_lora_model_answers_the_same_in_the_pyfunc_and_the_service(
    servers, decoder_prepared, tmp_path, request, saved_as
):
    import mlflow

    from tasks.promotion.bento import import_to_bento_store
    from tasks.tracking import start_tracking_run
    from tasks.training.evaluate import EvaluationConfig, evaluate
    from tasks.training.register import RegisterConfig, register
    from tests.fixtures import service_in_process

    tuned = request.getfixturevalue(saved_as)
    snapshot, prepared = decoder_prepared
    evaluation = evaluate(tuned, prepared, tmp_path / "eval", config=EvaluationConfig(latency_samples=1))
    tracking = start_tracking_run(servers["mlflow"], f"{saved_as}-training", "train", idempotency_key=saved_as)
    name = f"{saved_as.replace('_', '-')}-topics"
    version = register(
        tuned, evaluation, snapshot, prepared, tracking, RegisterConfig(registered_model_name=name), {}, "test"
    )
    texts = prepared.split("test")["text"].tolist()
    mlflow.set_tracking_uri(servers["mlflow"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    expected = pyfunc.predict(__import__("pandas").DataFrame({"text": texts}))["label"].tolist()
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}/{version.version}")).read_text()
    # adapters alone are applied with peft where the pyfunc loads; merged weights need no peft
    assert ("peft==" in requirements) is (saved_as == "lora_adapter_only")
    tag = import_to_bento_store(tuned.model_dir, "text-classifier", name, version.version)
    with service_in_process(tag) as client:
        answers = client.post("/classify", json={"texts": texts})
    assert answers.status_code == 200, answers.text
    assert [a["label"] for a in answers.json()] == expected
    metrics = mlflow.MlflowClient(servers["mlflow"]).get_run(tracking.run_id).data.metrics
    assert metrics["trainable_parameters"] == tuned.trainable_parameters < metrics["total_parameters"]


@pytest.fixture(scope="module")
def lora_adapter_only(tmp_path_factory, decoder_prepared, decoder_dir):
    _, prepared = decoder_prepared
    config = FineTuneConfig(
        base_model=str(decoder_dir),
        epochs=10,
        batch_size=8,
        learning_rate=1e-2,
        early_stopping_patience=0,
        lora_merge=False,
        **LORA,
    )
    return fine_tune(prepared, config, tmp_path_factory.mktemp("lora-adapter"))


def test_lora_saved_as_adapters_only_is_small_and_predicts_like_the_merged_model(
    lora_adapter_only, lora_tuned, decoder_prepared, decoder_dir, tmp_path
):
    from tasks.serving.classifier import TextClassifier, is_adapter_folder, save_merged

    folder = lora_adapter_only.model_dir
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "textclf.json"} <= files
    assert "model.safetensors" not in files and is_adapter_folder(folder)
    adapters = (folder / "adapter_model.safetensors").stat().st_size
    assert adapters < 0.5 * (lora_tuned.model_dir / "model.safetensors").stat().st_size
    # The same training (same seed, data and settings) saved two ways: the same answers.
    _, prepared = decoder_prepared
    texts = prepared.split("test")["text"].tolist()
    from_adapters = TextClassifier(folder).predict_proba(texts)
    merged = TextClassifier(lora_tuned.model_dir).predict_proba(texts)
    assert np.allclose(from_adapters, merged, atol=1e-3)
    # What the Bento store gets: a plain folder with merged weights, no peft needed to serve it.
    save_merged(folder, tmp_path / "merged")
    assert not is_adapter_folder(tmp_path / "merged") and (tmp_path / "merged" / "model.safetensors").exists()
    assert np.allclose(TextClassifier(tmp_path / "merged").predict_proba(texts), merged, atol=1e-3)


def test_an_adapter_folder_whose_base_model_is_gone_is_named(lora_adapter_only, tmp_path):
    import json
    import shutil

    from tasks.serving.classifier import TextClassifier

    moved = tmp_path / "adapters"
    shutil.copytree(lora_adapter_only.model_dir, moved)
    settings = json.loads((moved / "textclf.json").read_text())
    (moved / "textclf.json").write_text(json.dumps({**settings, "base_model": str(tmp_path / "no-such-base")}))
    with pytest.raises(ValueError, match=r"LoRA adapters only, and their base model .*no-such-base.*lora_merge=true"):
        TextClassifier(moved)
