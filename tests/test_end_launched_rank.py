"""``flexkd.distributed.end_launched_rank``: a torchrun rank that ran a functional collective closes its
process group, runs its ``atexit`` handlers and ends at once with its code; any other process goes on.

Run as a test, or as the worker: ``torchrun --nproc_per_node 2 tests/test_end_launched_rank.py OUT_DIR``.
"""

import atexit
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from _torchrun import run_two_processes  # noqa: E402

from flexkd.distributed import end_launched_rank  # noqa: E402


def worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    total = funcol.wait_tensor(funcol.all_reduce(torch.ones(3), "sum", dist.group.WORLD))
    assert total.tolist() == [2.0, 2.0, 2.0]
    atexit.register(lambda: (Path(out_dir) / f"atexit-{rank}").write_text("ran"))
    end_launched_rank()
    (Path(out_dir) / f"after-{rank}").write_text("the process went on")


@pytest.mark.distributed
def test_a_rank_that_ran_functional_collectives_ends_cleanly_after_its_atexit_handlers(tmp_path):
    for _ in range(3):  # the abort it prevents came at the end of some runs, not all
        run_two_processes(__file__, str(tmp_path), timeout=120)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit-0", "atexit-1"]
        for marker in tmp_path.iterdir():
            marker.unlink()


def test_outside_a_launcher_it_returns():
    code = "from flexkd.distributed import end_launched_rank; end_launched_rank(3); print('went on')"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "went on\n"), done.stderr


def test_a_launched_rank_ends_with_its_code_and_flushed_output():
    code = (
        "import atexit, sys; from flexkd.distributed import end_launched_rank\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('unflushed '); end_launched_rank(3); print('went on')"
    )
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "unflushed atexit ran\n"), done.stderr


if __name__ == "__main__":
    worker(sys.argv[1])
