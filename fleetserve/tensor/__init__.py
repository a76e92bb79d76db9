"""Serving any torch model: loading without pickles, handlers, the dynamic batcher, and the
HTTP app with `/predict`, `/v1/embeddings` and the Open Inference Protocol (KServe v2)."""
