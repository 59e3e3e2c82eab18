"""Submit main_linprobe.py to SLURM (or run it locally with --cluster local) through submitit."""
import main_linprobe
from util.errors import run_cli
from util.launcher import launcher_parser, submit

if __name__ == "__main__":
    parser = launcher_parser(main_linprobe.get_args_parser(add_help=False), "submitit launcher for main_linprobe.py")
    run_cli(lambda: submit("main_linprobe", parser.parse_args()))
