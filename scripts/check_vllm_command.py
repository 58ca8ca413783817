"""Parse the command `loraforge serve --engine vllm` would start with vLLM's own argument parser, without a GPU.

vLLM lives in an environment of its own (it pins its own torch and transformers), so this runs in two steps:

    .venv/bin/python -c "import json, sys; from loraforge.serve.vllm_server import command; \
        print(json.dumps(command(sys.argv[1:], '127.0.0.1', 8000)))" runs/a runs/b > vllm-args.json
    VLLM_ENV/bin/python scripts/check_vllm_command.py vllm-args.json

It exits non-zero if vLLM refuses a flag or a value, and prints what vLLM made of each flag loraforge sets. On a
machine without CUDA, vLLM's CPU platform stands in so that its config defaults can be computed.
"""

import json
import sys

from vllm import platforms
from vllm.platforms.cpu import CpuPlatform

if platforms.current_platform.is_unspecified():
    platforms.current_platform = CpuPlatform()

from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

SET_BY_LORAFORGE = ("model_tag", "served_model_name", "tokenizer", "enable_lora", "max_loras", "max_lora_rank",
                      "lora_modules", "revision", "quantization", "trust_remote_code", "generation_config", "host",
                      "port", "max_num_seqs")


def main(path: str) -> int:
    argv = json.loads(open(path, encoding="utf-8").read())
    parser = FlexibleArgumentParser(prog="vllm")
    make_arg_parser(parser.add_subparsers(dest="subparser").add_parser("serve"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    args.model = args.model_tag
    engine = AsyncEngineArgs.from_cli_args(args)
    for name in SET_BY_LORAFORGE:
        print(f"{name} = {getattr(args, name)!r}")
    print(f"engine model {engine.model}, tokenizer {engine.tokenizer}, max_lora_rank {engine.max_lora_rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
