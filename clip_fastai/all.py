"Everything a user needs: `from clip_fastai.all import *`"
from .tokenizer import *
from .model import *
from .data import *
