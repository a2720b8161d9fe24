"""Claim a run folder before a training stage starts: refuse what cannot be trained into, then lock it.

``stembed train`` checks everything here before a byte is written (a foreign ``--run-dir``, a ``--resume`` that is
no Lightning checkpoint, a GPU asked for that torch does not see), then owns ``RUN_DIR.lock`` until the run ends, so
a second run into the same folder refuses instead of mixing its checkpoints in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stembed.config import ConfigError, TrainConfig
from stembed.io.outputs import check_run_dir, lock_output


def check_train_paths(run_dir: Path | None, resume: Path | None, accelerator: str = "auto") -> None:
    """Refuse a foreign ``run_dir``, a ``resume`` that is not a Lightning checkpoint, and a GPU that is not there.

    Raises:
        ConfigError, OutputError: with the one-line fix.
    """
    if accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.accelerator is 'gpu' but torch sees no CUDA GPU; fix: --set train.accelerator=auto "
                "(or cpu)"
            )
    if resume is not None:
        if not resume.is_file():
            raise ConfigError(f"--resume {resume} does not exist; fix: pass a run's checkpoints/last.ckpt")
        if resume.suffix != ".ckpt":
            what = "a bundle (a finished model, which cannot be resumed)" if resume.suffix == ".pt" else "not one"
            raise ConfigError(
                f"--resume {resume} is {what}: --resume takes a Lightning checkpoint; "
                "fix: pass the run's checkpoints/last.ckpt"
            )
    if run_dir is not None:
        check_run_dir(run_dir)
    elif resume is not None:
        check_run_dir(resume.parent.parent, option="--resume's run folder")


def claim_run_folder(
    run_dir: Path | None, resume: Path | None, train: TrainConfig
) -> contextlib.AbstractContextManager[object]:
    """:func:`check_train_paths`, then a lock on the run folder held until the context ends.

    DDP ranks other than global rank 0 (the same command, run again by Lightning's launcher, torchrun or srun)
    neither check nor lock: rank 0 owns the folder for the whole run, and they write nothing. With neither
    folder given, the stage names a new one (time and config hash), which nothing else can hold yet.
    """
    from stembed.training.run import follower_rank

    if follower_rank(train):
        return contextlib.nullcontext()
    check_train_paths(run_dir, resume, train.accelerator)
    if run_dir is not None:
        return lock_output(run_dir, command="train", option="--run-dir")
    if resume is not None:
        return lock_output(resume.parent.parent, command="train", option="--resume's run folder")
    return contextlib.nullcontext()
