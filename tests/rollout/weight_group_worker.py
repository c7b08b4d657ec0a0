"""One torchrun rank of test_sglang_client.py::test_weight_group_builds_under_torchrun.

Rank 0 builds the weight group with a fake SGLang server (tests/rollout/fake_sglang.py: its worker joins over gloo,
standing in for a real server, which is not started under torchrun either), pushes a bucket and checks it arrived;
the other ranks wait at a barrier. Usage: python -m tests.rollout.weight_group_worker TIMEOUT_S
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from guide_mega.rollout.sglang_engine import SGLangServerEngine
from guide_mega.rollout.sglang_server import free_port
from tests.rollout.fake_sglang import FakeSGLangServer


def main(timeout_s: float) -> None:
    dist.init_process_group("gloo")
    # What makes the case: torchrun told every rank to use its agent's store for tcp:// rendezvous.
    assert os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True", os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
    if dist.get_rank() == 0:
        server = FakeSGLangServer()
        engine = SGLangServerEngine(server.url)
        engine.init_weight_group(
            master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout_s=timeout_s
        )
        assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True", "the variable is restored after the group"
        norm = torch.linspace(-1.0, 1.0, 8)
        engine.update_weights([("model.norm.weight", norm)])
        assert torch.equal(server.weights["model.norm.weight"], norm)
        engine.check_weights([("model.norm.weight", norm)])
        engine.close()
        server.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(float(sys.argv[1]))
