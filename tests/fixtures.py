"""Test data and a tiny randomly initialised BERT, made here so no test needs the network."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "striker", "season", "referee", "stadium", "cup"],
    "tech": ["software", "chip", "laptop", "network", "cloud", "robot", "server", "startup", "app", "data"],
    "food": ["recipe", "oven", "flour", "pasta", "sauce", "dinner", "chef", "garlic", "soup", "bread"],
}
FILLER = ["the", "a", "new", "big", "today", "after", "with", "and", "was", "very", "our", "late"]


def make_texts(per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Short synthetic texts whose label follows from their topic words (so even a tiny model can learn it)."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        seen = set()
        while len(seen) < per_class:
            n = rng.randint(4, 14)
            tokens = [rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n)]
            tokens[0] = rng.choice(words)
            text = " ".join(tokens)
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_tiny_bert(folder: Path, texts: list[str]) -> Path:
    """A 2-layer BERT with a whole-word vocabulary made from the fixture texts. Seconds on a CPU, and the same
    model every time (sorted vocabulary, seeded weights), so tests that train it are deterministic."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({word for text in texts for word in text.lower().split()} | set(FILLER))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


def flow_run_and_artifacts(api_url: str, flow_run_id) -> tuple[dict, list[dict]]:
    """What the Prefect UI shows for a flow run, read over the same REST API the UI uses."""
    import httpx

    run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}").raise_for_status().json()
    artifacts = httpx.post(
        f"{api_url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}}
    ).raise_for_status().json()
    return run, artifacts
