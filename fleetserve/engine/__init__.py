"""One model on one device: scheduler, KV-cache manager, model runner, sampler."""
