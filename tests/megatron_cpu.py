"""megatron-core on CPU, for the real-framework scripts the tests launch with torchrun
(tests/megatron_real/, tests/dcp_real/): one tiny SwiGLU GPTModel, its batches, and the patches.

Importing this module applies the two patches every script needs: megatron-core 0.16.1 calls
``torch.cuda.synchronize`` and ``torch.cuda.current_device`` on its save and RNG paths.
``on_cpu`` redirects ``device='cuda'`` allocations, for the scripts that build megatron-core's
optimizers (they allocate flags and scales on CUDA); nothing of their logic is faked.
"""
import functools
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.current_device = lambda: "cpu"

NUM_LAYERS = 2
HIDDEN = 64
HEADS = 4
FFN_HIDDEN = 128
VOCAB = 128
SEQ = 16
MICRO_BATCH = 4


def on_cpu(factory):
    """``factory`` (torch.zeros, ...) with ``device='cuda'`` turned into the CPU."""
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return make


def seed_all(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def build_gpt(seed: int, tp: int, pp: int = 1, **shape):
    """The GPTModel of this pipeline stage: bf16 linear layers, fp32 norms (megatron-core's
    local-spec LayerNorm), SwiGLU, RoPE, untied embeddings; ``shape`` overrides the sizes."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    sizes = dict(num_layers=NUM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN_HIDDEN, num_attention_heads=HEADS,
                 vocab_size=VOCAB, max_sequence_length=SEQ)
    sizes.update(shape)
    vocab, seq = sizes.pop("vocab_size"), sizes.pop("max_sequence_length")
    seed_all(seed)
    config = TransformerConfig(
        **sizes, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, gated_linear_unit=True,
        activation_func=F.silu, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=True, perform_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.02)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                    max_sequence_length=seq, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def batch(generator, vocab: int = VOCAB, micro_batch: int = MICRO_BATCH, seq: int = SEQ):
    """(input_ids, position_ids, attention_mask, labels) of random tokens; True = masked."""
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=generator)
    position_ids = torch.arange(seq).unsqueeze(0).expand(micro_batch, seq).contiguous()
    attention_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    return tokens[:, :-1].contiguous(), position_ids, attention_mask, tokens[:, 1:].contiguous()


def rng_state():
    """Megatron-LM's saved ``rng_state`` (one entry: no data parallelism here)."""
    from megatron.core import tensor_parallel

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    try:
        state["rng_tracker_states"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # pragma: no cover - tracker without CPU state support
        pass
    return [state]


def finish() -> None:
    """Leave without the gloo teardown. Processes that imported megatron.core and hold a gloo
    group were seen, rarely, to abort at exit with "terminate called without an active
    exception" (SIGABRT) although all their work was done; skipping the C++ teardown keeps the
    script's exit status meaningful."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
