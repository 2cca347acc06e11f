"""scripts/launch_torchrun.sh and scripts/launch_slurm.sh: two "nodes" on one machine, and the SLURM wiring.

The torchrun test starts the launcher twice, as node rank 0 and node rank 1 (one CPU rank each, gloo), which
rendezvous on 127.0.0.1 and train one tiny Point-MAE together. The SLURM launcher runs under a stand-in
``srun`` (there is no SLURM here): one that only records what it was asked to start, and one that starts the
tasks locally with the variables SLURM gives each task, so that Lightning's SLURMEnvironment runs for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from datapipes.datamodule import PointCloudDataModule
from datapipes.memory import load_split_arrays
from datapipes.synthetic import write_synthetic
from pretrain.checkpoint import load_encoder
from pretrain.methods.base import PretrainModule
from tests.cli_helpers import REPO, assert_one_error_line, repo_env, run_command
from tests.pretrain.methods.tiny_cli import RUNTIME, tiny_encoder

TORCHRUN_SCRIPT = REPO / "scripts" / "launch_torchrun.sh"
SLURM_SCRIPT = REPO / "scripts" / "launch_slurm.sh"
CONFIG = REPO / "configs" / "pretrain" / "point_mae_tiny.yaml"
#: tiny Point-MAE overrides (after CONFIG): 8 groups of 8 points, 32 wide, 1 decoder block, 64-point clouds.
TINY = [*tiny_encoder(num_groups=8, tokenizer_dim=32), "--model.init_args.decoder_depth=1", *RUNTIME]
#: the commands the launchers start, in this interpreter (the console scripts may belong to another one).
COMMANDS = {
    "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
    "PCPT_PRETRAIN": f"{sys.executable} -m pretrain.cli",
}
THIS = "tests.scripts.test_multinode_launch"
RECORD_RANK = "tests.pretrain.methods.record_callback.RecordRank"

#: a stand-in for torchrun or srun that writes its arguments and the launch variables to $FAKE_RECORD.
RECORDER = """#!{python}
import json, os, sys
keep = ("SLURM", "SRUN", "MASTER", "NNODES", "NODE_RANK", "NPROC", "PCPT_RUN_DIR")
env = {{k: v for k, v in os.environ.items() if k.startswith(keep)}}
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": env}}, f)
"""

#: a stand-in for srun that starts --nodes x --ntasks-per-node local tasks with SLURM's per-task variables.
LOCAL_SRUN = """#!{python}
import os, subprocess, sys
opts, argv = {{}}, sys.argv[1:]
while argv and argv[0].startswith("--"):
    key, _, value = argv.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = {{**os.environ, "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
               "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local),
               "SLURM_PROCID": str(node * per_node + local), "SLURM_NODELIST": "127.0.0.1"}}
        procs.append(subprocess.Popen(argv, env=env))
codes = [p.wait() for p in procs]
sys.exit(max(codes))
"""


class SaveRankState(pl.Callback):
    """Writes, per rank, where it ran (``topo<r>.json``) and its exported module (``state<r>.safetensors``).

    The safetensors file holds the state of the module the artifact is made of (parameters and buffers).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, PretrainModule)
        exported = pl_module.exported()
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        state = {k: v.detach().cpu().contiguous() for k, v in exported.state_dict().items()}
        save_file(state, out / f"state{rank}.safetensors")
        topo = {
            "global_rank": rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices,
            "default_root_dir": trainer.default_root_dir,
            # a single-device strategy (no DDP) has neither
            "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "parameters": sorted(name for name, _ in exported.named_parameters()),
        }
        (out / f"topo{rank}.json").write_text(json.dumps(topo))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo dataset: 32 training clouds of 96 points (4 classes), in shards of 8."""
    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root, classes=4, per_class=8, test_per_class=2, points=96, shard_size=8)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(**extra: str) -> dict[str, str]:
    """:func:`repo_env` without launch variables from outside (SLURM_*, SRUN_*, MASTER_*, NNODES, ...)."""
    outside = ("SLURM_", "SRUN_", "MASTER_", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "TORCHRUN", "PCPT_")
    return {**{k: v for k, v in repo_env().items() if not k.startswith(outside)}, **extra}


def fake_command(folder: Path, name: str, template: str) -> Path:
    """Writes an executable ``folder/name`` from ``template`` (run by this interpreter)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(template.format(python=sys.executable))
    path.chmod(0o755)
    return path


