"""Worker of tests/test_resume.py: `python tests/resume_worker.py OUT EVERY KILL_AFTER NUM_WORKERS [resume] [reference]`,
or the same under `torchrun --nproc_per_node 2`.

It trains a tiny CLIP on two classes of digits (shuffled, randomly cropped, captions drawn at random) with
`fit_one_cycle` and `SaveProgress(every=EVERY)` into OUT; with KILL_AFTER > 0 it kills itself with SIGKILL right
after training step KILL_AFTER; with `resume` it resumes from OUT's progress files. At the end each process saves
its weights and the step and image sum of every batch it trained on in OUT/result.rank{R}.pt; with `reference` it
then trains again, uninterrupted, into OUT/reference.rank{R}.pt. With `shards` the data are the same digits written
as webdataset shards (in OUT/../shards) and read with `CaptionDataLoaders.from_shards`."""
import os, sys, signal, tempfile
from pathlib import Path
import torch, pandas as pd
from fastcore.foundation import L
from fastai.callback.core import Callback
from fastai.torch_core import set_seed, rank_distrib, num_distrib
from clip_fastai.tokenizer import ClipTokenizer
from clip_fastai.model import CLIP
from clip_fastai.data import CaptionDataLoaders, make_digits_folder, digit_descriptions
from clip_fastai.train import clip_learner, unwrap_model
from clip_fastai.distributed import DistributedCLIPTrainer
from clip_fastai.resume import SaveProgress

EPOCHS, LR = 2, 3e-3

def digits_folder() -> Path: return make_digits_folder(Path(tempfile.gettempdir())/'clip_fastai_resume_digits', digits=[0, 1])

def write_digit_shards(out) -> dict:
    "The digits' training and validation images as webdataset shards of 100 samples in `out`; their brace patterns"
    from clip_fastai.shards import write_shards
    folder, descriptions = digits_folder(), digit_descriptions()
    def table(split):
        files = sorted((folder/split).glob('*/*.png'))
        return pd.DataFrame({'image': files, 'captions': [descriptions[f.parent.name] for f in files],
                             'match_id': [int(f.parent.name) for f in files]})
    return {split: write_shards(table(split), Path(out)/split, samples_per_shard=100) for split in ('train', 'valid')}

def digits_learner(out, seed:int=0, bs:int=32, num_workers:int=0, shards=None):
    "A new learner of a new model (initial weights from `seed`); the same data and split for every seed"
    set_seed(seed, reproducible=True)
    tokenizer = ClipTokenizer(context_length=16)
    if shards is None: dls = CaptionDataLoaders.from_folder(digits_folder(), digit_descriptions(), tokenizer=tokenizer, image_size=32,
                                                            bs=bs, num_workers=num_workers, seed=0)
    else:
        import clip_fastai.shards  # `CaptionDataLoaders.from_shards`
        dls = CaptionDataLoaders.from_shards(shards['train'], shards['valid'], tokenizer=tokenizer, image_size=32, bs=bs,
                                             num_workers=num_workers, seed=0, device='cpu')
    model = CLIP.from_config('tiny-vit', image_size=32, context_length=16, vocab_size=49408)
    learn = clip_learner(dls, model, path=out, model_dir='.')
    if num_distrib() > 1: learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer())
    return learn

class RecordBatches(Callback):
    "The step and the sum of the images of every training batch: which items, cropped where"
    def before_fit(self): self.batches = []
    def before_batch(self):
        if self.training: self.batches.append((self.train_iter, self.xb[0].sum().item()))

class KillAfter(Callback):
    "Kill this process with SIGKILL after training step `step`: no Python clean-up, as when a job is preempted"
    order = SaveProgress.order + 1
    def __init__(self, step:int): self.step = step
    def after_batch(self):
        if self.training and self.train_iter == self.step: os.kill(os.getpid(), signal.SIGKILL)

def train(out, every:int=1000, kill_after:int=0, num_workers:int=0, resume:bool=False, seed:int=0, shards=None) -> dict:
    "Train with `SaveProgress(every, resume=resume)`; the final weights and the batches trained on"
    learn, record = digits_learner(out, seed, num_workers=num_workers, shards=shards), RecordBatches()
    cbs = L(SaveProgress(every, resume=resume), record, KillAfter(kill_after) if kill_after else None).filter()
    with learn.no_bar(), learn.no_logging():
        if num_distrib() > 1:
            with learn.distrib_ctx(): learn.fit_one_cycle(EPOCHS, LR, cbs=cbs)
        else: learn.fit_one_cycle(EPOCHS, LR, cbs=cbs)
    return {'weights': {k: v.clone() for k, v in unwrap_model(learn.model).state_dict().items()}, 'batches': record.batches,
            'values': learn.recorder.values}

if __name__ == '__main__':
    out, every, kill_after, num_workers, flags = Path(sys.argv[1]), *map(int, sys.argv[2:5]), sys.argv[5:]
    torch.set_num_threads(1)
    resume, shards = 'resume' in flags, write_digit_shards(out.parent/'shards') if 'shards' in flags else None
    result = train(out, every, kill_after, num_workers, resume, seed=1 if resume else 0, shards=shards)  # resumed: other initial weights
    torch.save(result, out/f'result.rank{rank_distrib()}.pt')
    if 'reference' in flags: torch.save(train(out/'reference', num_workers=num_workers), out/f'reference.rank{rank_distrib()}.pt')
