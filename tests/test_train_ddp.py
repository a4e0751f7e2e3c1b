"""Two real processes (torchrun, gloo on CPU) train the same trajectory as one process with their global batch:
data-parallel with a full-precision base, FSDP (the 4-bit base sharded across the ranks) with nf4."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.ports import free_port
from tests.test_train_resume import REPO, RUNNER, losses, make_project

TOML_EXTRA = "packing = true"
# stops both ranks right after the step-4 checkpoint, as a kill would: the next run must resume from it
STOP_AFTER_CHECKPOINT = """
import sys
from stages.train import checkpoint
save = checkpoint.save
def save_then_stop(root, step, **kw):
    path = save(root, step, **kw)
    if step == 4:
        sys.exit(3)
    return path
checkpoint.save = save_then_stop
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def run(root, nproc: int, runner_text: str = RUNNER, ok: bool = True) -> str:
    runner = root / "runner.py"
    runner.write_text(runner_text)
    tmp = root / "tmp"  # torchrun's torchelastic_* folders: in the test's folder, not left in /tmp
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, str(runner), str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def set_batch(root, batch: int) -> None:
    # dropout 0: each rank draws its own dropout masks, which one process would draw differently
    text = (root / "recipe.toml").read_text().replace("dropout = 0.1", "dropout = 0.0")
    (root / "recipe.toml").write_text(text.replace("batch_size = 4", f"batch_size = {batch}"))


def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_base):
    from stages import io, layout

    # fp32 on every CPU: a bf16 base (what "auto" picks on AMX CPUs) rounds activations to 8 bits, and GEMMs
    # over rows of different lengths round differently, so the 1e-4 check would measure bf16, not the gradient sum
    extra = f'{TOML_EXTRA}\ndtype = "fp32"'
    two = make_project(tmp_path / "two", tiny_base, steps=6, extra=extra)
    one = make_project(tmp_path / "one", tiny_base, steps=6, extra=extra)
    for root, batch in ((two, 2), (one, 4)):
        set_batch(root, batch)
    run(two, 2)
    run(one, 1)
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    summary = io.read_json(two / layout.lora_dir("coding") / "train_summary.json")
    assert summary["world_size"] == 2 and summary["steps_done"] == 6 and summary["parallelism"] == "ddp"


