"""
Build a `MoSoTrainer` whose training arguments lack `use_cpu=True`, in a script launched as 2 CPU processes, so that
a test can check the error each process raises.

Usage:
    accelerate launch --multi_gpu --num_processes 2 ... launch_without_cpu_flag.py OUTPUT_FOLDER

Each process writes OUTPUT_FOLDER/error-process-<rank>.txt with the message of the error it got, or "no error".
"""

import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import tiny_bert  # noqa: E402

from hf_moso import MoSoConfig, MoSoTrainer  # noqa: E402


def main(output_folder: str) -> None:
    torch.set_num_threads(1)
    args = MoSoConfig(output_dir=output_folder, report_to="none", disable_tqdm=True)
    try:
        MoSoTrainer(model=tiny_bert(), args=args)
        message = "no error"
    except ValueError as error:
        message = str(error)

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(os.path.join(output_folder, f"error-process-{rank}.txt"), "w") as stream:
        stream.write(message)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
