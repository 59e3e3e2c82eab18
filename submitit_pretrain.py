"""Submit main_pretrain.py to SLURM (or run it locally with --cluster local) through submitit."""
import main_pretrain
from util.errors import run_cli
from util.launcher import launcher_parser, submit

if __name__ == "__main__":
    parser = launcher_parser(main_pretrain.get_args_parser(add_help=False), "submitit launcher for main_pretrain.py")
    run_cli(lambda: submit("main_pretrain", parser.parse_args()))
