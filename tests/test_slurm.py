"""SLURM preemption without SLURM: main.py under the variables srun sets, with a stand-in
`scontrol` on PATH, gets the requeue signal (SIGUSR1, as `sbatch --signal=SIGUSR1@90` sends
it) mid-step, and the same command run again continues the run exactly.

Lightning's SLURMEnvironment (auto-requeue) saves `hpc_ckpt_<N>.ckpt` and calls
`scontrol requeue <job id>`; SLURM then sends the job SIGTERM, which the stand-in does too.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT

import main

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
JOB_ID = "4242"
SLURM_TASK = {  # one task of job 4242, as srun starts it
    "SLURM_JOB_ID": JOB_ID,
    "SLURM_JOB_NAME": "ldm-train",  # not "bash" / "interactive", which Lightning ignores
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
FAST = [
    "--accelerator",
    "cpu",
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.callbacks.image_logger=null",
]
EVERY_STEP = "lightning.modelcheckpoint.params.every_n_train_steps=1"
ACCUMULATE = ["--accumulate_grad_batches", "2"]  # the requeue waits for the optimizer step
SIGNAL_STEP = 3  # the requeue signal lands in the middle of this step (before backward)
MAX_STEPS = 6
# SLURM's stand-in: records its arguments, then ends the job as a requeue does, by SIGTERM.
SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
kill -TERM "$PPID"
"""


class SignalMidStep(pl.Callback):
    """Sends this process `signum` once, in the middle of global step `step` (after the
    forward pass, before backward and the optimizer step, where a real signal may land; in the
    first of its accumulated batches); with `rank`, only that rank's process."""

    def __init__(self, step: int, signum: str = "SIGUSR1", rank: int | None = None):
        super().__init__()
        self.step, self.signum, self.rank = step, signal.Signals[signum], rank

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            self.step = None  # once
            os.kill(os.getpid(), self.signum)


