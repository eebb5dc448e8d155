"""Run llama.cpp's convert_hf_to_gguf.py unchanged, except for one lookup (benchmark use only).

    PYTHONPATH=<llama.cpp>/gguf-py python benchmarks/reference_convert.py CKPT --outfile OUT --outtype f16

convert_hf_to_gguf.py recognises a BPE pre-tokenizer by hashing its tokens for a fixed string and
refuses any hash it has not seen; edgelm's reference tokenizer was trained here, so its hash is
new. Its pre-tokenizer is Llama-3's split, which llama.cpp calls "llama-bpe", so that answer is
patched in; every tensor goes through the reference code as it is.
"""
from __future__ import annotations

import sys

from common import llama_cpp_source

PRE_TOKENIZER = "llama-bpe"


def main() -> None:
    src = llama_cpp_source()
    sys.path.insert(0, str(src))
    sys.argv[0] = str(src / "convert_hf_to_gguf.py")
    import convert_hf_to_gguf
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: PRE_TOKENIZER
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
