"""DistributedDataParallel, as a multi-process training pipeline runs it: two CPU ranks (gloo), each its own
batch, gradients all-reduced in buckets, rank 0's BatchNorm statistics broadcast before every forward.
resnet_fast's model must train exactly as torchvision's does under the same DDP, in float64 so that any
difference is a different computation, not rounding.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import rel_err
from helpers import model_pair

WORLD = 2
STEPS = 2
TOL64 = 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, port: int, out_dir: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same weights on every rank, as DDP requires
        tv, rf = model_pair("resnet18", num_classes=10)
        torch.manual_seed(1 + rank)  # each rank its own data
        batches = [(torch.randn(3, 3, 40, 40, dtype=torch.float64), torch.randint(0, 10, (3,)))
                   for _ in range(STEPS)]
        results = {}
        for name, model in (("tv", tv), ("rf", rf)):
            ddp = DistributedDataParallel(model.double().train(), **options)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            losses = []
            for x, y in batches:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            results[name] = {"state": model.state_dict(), "losses": torch.stack(losses)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{}, {"gradient_as_bucket_view": True, "static_graph": True}],
                         ids=["default", "bucket-views-static-graph"])
def test_ddp_training_matches_torchvisions(tmp_path, options):
    mp.spawn(_train, args=(_free_port(), str(tmp_path), options), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank in ranks:
        assert rel_err(rank["rf"]["losses"], rank["tv"]["losses"]) <= TOL64
        for name, t in rank["tv"]["state"].items():
            ours = rank["rf"]["state"][name]
            if name.endswith("num_batches_tracked"):
                assert ours.item() == t.item() == STEPS, name
            else:
                assert rel_err(ours, t) <= TOL64, name
    # The all-reduce kept the ranks' weights identical. (Their BatchNorm statistics differ: DDP broadcasts
    # rank 0's before each forward, and each rank's last forward updates its own, in torchvision's too.)
    weights = [dict(rank["rf"]["state"]) for rank in ranks]
    for name, _ in ranks[0]["tv"]["state"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(weights[1][name], weights[0][name]), name


def test_convert_sync_batchnorm_gives_torchvisions_modules_and_eval_outputs():
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` (how DDP pipelines get cross-rank statistics) swaps every
    BatchNorm2d: resnet_fast's blocks then call their modules, as torchvision's do."""
    tv, rf = model_pair("resnet18", num_classes=10)
    tv, rf = (nn.SyncBatchNorm.convert_sync_batchnorm(m).eval() for m in (tv, rf))
    kinds = [[type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] for model in (tv, rf)]
    assert kinds[1] == kinds[0] == [nn.SyncBatchNorm] * 20
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= 1e-5
