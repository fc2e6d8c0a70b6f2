"""``python -m lmeye_fast.train --help``"""

from .cli import main


def _run() -> None:
    main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Under torchrun every rank leaves together and the process group's threads are stopped
        # before the interpreter exits (a group left running can abort the process at exit).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _run()
