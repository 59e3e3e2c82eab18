"""Submit main_finetune.py to SLURM (or run it locally with --cluster local) through submitit."""
import main_finetune
from util.errors import run_cli
from util.launcher import launcher_parser, submit

if __name__ == "__main__":
    parser = launcher_parser(main_finetune.get_args_parser(add_help=False), "submitit launcher for main_finetune.py")
    run_cli(lambda: submit("main_finetune", parser.parse_args()))
