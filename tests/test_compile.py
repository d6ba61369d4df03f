"""`torch.compile` with the Learner, on the CPU's inductor: captions of varied lengths, validation (no gradients) and a
short last batch compile no graph beyond the first training and validation graphs; the compiled model's features are
the eager model's; `learn.save` of a compiled learner reads back with `CLIP.from_state_dict`."""
import random, tempfile, time
from pathlib import Path
import pandas as pd, pytest, torch
import torch._dynamo
from torch._dynamo.utils import counters
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from clip_fastai.model import CLIP
from clip_fastai.tokenizer import ClipTokenizer
from clip_fastai.data import CaptionDataLoaders, make_digits_folder
from clip_fastai.train import clip_learner
import clip_fastai.throughput  # `Learner.compile`

def graphs(): return counters['stats']['unique_graphs']

class GraphCount(Callback):
    "The number of graphs compiled so far, after every batch, training or validation"
    order = 99
    def before_fit(self): self.counts, self.lengths = [], set()
    def before_batch(self): self.lengths.add((self.training, int(self.xb[1].argmax(-1).max()) + 1))  # longest caption
    def after_batch(self): self.counts.append((self.training, graphs()))

@pytest.fixture(scope='module')
def dls():
    folder = make_digits_folder(Path(tempfile.gettempdir())/'clip_fastai_digits_compile')
    files = sorted(folder.glob('*/*/*.png'))[:69]
    rng = random.Random(0)
    words = 'a handwritten digit written by hand with a pen on white paper in black ink'.split()
    # mostly short captions, one in ten long: the longest caption of a batch of 8 varies from batch to batch
    sizes = [12 if i % 10 == 0 else 1 + i % 3 for i in range(len(files))]
    table = pd.DataFrame({'image': files, 'captions': [[' '.join(rng.choices(words, k=k))] for k in sizes],
                          'match_id': range(len(files)), 'is_valid': [i >= 48 for i in range(len(files))]})
    return CaptionDataLoaders.from_table(table, tokenizer=ClipTokenizer(context_length=32), image_size=32, bs=8, num_workers=0)

def tiny_model():
    torch.manual_seed(0)
    return CLIP.from_config('tiny-vit', context_length=32, vocab_size=49408, vision_layers=1, transformer_layers=1)

@pytest.mark.parametrize('style', ['learn.compile()', 'learn.model = torch.compile(learn.model)'])
def test_compiled_training_compiles_two_graphs(dls, style, tmp_path):
    assert [len(b[0]) for b in dls.valid] == [8, 8, 5]  # the last validation batch is short
    torch._dynamo.reset(); counters.clear(); set_seed(0)
    counter = GraphCount()
    learn = clip_learner(dls, tiny_model(), cbs=counter, path=tmp_path)
    if style == 'learn.compile()': assert learn.compile() is learn and type(learn.model) is CLIP
    else: learn.model = torch.compile(learn.model)
    times = []
    for epoch in range(2):
        start = time.perf_counter(); learn.fit(1, 1e-3); times.append(time.perf_counter() - start)
    print(f"{style}: epochs of {', '.join(f'{t:.1f}' for t in times)} s")
    counts = counter.counts  # the second fit's
    # the batches' longest captions differed (an eager model would run each at its length), in training and validation
    assert all(len({n for t, n in counter.lengths if t == training}) > 1 for training in (True, False)), counter.lengths
    # one graph for training (the first fit), one for validation; none for later batches or the second epoch
    assert graphs() == 2, (graphs(), counts)
    assert {n for _, n in counts} == {2}, counts

    batch = dls.valid.one_batch()
    images, text = (x.as_subclass(torch.Tensor) for x in batch[:2])
    learn.model.eval()
    with torch.no_grad(): compiled = learn.model(images, text)
    eager = CLIP.from_state_dict(learn.model.state_dict())  # `_orig_mod.` keys of `torch.compile` are read too
    with torch.no_grad(): reference = eager.eval()(images, text)
    for a, b in zip(compiled[:2], reference[:2]): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # fastai's `learn.save`: the weights alone are a plain state dict, read from the file; with the optimizer's state
    # (fastai's `L`, which `torch.load(weights_only=True)` refuses) the loaded dict is read
    learn.save('weights', with_opt=False)
    saved = torch.load(tmp_path/'models'/'weights.pth', weights_only=True)
    assert any('_orig_mod.' in k for k in saved) == (style != 'learn.compile()'), list(saved)[:3]
    learn.save('with_opt')
    for source in (tmp_path/'models'/'weights.pth', torch.load(tmp_path/'models'/'with_opt.pth', weights_only=False)):
        loaded = CLIP.from_state_dict(source, activation='quick_gelu')
        for (k, a), b in zip(loaded.state_dict().items(), eager.state_dict().values()): assert torch.equal(a, b), k
