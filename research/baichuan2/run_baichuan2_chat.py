"""Interactive multi-turn chat with a Baichuan2 Chat model (single card / CPU).

The command of the documentation (from ``research/baichuan2``), plus ``--device_target CPU`` here::

    python run_baichuan2_chat.py --config run_baichuan2_7b_910b.yaml --use_parallel False \\
        --load_checkpoint /path/to/Baichuan2-7B-Chat.ckpt --auto_trans_ckpt False \\
        --vocab_file /path/to/tokenizer.model --device_target CPU

Type a message and press Enter. Commands: ``clear`` forgets the conversation, ``stream`` turns
token-by-token output on/off (on at start), ``exit``/``quit`` or Ctrl-D leave, Ctrl-C stops the
current answer (that turn is dropped) and returns to the prompt.

The prompt is built as Hugging Face's ``build_chat_input`` does (see ``baichuan2_chat.py``): the
conversation is kept newest turn first within ``seq_length - max_new_tokens`` ids of the YAML's
``seq_length``; ``--max_new_tokens`` defaults to half of ``seq_length`` (256 for the 512-long YAMLs).
``--load_checkpoint`` takes a checkpoint file, a folder of checkpoints (e.g. base + LoRA with a
``*_lora`` YAML) or a folder of ``rank_x/`` checkpoints.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Light imports only: Ctrl-C routing (baichuan2_chat.CtrlC) must be set up before MindSpore loads.
from baichuan2_chat import CtrlC  # noqa: E402
from baichuan2_cli import add_model_arguments, fail, str2bool  # noqa: E402

PROG = "run_baichuan2_chat.py"


def build_parser():
    """The original chat CLI (MindFormers r1.0 ``research/baichuan2/run_baichuan2_chat.py``) plus --device_target, --mode, --seed, --stream, --show_ids."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    add_model_arguments(parser, default_config="baichuan2/run_baichuan2_7b.yaml")
    parser.add_argument("--max_new_tokens", default=None, type=int,
                        help="Longest answer, in tokens (default: seq_length // 2). The prompt budget is "
                             "seq_length - max_new_tokens.")
    parser.add_argument("--use_past", default=True, type=str2bool, help="Use the KV cache (incremental inference).")
    # Sampling defaults (None): Baichuan2-Chat's generation_config.json values unless the YAML's model_config
    # sets them, as the server (baichuan2_serving.chat_generation_defaults); --do_sample False for greedy.
    parser.add_argument("--do_sample", default=None, type=str2bool,
                        help="Sample instead of greedy decoding (default: the YAML's do_sample, else True).")
    parser.add_argument("--top_k", default=None, type=int, help="Top-k filtering when sampling (default 5).")
    parser.add_argument("--top_p", default=None, type=float, help="Top-p (nucleus) filtering (default 0.85).")
    parser.add_argument("--repetition_penalty", default=None, type=float,
                        help="HF repetition penalty (default 1.05; 1.0: off).")
    parser.add_argument("--temperature", default=None, type=float, help="Sampling temperature (default 0.3).")
    parser.add_argument("--seed", default=0, type=int, help="Sampling seed, applied at every answer.")
    parser.add_argument("--stream", default=True, type=str2bool, help="Start with streaming output on.")
    parser.add_argument("--show_ids", default=False, type=str2bool,
                        help="After each answer, print the prompt ids and the generated ids.")
    return parser


def main(argv=None, ctrl_c=None):
    """Set up, then chat on stdin/stdout. Returns the exit status (2 for a setup error, 130 for Ctrl-C at start-up).

    ``ctrl_c``: a ``CtrlC`` installed before MindSpore was imported (the script does this); without
    one, Ctrl-C during an answer ends the process (MindSpore's own SIGINT handling).
    """
    args = build_parser().parse_args(argv)
    ctrl_c = ctrl_c or CtrlC()
    try:
        return _run(args, ctrl_c)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


def _run(args, ctrl_c):
    from baichuan2_chat import ChatSession, chat_loop, default_max_new_tokens, input_budget
    from baichuan2_inference import prepare_config, build_tokenizer, build_inference_network
    try:
        config = prepare_config(args, batch_size=1, use_past=args.use_past)
        seq_length = int(config.model.model_config.seq_length)
        max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else default_max_new_tokens(seq_length)
        max_input_tokens = input_budget(seq_length, max_new_tokens)
        tokenizer = build_tokenizer(config)
        user_id, assistant_id = tokenizer.user_token_id, tokenizer.assistant_token_id
    except (ValueError, OSError) as error:
        return fail(PROG, error)
    from baichuan2_serving import chat_generation_defaults
    sampling = chat_generation_defaults(config.model.model_config)
    sampling.pop("max_new_tokens")
    sampling.update({key: getattr(args, key) for key in sampling if getattr(args, key) is not None})
    network = build_inference_network(config, batch_size=1, use_past=args.use_past)
    generation_kwargs = dict(max_new_tokens=max_new_tokens, use_past=args.use_past, seed=args.seed, **sampling)
    session = ChatSession(network.generate, tokenizer, max_input_tokens, generation_kwargs, stream=args.stream,
                          user_token_id=user_id, assistant_token_id=assistant_id,
                          ctrl_c=ctrl_c if ctrl_c.installed else None)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    write(f"Baichuan 2 chat (seq_length {seq_length}: up to {max_new_tokens} new tokens, {max_input_tokens} for "
          "the conversation). Commands: clear, stream, exit/quit (or Ctrl-D); Ctrl-C stops an answer.\n")

    def read_line(prompt):
        with ctrl_c.waiting_for_input():
            return input(prompt)

    return chat_loop(session, read_line, write, show_ids=args.show_ids)


if __name__ == "__main__":
    sys.exit(main(ctrl_c=CtrlC.install()))
