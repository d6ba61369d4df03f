"""Fine-tuning from an open_clip checkpoint file: `CLIP.from_state_dict(torch.load(path))` gives open_clip's outputs,
fine-tunes through `finetune_learner` with a locked image tower, and the locked tower still gives open_clip's image features."""
import tempfile
from pathlib import Path
import pytest, torch
import open_clip
from fastai.callback.progress import ProgressCallback
from clip_fastai.tokenizer import ClipTokenizer
from clip_fastai.model import CLIP
from clip_fastai.data import CaptionDataLoaders, make_digits_folder, digit_descriptions
from clip_fastai.finetune import finetune_learner, tower_parameters
from clip_fastai.zeroshot import zero_shot_accuracy

@pytest.fixture(scope='module')
def checkpoint():
    "A small open_clip ViT (QuickGELU, OpenAI's layout), its weights moved off the initialisation, saved as a file"
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=64, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=128, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in reference.parameters(): p.add_(0.02 * torch.randn_like(p))
    path = Path(tempfile.mkdtemp())/'open_clip_small.pt'
    torch.save(reference.state_dict(), path)
    return reference, path

@pytest.fixture(scope='module')
def dls():
    tok = ClipTokenizer(context_length=16)
    path = make_digits_folder(Path(tempfile.mkdtemp())/'digits5-9', digits=range(5, 10))
    return CaptionDataLoaders.from_folder(path, digit_descriptions(), tokenizer=tok, image_size=32, bs=64)

def test_loads_open_clip_checkpoint(checkpoint, dls):
    reference, path = checkpoint
    model = CLIP.from_state_dict(torch.load(path)).eval()
    images, texts, _ = (t.as_subclass(torch.Tensor) for t in dls.valid.one_batch())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(texts), reference.encode_text(texts), atol=1e-5, rtol=1e-4)

def test_finetunes_open_clip_checkpoint_with_locked_image_tower(checkpoint, dls):
    reference, path = checkpoint
    model = CLIP.from_state_dict(torch.load(path))
    learn = finetune_learner(dls, model, classification_weight=0.5, cbs=[]).lock_image_tower()
    learn.remove_cb(ProgressCallback)
    text_before = [p.detach().clone() for p in tower_parameters(model, 'text')]
    learn.fine_tune(1, 1e-3, freeze_epochs=1)
    loss, zero_shot_top1 = learn.validate()
    assert torch.isfinite(torch.tensor(loss)) and 0 <= zero_shot_top1 <= 1
    assert zero_shot_top1 == pytest.approx(zero_shot_accuracy(learn.model, dls)['top1'], abs=1e-6)
    # the text tower trained, the locked image tower still computes open_clip's features
    assert all(not torch.equal(b, p) for b, p in zip(text_before, tower_parameters(model, 'text')))
    images = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-4)
