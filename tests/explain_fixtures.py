"""Shared set-ups of the explain tests: an activation store over a mini suite, and a tiny chat model."""

from __future__ import annotations

from pathlib import Path

import torch

from lmscope.activations import ActivationStore, iter_contexts, write_activations
from replay_fixtures import build_mini_suite

D, CTX = 8, 12


def explain_store(root: Path) -> dict:
    """A mini suite and a store of its documents at hook ``resid``: ``D`` deterministic activations per token.

    Column 0 fires strongly on one token id (a "token detector"), the rest are seeded random projections.
    """
    from lmscope.data.tokenized import TokenizedCorpus

    suite = build_mini_suite(root / "suite", root / "work", batch_size=4, seq_len=31, n_steps=6)
    corpus = TokenizedCorpus.open(root / "suite" / "corpus")
    vocab = int(max(max(t) for t in suite.doc_tokens.values())) + 1
    table = torch.randn(vocab, D, generator=torch.Generator().manual_seed(0))
    detected = int(corpus.document_tokens(0)[3])
    table[:, 0] = -0.2
    table[detected, 0] = 5.0

    def capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"resid": table[ids] + 0.05 * torch.arange(ids.shape[1], dtype=torch.float32)[None, :, None]}

    docs = [(i, corpus.document_tokens(i)) for i in range(len(corpus))]
    info = {i: {"id": suite.doc_ids[i], "domain": suite.domains[i]} for i in range(len(corpus))}
    write_activations(capture, iter_contexts(docs, CTX, 600), ["resid"], root / "store", batch_size=4, shard_tokens=128,
                      documents=info)
    return {"suite": suite, "store": ActivationStore.open(root / "store"), "detected": detected, "root": root}


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_chat_model(directory: Path | None = None, seed: int = 0, tokenizer_dir: Path | None = None):
    """A random 2-layer Llama with a chat template; saved to ``directory`` if given.

    The tokenizer is SmolLM2's (needs `make model`), or, with ``tokenizer_dir``, the ``tokenizer.json`` there
    (e.g. a mini suite's) given a plain chat template, for tests that must not need the default model.
    """
    import transformers

    if tokenizer_dir is None:
        from lmscope.models.loading import default_model_dir

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_dir()))
    else:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
                                                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = CHAT_TEMPLATE
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=4096,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so that greedy choices are not near-ties
        model.model.embed_tokens.weight.mul_(20)
    if directory is not None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return model, tokenizer