def test_two_nodes_train_the_one_process_curve_and_only_node_0_writes(tmp_path, tiny_base):
    """Two machines, each its own copy of the project (no shared filesystem): node 0 as doit runs it, node 1 as
    `MEDFORGE_NODE_RANK=1`; medforge relaunches each under torchrun with the recipe's nnodes and master."""
    from stages import layout

    extra = f'{TOML_EXTRA}\ndtype = "fp32"\nnnodes = 2\nmaster = "127.0.0.1:{free_port()}"'
    nodes = [make_project(tmp_path / f"node{i}", tiny_base, steps=6, extra=extra) for i in (0, 1)]
    one = make_project(tmp_path / "one", tiny_base, steps=6, extra=f'{TOML_EXTRA}\ndtype = "fp32"')
    for root, batch in ((nodes[0], 2), (nodes[1], 2), (one, 4)):
        set_batch(root, batch)
        (root / "runner.py").write_text(RUNNER)
    tmp = tmp_path / "tmp"  # the nodes' temporary folder: torchrun's files must not stay behind in it
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    procs = [subprocess.Popen([sys.executable, str(root / "runner.py"), str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "MEDFORGE_NODE_RANK": str(i)})
             for i, root in enumerate(nodes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert list(tmp.iterdir()) == []
    run(one, 1)
    a, b = losses(nodes[0]), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert "node 1 of 2" in outs[1] and "node 0 wrote the adapter" in outs[1]
    assert not (nodes[1] / layout.lora_dir("coding")).exists() and not losses(nodes[1])


def test_two_nodes_need_a_master_address(tmp_path, tiny_base):
    root = make_project(tmp_path / "node0", tiny_base, steps=2, extra="nnodes = 2")
    out = run(root, 1, ok=False)
    assert "'train.nnodes' = 2 needs 'train.master'" in out


def test_two_process_fsdp_qlora_matches_one_process_and_resumes(tmp_path, tiny_base):
    """nf4 with two processes shards the base (FSDP), trains one process's trajectory, checkpoints and resumes.

    41 train examples in global batches of 4 end epoch 1 with a batch of one, so rank 1 has nothing to train
    on for a micro-batch; 17 val examples give rank 0 two eval batches and rank 1 one. FSDP's forwards and
    backwards are collective, so both cases must still run in lockstep (else the run hangs and times out).
    fp32: the two runs then differ only in the order of float sums (each rank's half of the gradient,
    summed by FSDP's reduce-scatter), ~1e-6; 1e-4 leaves room for that, while a gradient averaged over the
    ranks instead of summed already moves them by 0.04 by step 4.
    """
    import torch
    from safetensors.torch import load_file

    from stages import io, layout
    from tests.test_train import write_splits

    extra = f'{TOML_EXTRA}\nquantization = "nf4"\ndtype = "fp32"'
    two = make_project(tmp_path / "two", tiny_base, steps=6, extra=extra)
    one = make_project(tmp_path / "one", tiny_base, steps=6, extra=extra)
    for root, batch in ((two, 2), (one, 4)):
        set_batch(root, batch)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            write_splits("coding", n_train=41, n_val=17)
        finally:
            os.chdir(cwd)
    run(one, 1)
    run(two, 2, STOP_AFTER_CHECKPOINT + RUNNER, ok=False)  # checkpoint at step 4, then stop
    saved = two / layout.checkpoints_dir("coding") / "step-00000004"
    assert sorted(losses(two)) == [1, 2, 3, 4] and saved.is_dir()
    # written as one process writes it: whole plain tensors, not each rank's DTensor shard
    lora = load_file(str(saved / "adapter.safetensors"))
    moments = torch.load(saved / "optimizer.pt", weights_only=False)["state"]
    assert all(type(v) is torch.Tensor for m in moments.values() for v in m.values())
    assert sorted(m["exp_avg"].shape for m in moments.values()) == sorted(v.shape for v in lora.values())
    assert {v.shape for k, v in lora.items() if "lora_A" in k} == {torch.Size([8, 64]), torch.Size([8, 128])}
    out = run(two, 2)
    assert "resuming at step 4" in out and "FSDP" in out
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)

    summary = io.read_json(two / layout.lora_dir("coding") / "train_summary.json")
    assert summary["parallelism"] == "fsdp" and summary["world_size"] == 2 and summary["steps_done"] == 6
    assert summary["resumed_from"].endswith("step-00000004")
    assert io.read_json(one / layout.lora_dir("coding") / "train_summary.json")["parallelism"] == "single"
    # the exported adapter: whole tensors, the names and values one process writes
    weights = [load_file(str(root / layout.lora_weights("coding"))) for root in (two, one)]
    assert sorted(weights[0]) == sorted(weights[1]) and weights[0]
    assert all(weights[0][k].shape == weights[1][k].shape for k in weights[0])
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4
    # and it loads on the nf4 base, where it scores the best validation loss the run reported
    from peft import PeftModel

    from stages.train import torch_backend
    from stages.train.format import encode_rows
    from stages.train.hardware import Hardware
    tok = torch_backend.load_tokenizer(tiny_base)
    val, _ = encode_rows(tok, io.read_jsonl(two / layout.split_file("coding", "val")), 128)
    hw = Hardware("cpu", "fp32", "test")
    base = torch_backend.load_model(tiny_base, "nf4", hw)
    model = PeftModel.from_pretrained(base, str(two / layout.lora_dir("coding")))
    assert abs(torch_backend.mean_loss(model, val, tok.pad_token_id, hw) - summary["best_val_loss"]) < 1e-4


def test_fsdp_picks_an_optimizer_that_takes_shards():
    """bitsandbytes' paged AdamW runs on plain tensors: under FSDP "auto" means torch's AdamW, and asking
    for the paged one is a one-line error."""
    import torch

    from stages.errors import StageError
    from stages.train.torch_backend import make_optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    assert type(make_optimizer([param], 1e-3, "auto", "cuda", sharded=True)) is torch.optim.AdamW
    with pytest.raises(StageError, match="'train.optimizer' = \"paged_adamw\" does not work with nf4 on several"):
        make_optimizer([param], 1e-3, "paged_adamw", "cuda", sharded=True)
