"The small, seeded digits learner that several tests train: one home for its setup"
import torch
from fastai.torch_core import set_seed
from clip_fastai.tokenizer import ClipTokenizer
from clip_fastai.model import CLIP
from clip_fastai.data import CaptionDataLoaders, make_digits_folder, digit_descriptions
from clip_fastai.train import clip_learner

def digits_learner(tmp_path, # Folder for the digits (and the learner's `path` unless given)
                   digits=range(3), # Which digits to write
                   **kwargs): # Passed to `clip_learner`
    "A tiny-ResNet `clip_learner` on the seeded digits, one thread, reproducible"
    torch.set_num_threads(1)
    set_seed(0, reproducible=True)
    folder = make_digits_folder(tmp_path/'digits', digits=digits)
    tok = ClipTokenizer(context_length=16)
    dls = CaptionDataLoaders.from_folder(folder, digit_descriptions(), tokenizer=tok, image_size=32, bs=32, num_workers=0)
    model = CLIP.from_config('tiny-resnet', context_length=tok.context_length, vocab_size=tok.vocab_size)
    return clip_learner(dls, model, **{'path': tmp_path, **kwargs})
