"""The engine: model families, loaders, tokenizers, decoding state, scheduler, sampling."""