def record_args(record: Path) -> list[str]:
    """``--trainer.callbacks`` arguments adding :class:`RecordRank` and :class:`SaveRankState`."""
    return [
        f"--trainer.callbacks+={RECORD_RANK}", f"--trainer.callbacks.out_dir={record}",
        f"--trainer.callbacks+={THIS}.SaveRankState", f"--trainer.callbacks.out_dir={record}",
    ]  # fmt: skip


def read_ranks(record: Path) -> list[dict[str, Any]]:
    """Per rank: RecordRank's JSON, SaveRankState's JSON (under ``topo``) and tensors (under ``state``)."""
    ranks = []
    for r in (0, 1):
        found = sorted(p.name for p in record.iterdir()) if record.is_dir() else []
        assert (record / f"rank{r}.json").is_file(), f"no record of global rank {r}, only {found}"
        rank = json.loads((record / f"rank{r}.json").read_text())
        rank["topo"] = json.loads((record / f"topo{r}.json").read_text())
        rank["state"] = load_file(record / f"state{r}.safetensors")
        ranks.append(rank)
    return ranks


def check_same_model(ranks: list[dict[str, Any]], artifact: Path, *, step: int) -> None:
    """Both ranks hold the same parameters, and the artifact (written by rank 0) holds them too.

    BatchNorm running statistics are buffers that DDP keeps per rank (without ``sync_batchnorm``); the
    artifact has rank 0's.
    """
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # the whole LightningModule
    params = ranks[0]["topo"]["parameters"]
    assert params
    assert params == ranks[1]["topo"]["parameters"]
    for name in params:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    encoder, meta = load_encoder(artifact)
    assert meta["provenance"]["step"] == step
    saved = encoder.state_dict()
    assert set(saved) == set(ranks[0]["state"])
    for name, tensor in saved.items():
        assert torch.equal(tensor, ranks[0]["state"][name]), name


