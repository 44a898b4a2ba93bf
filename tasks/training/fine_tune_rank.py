"""One data-parallel fine-tune process: `python -m torch.distributed.run ... -m tasks.training.fine_tune_rank JOB`,
started by the fine-tune stage (tasks/training/fine_tune.py `run_data_parallel`). It joins torchrun's process group
(gloo on the CPU, NCCL on GPUs, one GPU per process), then makes the stage's own `fine_tune` call as one rank: the
Trainer trains data-parallel in the group it finds."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.training.fine_tune import DataParallelJob, choose_device, fine_tune


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m torch.distributed.run ... -m tasks.training.fine_tune_rank JOB.json", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    job = DataParallelJob.model_validate_json(Path(argv[0]).read_text())
    device, _ = choose_device(job.config.device, job.config.precision)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")  # torchrun's rendezvous (env://)
    try:
        if device == "cuda":
            torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())  # one machine: one GPU per process
        fine_tune(job.data, job.config, job.output_root, job.tracking)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
