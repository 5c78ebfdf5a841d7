"""Data: document readers, the tokenized corpus format, the default corpus, Megatron readers.

Modules (import them directly; this package imports nothing eagerly):

- :mod:`~lmscope.data.documents` — the ``Document`` record and ``ReadStats`` counts;
- :mod:`~lmscope.data.readers` — streaming readers: JSONL (plain/gz/zst), Parquet, text directories;
- :mod:`~lmscope.data.streams` — line streams that notice truncated gzip/zstd files;
- :mod:`~lmscope.data.split` — the held-out split, a pure function of the document id;
- :mod:`~lmscope.data.tokenized` — the tokenized corpus format and ``TokenizedCorpus``;
- :mod:`~lmscope.data.tokenize_job` — ``tokenize_corpus``, resumable after a kill;
- :mod:`~lmscope.data.tokenizer_info` — a tokenizer's batch encoder, vocabulary size and hash;
- :mod:`~lmscope.data.default_corpus` — the offline corpus from Debian documentation packages;
- :mod:`~lmscope.data.convert` / :mod:`~lmscope.data.debian` — HTML/man to text; dpkg queries;
- :mod:`~lmscope.data.stats` — documents, tokens and bytes per domain and split;
- :mod:`~lmscope.data.megatron` — Megatron / GPT-NeoX indexed datasets.
"""
