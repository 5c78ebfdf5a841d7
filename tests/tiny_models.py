"""Tiny random-initialised models of every supported architecture, built from ``transformers`` config classes."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128

# (label, config class, keyword arguments, causal LM class)
TINY_ARCHITECTURES: dict[str, tuple[str, dict, str]] = {
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True), "GPTNeoXForCausalLM"),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                                  max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=False), "GPTNeoXForCausalLM"),
    "llama": ("LlamaConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, max_position_embeddings=64), "LlamaForCausalLM"),
    "olmo": ("OlmoConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2), "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2), "Olmo2ForCausalLM"),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2), "GPT2LMHeadModel"),
    "mistral": ("MistralConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=64), "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, max_position_embeddings=64), "Qwen2ForCausalLM"),
}


def tiny_model(label: str, attn_implementation: str = "sdpa", seed: int = 0, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A random-initialised fp32 causal LM of architecture ``label``, in eval mode."""
    config_name, kwargs, model_name = TINY_ARCHITECTURES[label]
    config = getattr(transformers, config_name)(vocab_size=vocab_size, **kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # make biases and norm weights non-trivial so that mistakes cannot hide
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_inputs(batch: int = 2, pos: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, pos), generator=generator)
