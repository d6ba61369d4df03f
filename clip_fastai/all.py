"Everything a user needs: `from clip_fastai.all import *`"
from .tokenizer import *
from .model import *
from .data import *
from .shards import *
from .train import *
from .throughput import *
from .resume import *
from .metrics import *
from .distributed import *
from .siglip import *
from .zeroshot import *
from .finetune import *
from .pretrained import *
from .app import *
