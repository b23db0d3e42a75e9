"""EE-LLM's name for the text generation server (its examples/ee_inference/ee_inference_server.sh
launches this file): the same server as tools/run_text_generation_server.py, same flags.

    torchrun --nproc_per_node 1 tools/run_early_exit_text_generation_server.py --use-checkpoint-args \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model TOK --load CKPT --load-iteration 0 --port 5000
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron.early_exit.server.launch import main

    main()
