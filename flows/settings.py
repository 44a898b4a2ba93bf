"""The one settings object: reads the environment once, when a flow or the CLI asks for it."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.contracts import REGISTERED_MODEL_NAME


class Settings(BaseSettings):
    """Where things live. Every value can be set as an environment variable (`TEXTCLF_<NAME>`)."""

    model_config = SettingsConfigDict(env_prefix="TEXTCLF_", extra="ignore")

    home: Path = Field(
        default=Path(".textclf"),
        description="Project data folder: dataset snapshots, caches, checkpoints, local servers' databases.",
    )
    host: str = Field(default="127.0.0.1", description="Loopback address of the embedded servers.")
    prefect_port: int = Field(default=4200, ge=1, le=65535, description="Port of the embedded Prefect server.")
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="Port of the embedded MLflow server.")
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PREFECT_API_URL", "TEXTCLF_PREFECT_API_URL"),
        description="An existing Prefect server; unset means the embedded local one.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "TEXTCLF_MLFLOW_TRACKING_URI"),
        description="An existing MLflow tracking server; unset means the embedded local one.",
    )
    bento_port: int = Field(
        default=3000, ge=1, le=65535, description="Port of the local Bento server (`textclf serve`)."
    )
    experiment_name: str = Field(default="text-classifier", description="MLflow experiment of the training runs.")
    promotion_experiment_name: str = Field(
        default="text-classifier-promotion", description="MLflow experiment of the promotion runs (gate decisions)."
    )
    monitoring_experiment_name: str = Field(
        default="text-classifier-monitoring", description="MLflow experiment of batch scoring and drift runs."
    )
    registered_model_name: str = Field(
        default=REGISTERED_MODEL_NAME, description="Default registered model of the `textclf` commands."
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the Bento service (its own setting of the same name); `textclf serve` sends "
        "it with its check request and prints it in the curl example as $TEXTCLF_API_TOKEN.",
    )
    optuna_storage: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the Optuna studies of the sweep flow (for example "
        "postgresql+psycopg://user@host:5432/optuna); unset means an SQLite file under the data folder.",
    )

    @property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def uses_embedded_prefect(self) -> bool:
        return self.prefect_api_url is None

    @property
    def uses_embedded_mlflow(self) -> bool:
        return self.mlflow_tracking_uri is None

    @property
    def resolved_prefect_api_url(self) -> str:
        return self.prefect_api_url or f"http://{self.host}:{self.prefect_port}/api"

    @property
    def resolved_mlflow_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def resolved_optuna_storage(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.root / 'optuna' / 'studies.db'}"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweeps"

    @property
    def snapshot_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def preprocess_cache_dir(self) -> Path:
        return self.root / "cache" / "preprocessed"

    @property
    def fine_tune_dir(self) -> Path:
        return self.root / "fine-tune"

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluations"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def model_download_dir(self) -> Path:
        return self.root / "models"

    @property
    def promotion_dir(self) -> Path:
        return self.root / "promotion"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"
