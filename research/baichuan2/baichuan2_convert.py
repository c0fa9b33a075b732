"""The command line of the weight converters, shared by ``convert_weight.py`` and ``convert_reversed.py``.

``convert_main(argv, reverse, prog)`` parses the options of either form and runs
``baichuan2_weights.convert_hf_to_ms`` / ``convert_ms_to_hf``; bad input ends with one line
``prog: error: ...`` on stderr and exit status 2.
"""
import argparse

from baichuan2_cli import run_main
from baichuan2_weights import DTYPES, convert_hf_to_ms, convert_ms_to_hf

_EPILOG = ("Relative paths are relative to the current directory (unlike MindFormers r1.0, "
           "which put the output inside the HF directory). Outputs are written to a temporary "
           "file and renamed, and an existing output is never replaced without --overwrite.")


def build_parser(reverse=False, prog=None):
    """Argument parser; ``reverse=True`` gives the ``convert_reversed.py`` form."""
    parser = argparse.ArgumentParser(
        prog=prog, epilog=_EPILOG,
        description=("MindSpore -> Hugging Face" if reverse else
                     "Hugging Face -> MindSpore (or the reverse with --reverse)")
        + " weight conversion for Baichuan2-7B/13B.")
    if not reverse:
        parser.add_argument("--reverse", action="store_true",
                            help="convert MindSpore -> HF (as convert_reversed.py)")
    parser.add_argument(
        "--torch_ckpt_path", "--torch_ckpt_dir", dest="torch_ckpt_path", default=None,
        help="HF -> MS: the HF directory or any weight file in it (all of its *.bin or "
             "*.safetensors shards are read, via the index json when present; config.json is "
             "read from that directory). Reverse: the output file (.bin via torch.save, "
             ".safetensors by extension, default torch.bin; a directory gets pytorch_model.bin)")
    parser.add_argument(
        "--mindspore_ckpt_path", default="transform.ckpt",
        help="HF -> MS: the output .ckpt (default transform.ckpt). Reverse: the input .ckpt "
             "(or MindSpore .safetensors)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="dtype of every written tensor: HF -> MS default fp16 (as the original converter); "
             "reverse default keeps each tensor's dtype")
    parser.add_argument("--model", choices=("7b", "13b"), default=None,
                        help="override the 7B/13B detection (7B config.json has "
                             "max_position_embeddings, 13B does not); names are the same")
    parser.add_argument(
        "--config_json", default=None,
        help="HF -> MS: config.json to use instead of the one beside the weights. Reverse: "
             "config.json used for the shape check and copied beside the output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--drop_lora", action="store_true",
        help="reverse: discard LoRA (mindpet_delta_lora_*) parameters instead of refusing; "
             "merge them with research/baichuan2/merge_lora.py to keep them")
    return parser


def convert_main(argv=None, reverse=False, prog="convert_weight.py"):
    """Run the CLI; returns 0 on success, 2 (after one line on stderr) on bad input."""
    parser = build_parser(reverse=reverse, prog=prog)
    args = parser.parse_args(argv)
    reverse = reverse or args.reverse

    def convert():
        if reverse:
            convert_ms_to_hf(args.mindspore_ckpt_path, args.torch_ckpt_path or "torch.bin",
                             dtype=args.dtype, config_json=args.config_json,
                             overwrite=args.overwrite, drop_lora=args.drop_lora, log=_log)
        else:
            if not args.torch_ckpt_path:
                raise ValueError("--torch_ckpt_path is required (the HF directory or any "
                                 "weight file in it)")
            convert_hf_to_ms(args.torch_ckpt_path, args.mindspore_ckpt_path,
                             dtype=args.dtype or "fp16", model=args.model,
                             config_json=args.config_json, overwrite=args.overwrite, log=_log)
    return run_main(convert, parser.prog)


def _log(message):
    print(message, flush=True)
