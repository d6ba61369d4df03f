__version__ = "0.0.1"

import warnings
with warnings.catch_warnings():
    # fastai 2.8 calls `torch.jit.script` at import, which torch >= 2.10 deprecates with a warning on every run
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    # `CLIPLearner`'s methods live beside their machinery (`predict` with zero-shot classification, `show_results`
    # with the retrieval metrics, `distrib_ctx` with multi-process training, the tower locks with fine-tuning).
    # `CaptionDataLoaders.from_shards` comes with the shard source, `Learner.compile` with the throughput callback.
    # Importing any part of the package imports them all, so that a learner from `load_learner` has every method.
    from . import train, metrics, distributed, zeroshot, finetune, pretrained, siglip, shards, throughput
