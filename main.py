"""Train a model from YAML configs: `python main.py --base configs/....yaml -t`.

The interface of the original Stable Diffusion main.py: configs are merged left to right,
trailing `key=value` arguments override them (OmegaConf dot-list), `-r` resumes a run in its
own log dir, and the config's `lightning:` section configures the Trainer, logger and callbacks.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from ldm.callbacks import (
    AtomicCheckpointIO,
    DataReport,
    NonFiniteLossGuard,
    RNGStateCallback,
    SaveOnInterrupt,
    SetupCallback,
)
from ldm.checkpoint import (
    BEST_CHECKPOINT,
    STEP_CHECKPOINT,
    UNSAFE_PICKLE_FLAG,
    CheckpointError,
    checkpoint_dir,
    config_dir,
    is_checkpoint,
    last_checkpoint,
    load_weights,
    saved_at,
    saved_configs,
)
from ldm.data import DataModuleFromConfig  # noqa: F401  (original configs name main.DataModuleFromConfig)
from ldm.progress import StepProgressBar
from ldm.strategies import make_strategy
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger("main")

# Command-line flags that set a Trainer argument of the same name when given.
TRAINER_FLAGS = (
    "accelerator",
    "devices",
    "precision",
    "max_steps",
    "accumulate_grad_batches",
    "num_nodes",
    "strategy",
)
DEFAULT_SEED = 23
RUN_TIMESTAMP_ENV = "LDM_RUN_TIMESTAMP"
HPC_PREFIX = "hpc_ckpt_"  # Lightning's SLURM requeue checkpoints, in the log dir itself
KEEP_CHECKPOINTS = 3  # step checkpoints kept by default (and best ones, with a monitor)
DEFAULT_LOGGER = {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"name": "csv"}}
# Callbacks every run gets, under `lightning.callbacks`: an override such as
# `lightning.callbacks.progress_log.params.every_n_steps=50` sets their arguments, and
# `lightning.callbacks.loss_curve=null` leaves one out.
DEFAULT_CALLBACKS = {
    "progress_log": {"target": "ldm.progress.ProgressLog", "params": {"every_n_steps": None}},
    "loss_curve": {"target": "ldm.progress.LossCurve"},
}
# Lightning warnings about what is here by design: the frozen first and condition stages stay
# in eval mode, and the autoencoder's checkpoints hold the state after its (manual) step.
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"Using ModelCheckpoint with manual optimization",
)


def str2bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "-b",
        "--base",
        nargs="*",
        metavar="config.yaml",
        default=[],
        help="configs, merged left to right; `key=value` arguments after them override",
    )
    add(
        "-t",
        "--train",
        action="store_true",
        help="train; without it, evaluate on the test split (else validation) and stop",
    )
    add("-n", "--name", default="", help="postfix of the log dir name")
    add("-p", "--project", help="name of a new or existing project log dir")
    add("-r", "--resume", default="", help="resume from a log dir or a checkpoint in one")
    add(
        "--resume_if_exists",
        action="store_true",
        help="with -p NAME: resume that log dir (-r) if it holds a checkpoint, else start it; "
        "one command for a job that SLURM requeues",
    )
    add("-s", "--seed", type=int, help=f"the run's seed (default {DEFAULT_SEED}; -r: the run's)")
    add("-l", "--logdir", default="logs", help="where log dirs are created")
    add(
        "--scale_lr",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="scale base_learning_rate by accumulate * devices * nodes * batch size",
    )
    add("-d", "--debug", action="store_true", help="put the log dir under logdir/debug_runs")
    add("--no-test", action="store_true", help="skip testing after training")
    add(
        "--finetune_from",
        default="",
        help="initialise weights (only) from a .ckpt/.safetensors or a diffusers folder",
    )
    add(
        UNSAFE_PICKLE_FLAG,
        action="store_true",
        help="unpickle Python objects in --finetune_from / -r .ckpt files (runs their code: "
        "only for files you trust; off: tensors only)",
    )
    add("--accelerator", help="cpu, gpu, mps or auto")
    add("--devices", "--gpus", dest="devices", help="number or list of devices, e.g. 2 or 0,1")
    add("--precision", choices=["32", "32-true", "16-mixed", "bf16-mixed", "bf16-true"])
    add("--max_steps", type=int)
    add("--accumulate_grad_batches", type=int)
    add("--num_nodes", type=int)
    add("--strategy", help="e.g. ddp, ddp_find_unused_parameters_true, fsdp")
    add("--compile", action="store_true", help="torch.compile the UNet (model.params.compile)")
    return parser


def latest_checkpoint(logdir: str) -> str | None:
    """The newest of a run's `last.ckpt` and the `hpc_ckpt_<N>.ckpt` files that Lightning's
    SLURM requeue writes into the log dir itself (all are written whole, then renamed)."""
    found = [last_checkpoint(logdir), *Path(logdir).glob(f"{HPC_PREFIX}*.ckpt")]
    found = [path for path in found if is_checkpoint(path)]  # a file, or FSDP's sharded dir
    return str(max(found, key=lambda path: saved_at(path))) if found else None


def resolve_resume(resume: str) -> tuple[str, str]:
    """(log dir, checkpoint) of a `-r` argument: a log dir or a checkpoint inside one."""
    if not os.path.exists(resume):
        raise FileNotFoundError(f"-r/--resume: {resume!r} does not exist")
    if is_checkpoint(resume):
        folder = os.path.dirname(os.path.abspath(resume))
        if not os.path.basename(resume).startswith(HPC_PREFIX):
            folder = os.path.dirname(folder)  # checkpoints/ holds all but the SLURM ones
        return folder, resume
    ckpt = latest_checkpoint(resume.rstrip("/"))
    if ckpt is None:
        raise FileNotFoundError(
            f"-r/--resume: no {last_checkpoint(resume.rstrip('/'))}; pass the checkpoint "
            "to resume from"
        )
    return resume.rstrip("/"), ckpt


def run_timestamp() -> str:
    """The run's start time, which names its log dir. The DDP processes that Lightning starts
    by running this script again (LOCAL_RANK 1, 2, ...) take the one their parent put in
    RUN_TIMESTAMP_ENV instead of their own, so every rank uses the same log dir."""
    inherited = os.environ.get(RUN_TIMESTAMP_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return inherited
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_TIMESTAMP_ENV] = now
    return now


def resume_target(opt: argparse.Namespace, logroot: str) -> str:
    """What to resume: `-r`'s argument, or with --resume_if_exists the `-p` log dir once it
    holds a checkpoint (so that a requeued SLURM job, the same command again, goes on)."""
    if opt.resume or not opt.resume_if_exists:
        return opt.resume
    if not opt.project:
        raise SystemExit(
            "main.py: --resume_if_exists needs -p NAME, a log dir whose name does not change "
            "when the same command runs again"
        )
    project = os.path.join(logroot, opt.project)
    return project if latest_checkpoint(project) else ""


def make_run_dirs(opt: argparse.Namespace, now: str) -> tuple[str, str, list[str]]:
    """(log dir, checkpoint to resume from or "", config files) for this run."""
    logroot = os.path.join(opt.logdir, "debug_runs") if opt.debug else opt.logdir
    resume = resume_target(opt, logroot)
    if resume:
        logdir, ckpt = resolve_resume(resume)
        logger.info("resuming %s from %s", logdir, ckpt)
        saved = [str(path) for path in saved_configs(logdir)]
        return logdir, ckpt, saved + opt.base
    if not opt.base:
        raise SystemExit("main.py: pass at least one config with --base (or -r to resume)")
    name = opt.name or os.path.splitext(os.path.basename(opt.base[0]))[0]
    return os.path.join(logroot, opt.project or f"{now}_{name}"), "", opt.base


def load_config(files: list[str], overrides: list[str]) -> DictConfig:
    """Merge YAML files left to right, then `key=value` overrides."""
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--base: config {path!r} does not exist")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"main.py: unrecognised arguments {bad}; overrides look like key=value")
    configs = [OmegaConf.load(path) for path in files]
    return OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))


def run_seed(flag: int | None, config: DictConfig, resuming: bool) -> int:
    """The run's seed: `-s`, else the config's `seed:`, else 23; stored as `seed:` in the saved
    config, so that `-r` takes it back. On resume an `-s` that differs from it is refused."""
    saved = None if config.get("seed") is None else int(config.seed)
    if resuming and saved is None:
        logger.warning(
            "the run's configs record no seed (an older run): taking %s",
            DEFAULT_SEED if flag is None else flag,
        )
    elif resuming and flag is not None and flag != saved:
        raise ConfigError(
            f"-s {flag}: this run was started with seed {saved} (in its configs/); resume "
            f"without -s to continue it exactly, or add the override seed={flag} to change it"
        )
    if flag is not None:
        return flag
    return saved if saved is not None else DEFAULT_SEED


def trainer_kwargs(opt: argparse.Namespace, lightning_config: DictConfig) -> dict:
    """The config's `lightning.trainer`, with command-line flags on top."""
    kwargs = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()))
    for flag in TRAINER_FLAGS:
        value = getattr(opt, flag)
        if value is not None:
            kwargs[flag] = int(value) if flag == "devices" and value.isdigit() else value
    kwargs.setdefault("accelerator", "auto")
    kwargs.setdefault("enable_progress_bar", interactive())
    return kwargs


