"""fastai's W&B and TensorBoard callbacks with their defaults (prediction samples and the model graph included) on a
CLIP learner: they run, and they log what they promise. W&B runs offline."""
import os, io
from pathlib import Path
import pytest, torch
from clip_fastai.metrics import RetrievalAtK
from digits import digits_learner

@pytest.fixture
def learner(tmp_path):
    return lambda **kwargs: digits_learner(tmp_path, metrics=[RetrievalAtK(1)], **kwargs)

def test_tensorboard_defaults(learner, tmp_path, capsys):
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = learner(cbs=TensorBoardCallback(tmp_path/'tb'))  # trace_model=True, log_preds=True
    learn.fit(1, 1e-3)
    events = EventAccumulator(str(tmp_path/'tb'), size_guidance={'images': 0}).Reload()
    tags = events.Tags()
    assert 'Sample results' in tags['images'], tags
    assert events.Graph() is not None  # the traced model
    assert any(t.startswith('i2t_R@1') or 'R@1' in t for t in tags['scalars']), tags['scalars']
    image = events.Images('Sample results')[-1]
    assert image.width > 100 and image.height > 100, (image.width, image.height)

def test_wandb_defaults(learner, tmp_path, capsys, monkeypatch):
    import wandb
    from fastai.callback.wandb import WandbCallback
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    run = wandb.init(project='clip_fastai_test', dir=str(tmp_path), mode='offline')
    try:
        learn = learner(cbs=WandbCallback())  # log_preds=True
        learn.fit(1, 1e-3)
    finally: wandb.finish()
    out = capsys.readouterr().out
    assert 'not able' not in out, out  # fastai prints "WandbCallback was not able to ..." and stops logging samples
    media = list(Path(tmp_path/'wandb').rglob('media/images/*'))
    assert media, sorted(str(p) for p in Path(tmp_path/'wandb').rglob('*'))[:50]
