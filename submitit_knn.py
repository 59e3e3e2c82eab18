"""Submit main_knn.py to SLURM (or run it locally with --cluster local) through submitit."""
import main_knn
from util.errors import run_cli
from util.launcher import launcher_parser, submit

if __name__ == "__main__":
    parser = launcher_parser(main_knn.get_args_parser(add_help=False), "submitit launcher for main_knn.py")
    run_cli(lambda: submit("main_knn", parser.parse_args()))
