"""Fine-tune stage: training, class weights, device choice, reuse, and resume after an interruption."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tasks.training.fine_tune import (
    FineTuneConfig,
    class_weights,
    cpu_has_native_bf16,
    fine_tune,
    last_complete_checkpoint,
    run_key,
)
from tests.fixtures import fine_tune_until_first_checkpoint, run_without_gpu


def test_fine_tune_learns_the_fixture_and_writes_a_complete_model(tuned_fixture, prepared_fixture):
    _, prepared = prepared_fixture
    assert tuned_fixture.best_validation_macro_f1 > 0.8
    # The fixture asks for device "auto": CUDA in bf16 (or fp16) where a GPU is visible, else the CPU, in bf16 where
    # it has native bf16 instructions (this project's CI machine has AVX512-BF16), else fp32.
    if torch.cuda.is_available():
        assert tuned_fixture.device == "cuda" and tuned_fixture.precision in ("bf16", "fp16")
    else:
        expected = "bf16" if cpu_has_native_bf16() else "fp32"
        assert tuned_fixture.device == "cpu" and tuned_fixture.precision == expected
    files = {p.name for p in tuned_fixture.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json", "textclf.json"} <= files
    assert json.loads((tuned_fixture.model_dir / "labels.json").read_text()) == prepared.label_names
    config = json.loads((tuned_fixture.model_dir / "config.json").read_text())
    assert sorted(config["id2label"].values()) == prepared.label_names


def test_same_fine_tune_again_reuses_the_finished_model(tuned_fixture, prepared_fixture, tiny_model_dir):
    _, prepared = prepared_fixture
    root = tuned_fixture.model_dir.parents[1]
    config = FineTuneConfig(
        base_model=str(tiny_model_dir), epochs=8, batch_size=8, learning_rate=2e-3, early_stopping_patience=0
    )
    again = fine_tune(prepared, config, root)
    assert again.reused and again.model_dir == tuned_fixture.model_dir


def test_class_weights_are_inverse_frequency():
    weights = class_weights([0, 0, 0, 1], num_labels=2)
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2])


def test_class_weighted_loss_trains(prepared_fixture, tiny_model_dir, tmp_path):
    _, prepared = prepared_fixture
    config = FineTuneConfig(base_model=str(tiny_model_dir), epochs=1, batch_size=8, class_weighted_loss=True)
    result = fine_tune(prepared, config, tmp_path)
    assert result.global_step == -(-prepared.split_sizes["train"] // 8)


def test_device_falls_back_to_cpu_with_all_cores():
    # Asking for CUDA where there is no GPU must fall back to the CPU, on every core this process may use. Run in a
    # child with no visible GPU (CUDA_VISIBLE_DEVICES=""), so the test checks the fallback on a GPU machine too.
    done = run_without_gpu(
        "import os, torch\n"
        "from tasks.training.fine_tune import choose_device\n"
        "torch.set_num_threads(1)\n"
        "print(*choose_device('cuda'), torch.get_num_threads(), len(os.sched_getaffinity(0)))\n"
    )
    device, precision, threads, cores = done.stdout.split()
    assert (device, precision) == ("cpu", "bf16" if cpu_has_native_bf16() else "fp32")
    assert threads == cores
    assert "CUDA was requested but no GPU is visible" in done.stderr


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Cooper Lake and later
        ("flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids (AMX)
        ("Features\t: fp asimd sve bf16 i8mm", True),  # Arm (Graviton 3)
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without bf16: emulated
        ("Features\t: fp asimd", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\n{flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def test_an_explicit_precision_is_kept_and_fp16_on_the_cpu_is_refused_by_name():
    done = run_without_gpu(  # checks the CPU's choices on a GPU machine too
        "from tasks.training.fine_tune import choose_device\n"
        "print(*choose_device('cpu', 'fp32'), *choose_device('auto', 'bf16'))\n"
        "try:\n"
        "    choose_device('cpu', 'fp16')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    chosen, refused = done.stdout.splitlines()
    assert chosen.split() == ["cpu", "fp32", "cpu", "bf16"]
    assert refused.startswith("precision fp16 needs a GPU and none is visible")


@pytest.mark.gpu
def test_fine_tune_on_cuda_trains_in_reduced_precision(prepared_fixture, tiny_model_dir, tmp_path):
    # Where a GPU is visible: "cuda" trains there in bf16 (fp16 where bf16 is not supported) and still learns.
    _, prepared = prepared_fixture
    config = FineTuneConfig(
        base_model=str(tiny_model_dir),
        device="cuda",
        epochs=8,
        batch_size=8,
        learning_rate=2e-3,
        early_stopping_patience=0,
    )
    result = fine_tune(prepared, config, tmp_path)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert (result.device, result.precision) == ("cuda", expected)
    assert result.best_validation_macro_f1 > 0.8


def test_interrupted_fine_tune_resumes_from_its_last_checkpoint(prepared_fixture, tiny_model_dir, tmp_path):
    _, prepared = prepared_fixture
    config = FineTuneConfig(
        base_model=str(tiny_model_dir), epochs=60, batch_size=8, learning_rate=1e-3, early_stopping_patience=0
    )
    work = tmp_path / run_key(prepared, config)
    process = fine_tune_until_first_checkpoint(prepared, config, tmp_path, tmp_path / "child.log")
    process.send_signal(signal.SIGKILL)  # like a pre-empted machine: no clean shutdown
    process.wait()
    assert not (work / "result.json").exists()
    interrupted_at = last_complete_checkpoint(work / "checkpoints")
    steps_done = int(interrupted_at.name.split("-")[1])

    result = fine_tune(prepared, config, tmp_path)

    assert result.resumed_from_checkpoint is not None
    assert int(result.resumed_from_checkpoint.split("-")[1]) >= steps_done
    steps_per_epoch = -(-prepared.split_sizes["train"] // config.batch_size)
    assert result.global_step == steps_per_epoch * config.epochs
    # The resumed run trained only the remaining steps: the Trainer's own log starts where the checkpoint ended.
    state = json.loads((last_complete_checkpoint(work / "checkpoints") / "trainer_state.json").read_text())
    assert state["global_step"] == result.global_step


def test_incomplete_checkpoints_are_removed_and_skipped(tmp_path):
    from tasks.training.fine_tune import remove_incomplete_checkpoints

    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-20"
    assert (tmp_path / "checkpoint-30").exists()  # looking does not delete
    remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]
