"""The contracts between stages: the small frozen references one stage returns and the next takes, and the names of
what a stage leaves in MLflow (artifact paths, tags, aliases), each declared once and owned by the stage that
writes it. Stages import these instead of each other's modules (tests/test_layout.py and the import-linter
contracts in pyproject.toml keep it so)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.serving.windows import Truncation, Windowing

if TYPE_CHECKING:
    import pandas as pd

# ---------------------------------------------------------------------------------------------------- ingest
# A snapshot is a Parquet file of text, label, split under the snapshot folder, named by its content version.
# single_label: `label` is one class per text; multi_label: `label` is the list of a text's classes (maybe empty).
ProblemType = Literal["single_label", "multi_label"]


class DatasetValidationError(ValueError):
    """The data itself is wrong: the message names the file, column and rows, and how to fix it."""


class DatasetSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    version: str
    source: str
    num_rows: int
    label_counts: dict[str, int]  # multi_label: texts that carry each class
    has_splits: bool
    problem_type: ProblemType = "single_label"


# ---------------------------------------------------------------------------------------------------- preprocess


class WindowingConfig(BaseModel):
    """How texts longer than max_length are fed to the model, in training and wherever the model predicts."""

    model_config = ConfigDict(frozen=True)

    max_length: int = Field(default=128, ge=8, le=8192, description="Tokens the model reads at once (one window).")
    truncation: Truncation = Field(
        default="head",
        description="Texts longer than max_length: 'head' keeps the start, 'tail' the end, 'head+tail' both ends, "
        "'chunks' classifies overlapping windows over the whole text and averages their logits.",
    )
    head_share: float = Field(default=0.25, ge=0, le=1, description="head+tail: share of the window from the start.")
    chunk_overlap: float = Field(
        default=0.25, ge=0, lt=0.5, description="chunks: share of a window that the next window repeats."
    )
    max_chunks: int = Field(default=32, ge=1, le=1024, description="chunks: most windows per text when predicting.")
    chunks_per_training_text: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="chunks: windows of one training text that the model trains on (the first, then spread evenly "
        "to the last); validation and test always use every window.",
    )

    def windowing(self) -> Windowing:
        return Windowing(
            strategy=self.truncation,
            max_length=self.max_length,
            head_share=self.head_share,
            chunk_overlap=self.chunk_overlap,
            max_chunks=self.max_chunks,
        )


class PreparedDataset(BaseModel):
    """A reference to the preprocessed data: `path` holds splits.parquet, labels.json and tokenized/."""

    model_config = ConfigDict(frozen=True)

    path: Path
    cache_key: str
    data_version: str
    label_names: list[str]
    split_sizes: dict[str, int]
    duplicates_removed: int
    windowing: WindowingConfig
    cache_hit: bool
    problem_type: ProblemType = "single_label"

    @property
    def multi_label(self) -> bool:
        return self.problem_type == "multi_label"

    @property
    def max_length(self) -> int:
        return self.windowing.max_length

    @property
    def splits_path(self) -> Path:
        return self.path / "splits.parquet"

    @property
    def tokenized_path(self) -> Path:
        return self.path / "tokenized"

    def split(self, name: str) -> pd.DataFrame:
        import pandas as pd

        frame = pd.read_parquet(self.splits_path)
        frame = frame[frame["split"] == name].reset_index(drop=True)
        if self.multi_label:  # Parquet lists come back as numpy arrays
            frame["label"] = frame["label"].map(lambda labels: [str(label) for label in labels])
        return frame


# ---------------------------------------------------------------------------------------------------- fine-tune


class FineTunedModel(BaseModel):
    """A reference to the fine-tuned model folder (transformers format, plus labels.json and textclf.json)."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    base_model: str
    device: str
    precision: str
    epochs_completed: float
    global_step: int
    best_validation_macro_f1: float
    train_samples_per_second: float
    train_runtime_s: float
    resumed_from_checkpoint: str | None
    reused: bool = False
    trainable_parameters: int | None = None  # trained weights (with peft=lora: the adapters and the head)
    total_parameters: int | None = None
    processes: int = 1  # data-parallel training processes (torchrun)


# ---------------------------------------------------------------------------------------------------- evaluate
# The test split's texts, labels and predictions, logged by the training run; the promotion gate scores on them.
TEST_SPLIT_ARTIFACT = "evaluation/test_predictions.parquet"


class EvaluationResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    artifacts_dir: Path
    report_path: Path

    @property
    def report_markdown(self) -> str:
        return self.report_path.read_text()


# ---------------------------------------------------------------------------------------------------- register
# The registered model every flow uses unless told otherwise (TEXTCLF_REGISTERED_MODEL_NAME for the CLI).
REGISTERED_MODEL_NAME = "text-classifier"
MODEL_ARTIFACT_PATH = "model"
FLOW_RUN_TAG = "prefect.flow_run_id"  # set on the training run by the flow, copied onto the model version
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact that holds the fine-tuned folder
CANDIDATE_ALIAS = "candidate"  # set by training (and the sweep) on the version it registers


class RegisteredModelVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    alias: str
    run_id: str
    tracking_uri: str

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# ---------------------------------------------------------------------------------------------------- promotion
CHAMPION_ALIAS = "champion"  # the version the Bento serves
PREVIOUS_CHAMPION_ALIAS = "previous-champion"  # the former champion, kept for rollback
RUNTIME_ARTIFACT_PATH = "runtime"  # under the promotion run's artifacts
RUNTIME_TAG = "runtime"
RUNTIME_URI_TAG = "runtime.artifact_uri"

# ---------------------------------------------------------------------------------------------------- scoring and monitoring


class ScoringSource(BaseModel):
    """Where the texts to score come from."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(
        description="A CSV/TSV/JSONL/Parquet file, a folder of .txt files, a glob such as 'incoming/*.jsonl', or "
        "'hub:<dataset>' for a Hugging Face hub dataset.",
    )
    text_column: str = Field(default="text", description="Column that holds the text (tables and hub datasets).")
    id_column: str | None = Field(
        default=None,
        description="Column with a stable id per text; unset uses '<file>:<row>' (or the file name).",
    )
    hub_config: str | None = Field(default=None, description="Hub dataset configuration.")
    hub_split: str = Field(default="train", description="Hub dataset split.")