def run_all(
    cmds: list[list[str]], *, env: dict[str, str], logs: Path, timeout: float, cwd: Path = REPO
) -> None:
    """Runs the commands side by side to completion; asserts that all succeed.

    Each runs in its own process group with its output in ``logs/<i>.log``; on timeout every group (the
    launcher and the ranks it started) is killed.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(cmds):
        with (logs / f"{i}.log").open("w") as out:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # left-overs of a failed or hung run
    for i, code in enumerate(codes):
        assert code == 0, f"{cmds[i][:2]} exited with {code}:\n{(logs / f'{i}.log').read_text()[-3000:]}"


# ---------------------------------------------------------------------------------------- torchrun, for real
@pytest.mark.slow
@pytest.mark.ddp
def test_two_torchrun_nodes_train_one_model(demo: Path, tmp_path: Path) -> None:
    """Node ranks 0 and 1 (two launcher calls): disjoint samples per epoch, one model, one artifact."""
    run, record = tmp_path / "run", tmp_path / "record"
    fit = [
        str(CONFIG), *TINY, f"--data.data_root={demo}", "--data.streaming=false",
        "--trainer.accelerator=cpu", "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}",
        *record_args(record),
    ]  # fmt: skip
    # NNODES, MASTER_* and NPROC_PER_NODE from the environment, the node rank as an option
    env = launch_env(
        OMP_NUM_THREADS="1", NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), **COMMANDS,
    )  # fmt: skip
    nodes = [["bash", str(TORCHRUN_SCRIPT), "--node_rank", str(node), *fit] for node in (0, 1)]
    run_all(nodes, env=env, logs=tmp_path / "logs", timeout=240)

    ranks = read_ranks(record)
    for rank, topo in enumerate(r["topo"] for r in ranks):
        assert topo["global_rank"] == topo["node_rank"] == rank  # one rank per node
        assert topo["local_rank"] == 0
        assert (topo["world_size"], topo["num_nodes"], topo["num_devices"]) == (2, 2, 1)
        assert topo["cluster"] == "TorchElasticEnvironment"
        assert topo["backend"] == "gloo"

    # in-memory training data: a DistributedSampler gives each rank half of the split, disjoint, every epoch
    # (32 clouds / 2 ranks / batch 4 = 4 batches per rank and epoch, 2 epochs)
    train_keys = sorted(load_split_arrays(demo, "train", None)[2])
    assert len(train_keys) == 32
    epochs = [[[k for batch in r["keys"][e * 4 : (e + 1) * 4] for k in batch] for r in ranks] for e in (0, 1)]
    assert all(len(r["keys"]) == 8 for r in ranks)
    for epoch in epochs:
        assert len(epoch[0]) == len(epoch[1]) == 16
        assert not set(epoch[0]) & set(epoch[1])
        assert sorted(epoch[0] + epoch[1]) == train_keys
    assert epochs[0][0] != epochs[1][0]  # reshuffled each epoch
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8

    check_same_model(ranks, run / "encoder", step=8)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    for name, tensor in ranks[1]["state"].items():
        if name in ranks[1]["topo"]["parameters"]:
            assert torch.equal(ckpt["state_dict"][f"encoder.{name}"], tensor), name


# -------------------------------------------------------------------------------- torchrun, command line only
def test_torchrun_launcher_puts_the_topology_last(tmp_path: Path) -> None:
    record = tmp_path / "torchrun.json"
    fake = fake_command(tmp_path / "bin", "torchrun", RECORDER)
    env = launch_env(
        NNODES="3", NODE_RANK="0", MASTER_ADDR="node0", MASTER_PORT="29555", NPROC_PER_NODE="4",
        TORCHRUN=str(fake), PCPT_PRETRAIN=COMMANDS["PCPT_PRETRAIN"], FAKE_RECORD=str(record),
    )  # fmt: skip
    overrides = ["-c", "configs/trainer/ddp_gpu.yaml", "--data.data_root", "data/x", "--trainer.max_epochs=3"]
    result = run_command(
        ["bash", str(TORCHRUN_SCRIPT), "--nnodes", "2", "--node_rank=1", str(CONFIG), *overrides],
        env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recorded = json.loads(record.read_text())
    # one run folder for the ranks of this node, when no --trainer.default_root_dir is given
    assert re.fullmatch(r"runs/pretrain/\d{8}-\d{6}", recorded["env"]["PCPT_RUN_DIR"])
    assert recorded["argv"] == [
        "--nnodes=2", "--node_rank=1", "--nproc_per_node=4", "--master_addr=node0", "--master_port=29555",
        "--no-python", *COMMANDS["PCPT_PRETRAIN"].split(), "fit", "-c", str(CONFIG), *overrides,
        "--trainer.num_nodes=2", "--trainer.devices=4",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ([], {}, "missing CONFIG"),
        (["no/such.yaml"], {}, "no/such.yaml: no such file"),
        (["--nnodes", "2", "--node_rank", "2", str(CONFIG)], {}, "NODE_RANK 2 must be below NNODES 2"),
        ([str(CONFIG)], {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer"),
        ([str(CONFIG)], {"MASTER_PORT": "99999"}, "MASTER_PORT must be a TCP port"),
        (["--gpus", "2", str(CONFIG)], {}, "unknown option --gpus"),
        ([str(CONFIG), "--trainer.devices=2"], {}, "--trainer.devices=2: the topology comes from"),
        (["--node_rank"], {}, "--node_rank needs a value"),
    ],
)
def test_torchrun_launcher_refuses_bad_arguments(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    record = tmp_path / "torchrun.json"
    fake = fake_command(tmp_path / "bin", "torchrun", RECORDER)
    full_env = launch_env(TORCHRUN=str(fake), FAKE_RECORD=str(record), **{"NPROC_PER_NODE": "1", **env})
    result = run_command(["bash", str(TORCHRUN_SCRIPT), *args], env=full_env, cwd=REPO)
    assert result.returncode == 2
    assert_one_error_line("launch_torchrun.sh", result.stderr, needle)
    assert not record.exists()


@pytest.mark.parametrize("script", [TORCHRUN_SCRIPT, SLURM_SCRIPT])
def test_launchers_explain_themselves(script: Path) -> None:
    result = run_command(["bash", str(script), "--help"], cwd=REPO)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:")
    assert "CONFIG [OVERRIDES...]" in result.stdout


# ---------------------------------------------------------------------------------- SLURM, command line only
def slurm_env(tmp_path: Path, srun_template: str, **extra: str) -> dict[str, str]:
    """The variables of a batch job with a stand-in ``srun`` first on PATH."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", srun_template)
    env = launch_env()
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "pcpt-pretrain",
        "PCPT_PRETRAIN": COMMANDS["PCPT_PRETRAIN"],
        **extra,
    }


