"""Activations: the on-disk activation store (write, resume, stream).

- :func:`iter_contexts` cuts documents into fixed-length contexts (:class:`Context`);
- :func:`write_activations` runs a capture function over contexts into a sharded, resumable store;
- :class:`ActivationStore` opens, validates, reads and streams a store;
- :func:`capture_corpus_activations` joins a hooked model and a tokenized corpus to a store.
"""

from lmscope.activations.contexts import Context, iter_contexts
from lmscope.activations.job import capture_corpus_activations
from lmscope.activations.reader import ActivationStore
from lmscope.activations.store import write_activations

__all__ = ["ActivationStore", "Context", "capture_corpus_activations", "iter_contexts", "write_activations"]
