"Everything a user needs: `from clip_fastai.all import *`"
from .tokenizer import *
from .model import *
from .data import *
from .train import *
from .metrics import *
from .distributed import *
from .zeroshot import *
from .finetune import *
from .pretrained import *
