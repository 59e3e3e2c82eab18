"""Run under torchrun by the tests: pretrain, then save this rank's student and teacher."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import main_pretrain  # noqa: E402

if __name__ == "__main__":
    dump_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(__import__("os").environ["RANK"])
    task = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    torch.save({"student": task.student.state_dict(), "teacher": task.teacher.state_dict()},
               dump_dir / f"rank{rank}.pth")
