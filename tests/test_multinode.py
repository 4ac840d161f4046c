"""Two "nodes" on one machine: `torchrun --nnodes 2` twice (node ranks 0 and 1, one CPU
process each, gloo) running main.py with `--num_nodes 2`, as on a cluster without SLURM.

Rank 0 alone writes the run: one log dir (node 1 starts later, so its own clock would name
another), one set of configs, checkpoints and CSV logs; `-r` on two nodes continues the steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
NODE = ["--accelerator", "cpu", "--devices", "1", "--num_nodes", "2"]
FAST = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.callbacks.image_logger=null",
]
NODE_START_GAP_S = 1.5  # nodes never start in the same second: node 1's timestamp differs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(cwd: Path, *args: str, timeout: int = 300) -> list[str]:
    """Each node's output of `torchrun ... main.py -t --no-test <args>` on 2 nodes."""
    port = str(free_port())
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # tests/: probes.RNGProbe
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    nodes, logs = [], [cwd / f"node{rank}.log" for rank in (0, 1)]
    try:
        for rank, log in enumerate(logs):  # output to files: a full pipe would stop a node
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            torchrun += ["--node_rank", str(rank), "--nproc_per_node", "1"]
            torchrun += ["--master_addr", "127.0.0.1", "--master_port", port]
            command = [*torchrun, str(ROOT / "main.py"), "-t", "--no-test", *NODE, *args, *FAST]
            with open(log, "w") as out:
                nodes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out))
            time.sleep(NODE_START_GAP_S)
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    outputs = [log.read_text() for log in logs]
    for rank, (code, output) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"node {rank}:\n{output[-3000:]}"
    return outputs


def the_logdir(logs: Path) -> Path:
    logdirs = sorted(logs.iterdir())
    assert len(logdirs) == 1, f"expected one log dir, found {[p.name for p in logdirs]}"
    return logdirs[0]


def read_logdirs(folder: Path, start: int) -> list[str]:
    """The log dir (`trainer.default_root_dir`) each rank's RNGProbe recorded."""
    paths = [folder / f"probe-rank{rank}-from{start}.json" for rank in (0, 1)]
    return [json.loads(path.read_text())["logdir"] for path in paths]


def last_checkpoint(logdir: Path) -> dict:
    return torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_two_nodes_write_one_run_and_resume_it(tmp_path):
    logs = tmp_path / "logs"
    probe = ["lightning.callbacks.probe.target=probes.RNGProbe"]
    probe += [f"lightning.callbacks.probe.params.dir={tmp_path / 'probes'}"]
    run_two_nodes(tmp_path, "--base", str(TINY), "-l", str(logs), "--max_steps", "2", *probe)
    logdir = the_logdir(logs)
    assert read_logdirs(tmp_path / "probes", start=0) == [str(logdir)] * 2
    checkpoint = last_checkpoint(logdir)
    assert checkpoint["global_step"] == 2
    assert len(checkpoint["callbacks"]["RNGStateCallback"]["ranks"]) == 2  # both took part
    assert "optimizer_states" in checkpoint
    configs = sorted(p.name.split("-")[-1] for p in (logdir / "configs").iterdir())
    assert configs == ["lightning.yaml", "project.yaml"]
    assert [p.name for p in (logdir / "csv").iterdir()] == ["version_0"]

    run_two_nodes(tmp_path, "-r", str(logdir), "--max_steps", "4", *probe)
    assert the_logdir(logs) == logdir
    checkpoint = last_checkpoint(logdir)
    assert checkpoint["global_step"] == 4
    assert len(checkpoint["callbacks"]["RNGStateCallback"]["ranks"]) == 2
    assert sorted(p.name for p in (logdir / "csv").iterdir()) == ["version_0", "version_1"]
    assert read_logdirs(tmp_path / "probes", start=2) == [str(logdir)] * 2
