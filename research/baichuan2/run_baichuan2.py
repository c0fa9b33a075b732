"""Baichuan2 train / finetune / eval / predict through the MindFormers ``Trainer``.

The command line of the original ``research/baichuan2/run_baichuan2.py``, plus ``--device_target``
(CPU here, Ascend in production), ``--train_data`` as an explicit alias of ``--train_dataset`` (the
documentation uses both) and ``--output_dir``. Example (from ``research/``)::

    python baichuan2/run_baichuan2.py --config baichuan2/run_baichuan2_7b.yaml --run_mode finetune \\
        --load_checkpoint model_dir/xxx.ckpt --train_data dataset_dir

Everything that must be checked (config, dataset, checkpoint, parallel layout) is checked before
anything compiles, and reported as one line on stderr with exit status 2.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_cli import add_model_arguments, fail, str2bool  # noqa: E402  pylint: disable=wrong-import-position

PROG = "run_baichuan2.py"
RUN_MODES = ("train", "finetune", "eval", "predict", "export")


def build_parser():
    """The original CLI (MindFormers r1.0 ``research/baichuan2/run_baichuan2.py``) plus --device_target, --train_data and --output_dir."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="text_generation", type=str, help="MindFormers task name.")
    add_model_arguments(parser, default_config="baichuan2/run_baichuan2_7b.yaml")
    parser.add_argument("--run_mode", default="train", choices=RUN_MODES, help="What to run.")
    parser.add_argument("--seq_length", default=None, type=int, help="Overrides model.model_config.seq_length.")
    parser.add_argument("--resume", default=None, type=str2bool,
                        help="Continue from the last checkpoint in output_dir (step, optimizer, lr schedule).")
    parser.add_argument("--train_dataset", "--train_data", dest="train_dataset", default="", type=str,
                        help="Training MindRecord folder (or file).")
    parser.add_argument("--eval_dataset", default="", type=str, help="Evaluation MindRecord folder (or file).")
    parser.add_argument("--predict_data", default="", type=str, nargs="+",
                        help="Prompt(s), or one text file with one prompt per line.")
    parser.add_argument("--max_length", default=512, type=int, help="Maximum total length for predict.")
    parser.add_argument("--max_new_tokens", default=None, type=int, help="Maximum new tokens for predict.")
    parser.add_argument("--remote_save_url", default="", type=str, help="ModelArts OBS url (not used here).")
    parser.add_argument("--output_dir", default=None, type=str, help="Overrides output_dir (default ./output).")
    parser.add_argument("--dp", default=None, type=int, help="parallel_config.data_parallel")
    parser.add_argument("--mp", default=None, type=int, help="parallel_config.model_parallel")
    parser.add_argument("--pp", default=None, type=int, help="parallel_config.pipeline_stage")
    parser.add_argument("--micro_batch_num", default=None, type=int, help="parallel_config.micro_batch_num")
    return parser


def main(argv=None):
    """Parse, check, then hand over to ``mindformers.Trainer``. Returns the process exit status."""
    args = build_parser().parse_args(argv)
    from baichuan2_run_setup import prepare_run, run_trainer   # heavy imports after argument parsing
    try:
        config, inputs = prepare_run(args)
    except (ValueError, OSError) as error:
        return fail(PROG, error)
    run_trainer(config, args, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
