"""``python -m lmeye_fast.serving --llm DIR --adapter DIR --vision DIR [--response-prefix TEXT] [--schedule S]``:
prints the command of vLLM's OpenAI-compatible server that serves the adapter (add ``--host``, ``--port``,
``--dtype`` ...)."""

import argparse
import shlex
import sys

from . import SERVER_COMMAND, SERVING_SCHEDULES, serve_args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmeye_fast.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", required=True, help="the LLM's directory (its config, weights and tokenizer)")
    parser.add_argument("--adapter", required=True, help="the adapter's directory (LMEyeModel.save_pretrained)")
    parser.add_argument("--vision", required=True, help="the vision tower's directory (model and image processor)")
    parser.add_argument("--response-prefix", default=None,
                        help="the text between the <img-d> slots and the answer, for an adapter saved without its "
                             "processor (with one, the saved template's is used and this must agree)")
    parser.add_argument("--schedule", default="auto", choices=SERVING_SCHEDULES,
                        help="single_pass: a step ends at <img-q> and the IPN's tokens fill the slots of the next; "
                             "two_pass: the LLM runs a step again where it holds <img-q> and its slots; static: the "
                             "static-only model; auto: single_pass where the adapter has <img-q>, else two_pass")
    args = parser.parse_args(argv)
    print(shlex.join(SERVER_COMMAND + serve_args(args.llm, args.adapter, args.vision, args.response_prefix,
                                                 args.schedule)))


if __name__ == "__main__":
    main(sys.argv[1:])