@pytest.mark.parametrize(
    "allocation",
    [
        {"SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4"},
        {"SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)"},  # no --ntasks-per-node: the task layout
    ],
)
def test_slurm_launcher_starts_one_task_per_gpu_on_every_node(
    tmp_path: Path, allocation: dict[str, str]
) -> None:
    record = tmp_path / "srun.json"
    env = slurm_env(tmp_path, RECORDER, FAKE_RECORD=str(record), SLURM_CPUS_PER_TASK="8", **allocation)
    overrides = ["-c", "configs/trainer/ddp_gpu.yaml", "--data.data_root", "data/x"]
    result = run_command(["bash", str(SLURM_SCRIPT), str(CONFIG), *overrides], env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    recorded = json.loads(record.read_text())
    assert recorded["argv"] == [
        "--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
        *COMMANDS["PCPT_PRETRAIN"].split(), "fit", "-c", str(CONFIG), *overrides,
        "--trainer.num_nodes=2", "--trainer.devices=4",
    ]  # fmt: skip
    assert recorded["env"]["SRUN_CPUS_PER_TASK"] == "8"
    # one run folder for every task, when no --trainer.default_root_dir is given
    assert re.fullmatch(r"runs/pretrain/\d{8}-\d{6}", recorded["env"]["PCPT_RUN_DIR"])


def test_sbatch_header_asks_for_one_task_per_gpu() -> None:
    header = {}
    for line in SLURM_SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            header[key] = value
    assert header["ntasks-per-node"] == header["gpus-per-node"]
    assert int(header["nodes"]) >= 2


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ([str(CONFIG)], {"SLURM_JOB_ID": ""}, "not inside a SLURM allocation"),
        ([], {}, "missing CONFIG"),
        ([str(CONFIG), "--trainer.num_nodes", "4"], {}, "--trainer.num_nodes: the topology comes from"),
        ([str(CONFIG)], {"SLURM_NTASKS_PER_NODE": ""}, "NTASKS_PER_NODE must be a positive integer"),
    ],
)
def test_slurm_launcher_refuses_bad_arguments(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    record = tmp_path / "srun.json"
    allocation = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "FAKE_RECORD": str(record)}
    full_env = slurm_env(tmp_path, RECORDER, **{**allocation, **env})
    result = run_command(["bash", str(SLURM_SCRIPT), *args], env=full_env, cwd=REPO)
    assert result.returncode == 2
    assert_one_error_line("launch_slurm.sh", result.stderr, needle)
    assert not record.exists()


# ------------------------------------------------------------------- SLURM, tasks started by a local srun
def expected_stream_keys(demo: Path, rank: int, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Sample keys of epochs 0 and 1 of the streaming loader of ``rank`` of 2 (the tiny run's data config)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = PointCloudDataModule(str(demo), val_split=None, num_points=64, batch_size=4, num_workers=0)
    loader = data.train_dataloader()
    return [[k for batch in loader for k in batch.key] for _ in range(2)]


@pytest.mark.slow
@pytest.mark.ddp
def test_slurm_launcher_under_local_srun_trains_one_model(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes x one task through Lightning's SLURMEnvironment: each rank its own stream, one model."""
    job, record = tmp_path / "job", tmp_path / "record"
    job.mkdir()
    env = slurm_env(
        tmp_path, LOCAL_SRUN, SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1",
        MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
    )  # fmt: skip
    fit = [
        str(CONFIG), *TINY, f"--data.data_root={demo}", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
        *record_args(record),
    ]  # fmt: skip
    # no --trainer.default_root_dir: the job's tasks agree on runs/pretrain/<time> in the submission folder
    run_all([["bash", str(SLURM_SCRIPT), *fit]], env=env, logs=tmp_path / "logs", timeout=240, cwd=job)

    ranks = read_ranks(record)
    for rank, topo in enumerate(r["topo"] for r in ranks):
        assert topo["global_rank"] == topo["node_rank"] == rank
        assert (topo["world_size"], topo["num_nodes"], topo["num_devices"]) == (2, 2, 1)
        assert topo["cluster"] == "SLURMEnvironment"
        assert topo["backend"] == "gloo"
    # streaming data: shards are drawn with replacement from streams seeded by (seed, rank, worker, epoch), so
    # ranks are not disjoint, but each rank must draw its own global rank's stream (not a copy of rank 0's)
    for rank in (0, 1):
        got = [[k for batch in ranks[rank]["keys"][e * 4 : (e + 1) * 4] for k in batch] for e in (0, 1)]
        assert got == expected_stream_keys(demo, rank, monkeypatch), f"rank {rank}"
    assert ranks[0]["keys"] != ranks[1]["keys"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    run_dirs = {r["topo"]["default_root_dir"] for r in ranks}
    assert len(run_dirs) == 1
    run = job / run_dirs.pop()
    assert run.parent == job / "runs" / "pretrain"
    check_same_model(ranks, run / "encoder", step=8)