def interactive() -> bool:
    """Whether someone watches a terminal: then a progress bar (to stdout) shows the run;
    output piped to a file gets ProgressLog's lines (through logging, to stderr) instead."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def device_count(kwargs: dict) -> int:
    devices = kwargs.get("devices", 1)
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        return len([d for d in devices.split(",") if d.strip()])
    return 1


def set_learning_rate(model, config: DictConfig, kwargs: dict, scale: bool) -> None:
    """base_learning_rate, times accumulate × devices × nodes × batch size with --scale_lr."""
    base_lr = config.model.get("base_learning_rate", model.learning_rate)
    batch_size = config.data.params.batch_size
    n = kwargs.get("accumulate_grad_batches", 1) * device_count(kwargs)
    n *= kwargs.get("num_nodes", 1) * batch_size
    model.learning_rate = n * base_lr if scale else base_lr
    logger.info(
        "learning rate %.2e = %s%.2e (base)",
        model.learning_rate,
        f"{n} (accumulate × devices × nodes × batch) × " if scale else "",
        base_lr,
    )


def checkpoint_callbacks(ckptdir: str, monitor, config: DictConfig, lightning_config) -> list:
    """`last.ckpt`, the last K step checkpoints and, when the model names a `monitor` and the
    data has a validation split, the best K by it (`best-*.ckpt`, lowest first).

    K is `lightning.modelcheckpoint.params.save_top_k` (KEEP_CHECKPOINTS; -1 keeps every step
    checkpoint, and then the single best by the monitor rather than a copy of each).
    """
    params = OmegaConf.select(lightning_config, "modelcheckpoint.params")
    params = {} if params is None else OmegaConf.to_container(params)  # none in the config
    keep = params.get("save_top_k", KEEP_CHECKPOINTS)
    steps = {
        "dirpath": ckptdir,
        "filename": STEP_CHECKPOINT,
        "save_last": True,
        "every_n_train_steps": None,
        "monitor": "step",
        "mode": "max",
        "save_top_k": keep,
    }
    callbacks = [ModelCheckpoint(**{**steps, **params})]
    if monitor and keep != 0 and config.get("data", {}).get("params", {}).get("validation"):
        best = ModelCheckpoint(
            dirpath=ckptdir,
            filename=BEST_CHECKPOINT,
            monitor=monitor,
            mode="min",
            save_top_k=1 if keep == -1 else keep,
            save_last=False,
        )
        callbacks.append(best)
    return callbacks


def make_callbacks(now, logdir, config, lightning_config, model, bar: bool) -> list[pl.Callback]:
    """main.py's callbacks, `DEFAULT_CALLBACKS` and the config's `lightning.callbacks`; with
    `bar` (the Trainer's enable_progress_bar), a StepProgressBar unless the config names one."""
    ckptdir, cfgdir = str(checkpoint_dir(logdir)), str(config_dir(logdir))
    callbacks = [
        SetupCallback(now, logdir, ckptdir, cfgdir, config, lightning_config),
        RNGStateCallback(),
        NonFiniteLossGuard(),
        SaveOnInterrupt(ckptdir),
        DataReport(),
        LearningRateMonitor(logging_interval="step"),
        *checkpoint_callbacks(ckptdir, getattr(model, "monitor", None), config, lightning_config),
    ]
    configured = OmegaConf.merge(DEFAULT_CALLBACKS, lightning_config.get("callbacks", {}))
    for cfg in configured.values():
        if cfg is not None:
            callbacks.append(instantiate_from_config(cfg))
    if bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    return callbacks


def make_logger(logdir: str, lightning_config: DictConfig):
    config = OmegaConf.merge(DEFAULT_LOGGER, lightning_config.get("logger", {}))
    config.params.setdefault("save_dir", logdir)
    return instantiate_from_config(config)


def finetune_from(model, path: str, unsafe_pickle: bool = False) -> None:
    """Initialise weights (not optimizer state) from a checkpoint, original SD files included."""
    if hasattr(model, "init_from_ckpt"):  # strict; the EMA restarts from the loaded weights
        model.init_from_ckpt(path, unsafe_pickle=unsafe_pickle)
    else:
        load_weights(model, path, unsafe_pickle=unsafe_pickle)  # strict: every key, every shape
    logger.info("fine-tuning from %s", path)


def build_model(config: DictConfig, opt: argparse.Namespace):
    """The config's model, with --finetune_from's weights. A LoRA fine-tune takes them as the
    config's ckpt_path, so that the saved config names the base its adapter checkpoints (which
    leave the frozen base out) resume on and sample with."""
    if opt.finetune_from and config.model.get("params", {}).get("lora_config") is not None:
        config.model.params.ckpt_path = os.path.abspath(opt.finetune_from)
        return instantiate_from_config(config.model)
    model = instantiate_from_config(config.model)
    if opt.finetune_from:
        finetune_from(model, opt.finetune_from, opt.unsafe_pickle)
    return model


def main(argv: list[str] | None = None) -> pl.Trainer:
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    opt, overrides = get_parser().parse_known_args(argv)
    now = run_timestamp()
    logdir, resume_ckpt, files = make_run_dirs(opt, now)
    config = load_config(files, overrides)
    if opt.compile:
        config.model.setdefault("params", {})["compile"] = True
    lightning_config = config.pop("lightning", OmegaConf.create())
    config.seed = run_seed(opt.seed, config, resuming=bool(resume_ckpt))
    # The run's seed builds the model (the same weights on every rank) and orders the data;
    # RNGStateCallback then gives each rank its own stream, derived from it and the rank.
    pl.seed_everything(config.seed, workers=True)
    model = build_model(config, opt)
    if "data" not in config:
        raise ConfigError("the merged config has no `data:` section to train on")
    data = instantiate_from_config(config.data)
    kwargs = trainer_kwargs(opt, lightning_config)
    world_size = device_count(kwargs) * kwargs.get("num_nodes", 1)
    kwargs["strategy"] = make_strategy(
        kwargs.get("strategy"), model, world_size=world_size, options=lightning_config.get("fsdp")
    )
    set_learning_rate(model, config, kwargs, opt.scale_lr)
    trainer = pl.Trainer(
        **kwargs,
        logger=make_logger(logdir, lightning_config),
        callbacks=make_callbacks(
            now, logdir, config, lightning_config, model, kwargs["enable_progress_bar"]
        ),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our samplers split data across ranks themselves
        default_root_dir=logdir,
    )
    if not opt.train:
        evaluate(trainer, model, data, config, resume_ckpt or None, opt.unsafe_pickle)
        return trainer
    trainer.fit(model, data, ckpt_path=resume_ckpt or None, weights_only=not opt.unsafe_pickle)
    if not opt.no_test and not trainer.interrupted and config.data.params.get("test"):
        trainer.test(model, data)
    return trainer


def evaluate(trainer, model, data, config, ckpt: str | None, unsafe_pickle: bool) -> None:
    """Without -t: the test split's losses, else the validation split's, of the model as built
    (or of the checkpoint `-r` names)."""
    split = next((s for s in ("test", "validation") if config.data.params.get(s)), None)
    if split is None:
        raise SystemExit(
            "main.py: without -t main.py only evaluates, and the config has no validation or "
            "test split under data.params; pass -t to train"
        )
    run = trainer.test if split == "test" else trainer.validate
    run(model, data, ckpt_path=ckpt, weights_only=not unsafe_pickle)


def cli(argv: list[str] | None = None) -> pl.Trainer:
    """main() as the command line runs it: a bad config or checkpoint exits with one line."""
    try:
        return main(argv)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"main.py: {err}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli()