def stand_in_scontrol(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "scontrol"
    path.write_text(SCONTROL)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def task_env(cwd: Path, slurm: Path | None, rank: int, ntasks: int, port: int) -> dict:
    """The environment of SLURM task `rank` of `ntasks` (one node) of job 4242, with the
    stand-in scontrol first on PATH; without `slurm`, no SLURM variables at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    if slurm is None:
        return env
    env.update(SLURM_TASK, SCONTROL_LOG=str(cwd / "scontrol.log"), MASTER_PORT=str(port))
    env.update(SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks))
    env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
    env["PATH"] = os.pathsep.join([str(slurm), env["PATH"]])
    return env


def run_main(cwd: Path, *args: str, slurm: Path | None = None, ntasks: int = 1) -> list[tuple]:
    """(exit code, stderr) of each task of `python main.py -t --no-test <args>`, started as
    srun starts them when `slurm` (the stand-in's folder) is given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(ROOT / "main.py"), "-t", "--no-test", *args, *FAST]
    tasks, logs = [], [cwd / f"task{rank}.log" for rank in range(ntasks)]
    try:
        for rank, log in enumerate(logs):  # to files: a full pipe would stop a task
            env = task_env(cwd, slurm, rank, ntasks, port)
            with open(log, "w") as stderr:
                tasks.append(
                    subprocess.Popen(command, cwd=cwd, env=env, stdout=DEVNULL, stderr=stderr)
                )
        return [
            (task.wait(timeout=300), log.read_text()) for task, log in zip(tasks, logs, strict=True)
        ]
    finally:
        for task in tasks:
            task.kill()


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # a complete checkpoint loads without pickle


def assert_same(ours, reference, what: str) -> None:
    """Equal nested dicts / lists of tensors and numbers, bit for bit."""
    if isinstance(reference, dict):
        assert ours.keys() == reference.keys(), what
        for key in reference:
            assert_same(ours[key], reference[key], f"{what}.{key}")
    elif isinstance(reference, list | tuple):
        assert len(ours) == len(reference), what
        for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
            assert_same(a, b, f"{what}[{i}]")
    elif isinstance(reference, torch.Tensor):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0, msg=what)
    else:
        assert ours == reference, what


@pytest.mark.slow
def test_requeue_saves_a_whole_step_requeues_and_the_same_command_resumes_exactly(tmp_path):
    steps = ["--max_steps", str(MAX_STEPS), *ACCUMULATE]
    ((code, log),) = run_main(
        tmp_path, "--base", str(TINY), "-l", str(tmp_path / "ref"), *steps, EVERY_STEP
    )
    assert code == 0, log[-3000:]
    (ref_dir,) = (tmp_path / "ref").iterdir()

    slurm = stand_in_scontrol(tmp_path / "bin")
    callback = ["lightning.callbacks.signal.target=test_slurm.SignalMidStep"]
    callback += [f"lightning.callbacks.signal.params.step={SIGNAL_STEP}"]
    # the sbatch script's command: a fixed log dir name, resumed when it holds a checkpoint
    job = ["--base", str(TINY), "-l", str(tmp_path / "logs"), "-p", "run", "--resume_if_exists"]
    job += [*steps, *callback]
    ((_, log),) = run_main(tmp_path, *job, slurm=slurm)
    logdir = tmp_path / "logs" / "run"
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n", log[-3000:]
    assert "Bypassing SIGTERM" in log  # the requeue's SIGTERM ended the job

    # one checkpoint, of the whole step the signal came in, and nothing half-written beside it
    assert sorted(p.name for p in logdir.iterdir() if p.is_file()) == ["hpc_ckpt_1.ckpt"]
    assert not list(logdir.rglob("*.tmp"))
    hpc = load(logdir / "hpc_ckpt_1.ckpt")
    assert hpc["global_step"] == SIGNAL_STEP + 1 and hpc["optimizer_states"]
    step_ckpt = next((ref_dir / "checkpoints").glob(f"*step={SIGNAL_STEP + 1:09}.ckpt"))
    same_step = load(step_ckpt)  # what an uninterrupted run saves at the end of that step
    for key in ("state_dict", "optimizer_states", "loops", "global_step"):
        assert_same(hpc[key], same_step[key], key)
    rng = [c["callbacks"]["RNGStateCallback"] for c in (hpc, same_step)]
    assert_same(*rng, "RNG states")

    ((code, log),) = run_main(tmp_path, *job, slurm=slurm)  # the requeued job: the same command
    assert code == 0, log[-3000:]
    assert f"from {logdir / 'hpc_ckpt_1.ckpt'}" in log
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # not again
    resumed = load(logdir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == MAX_STEPS
    whole = load(ref_dir / "checkpoints" / "last.ckpt")
    assert_same(resumed["state_dict"], whole["state_dict"], "state_dict")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["run"]


def test_resume_takes_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    logdir = tmp_path / "run"
    (logdir / "checkpoints").mkdir(parents=True)
    assert main.latest_checkpoint(str(logdir)) is None
    last, hpc = logdir / "checkpoints" / "last.ckpt", logdir / "hpc_ckpt_2.ckpt"
    (logdir / ".hpc_ckpt_3.ckpt.1a2b3c4d.tmp").write_bytes(b"half")  # an unfinished write
    for age, path in enumerate((hpc, last, logdir / "hpc_ckpt_1.ckpt")):
        path.write_bytes(b"ckpt")
        os.utime(path, ns=(time.time_ns() - age * 10**9,) * 2)
    assert main.latest_checkpoint(str(logdir)) == str(hpc)
    assert main.resolve_resume(str(logdir)) == (str(logdir), str(hpc))
    assert main.resolve_resume(str(hpc)) == (str(logdir), str(hpc))
    assert main.resolve_resume(str(last)) == (str(logdir), str(last))
    os.utime(last)  # a SIGTERM after the requeue checkpoint, at a later step
    assert main.latest_checkpoint(str(logdir)) == str(last)


def test_resume_if_exists_needs_a_fixed_log_dir_name(tmp_path):
    with pytest.raises(SystemExit, match="needs -p NAME"):
        main.main(["--base", str(TINY), "-l", str(tmp_path), "-t", "--resume_if_exists"])


@pytest.mark.slow
def test_two_tasks_requeue_at_the_same_step_when_one_got_the_signal(tmp_path):
    """2 SLURM tasks (DDP on gloo); only rank 1 gets SIGUSR1 and only rank 0 the SIGTERM of
    the requeue: both save at the end of that step, and the requeued job goes on from it."""
    slurm = stand_in_scontrol(tmp_path / "bin")
    callback = ["lightning.callbacks.signal.target=test_slurm.SignalMidStep"]
    callback += [
        f"lightning.callbacks.signal.params.{k}" for k in (f"step={SIGNAL_STEP}", "rank=1")
    ]
    job = ["--base", str(TINY), "-l", str(tmp_path / "logs"), "-p", "run", "--resume_if_exists"]
    job += ["--max_steps", str(MAX_STEPS), "--devices", "2", "--strategy", "ddp", *callback]
    logs = run_main(tmp_path, *job, slurm=slurm, ntasks=2)
    logdir = tmp_path / "logs" / "run"
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n", logs[0][1][-3000:]
    assert sorted(p.name for p in logdir.iterdir() if p.is_file()) == ["hpc_ckpt_1.ckpt"]
    hpc = load(logdir / "hpc_ckpt_1.ckpt")
    assert hpc["global_step"] == SIGNAL_STEP + 1
    assert len(hpc["callbacks"]["RNGStateCallback"]["ranks"]) == 2

    logs = run_main(tmp_path, *job, slurm=slurm, ntasks=2)
    assert [code for code, _ in logs] == [0, 0], logs[0][1][-3000:] + logs[1][1][-3000:]
    assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
