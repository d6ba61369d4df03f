"""A learner saved with `learn.export` and read back with `load_learner` in a fresh process, which imports nothing
of clip_fastai itself: its classes, descriptions, tokenizer and every documented method are there."""
import os, subprocess, sys, json, textwrap
from pathlib import Path
import torch
from digits import digits_learner

def test_loaded_learner_keeps_its_knowledge(tmp_path):
    learn = digits_learner(tmp_path)
    dls, folder = learn.dls, tmp_path/'digits'
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    learn.export(tmp_path/'learner.pkl')
    files = [str(f) for f in sorted((folder/'valid').rglob('*.png'))[:5]]
    image_emb = learn.get_preds(dl=dls.test_dl(files))[0]
    text_emb = learn.get_preds(dl=dls.test_dl(["a handwritten digit two"]))[0]
    label, index, probs = learn.predict(files[0])
    torch.save({'image': image_emb, 'text': text_emb, 'probs': probs}, tmp_path/'expected.pt')
    script = textwrap.dedent(f"""
        import json, sys, torch
        from fastai.learner import load_learner
        learn = load_learner({str(tmp_path/'learner.pkl')!r})
        files = {files!r}
        expected = torch.load({str(tmp_path/'expected.pt')!r})
        assert type(learn).__name__ == 'CLIPLearner', type(learn)
        assert learn.dls.classes == ['0', '1', '2'], learn.dls.classes
        assert learn.dls.vocab == ['0', '1', '2'], learn.dls.vocab
        assert set(learn.dls.descriptions) == {{'0', '1', '2'}}, learn.dls.descriptions
        classifier = learn.zero_shot_classifier()
        assert classifier.classes == ['0', '1', '2'], classifier.classes
        label, index, probs = learn.predict(files[0])
        torch.testing.assert_close(probs, expected['probs'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(learn.get_preds(dl=learn.dls.test_dl(files))[0], expected['image'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(learn.get_preds(dl=learn.dls.test_dl(["a handwritten digit two"]))[0], expected['text'], rtol=1e-5, atol=1e-6)
        learn.lock_image_tower().unlock_towers()
        print(json.dumps({{'label': label, 'index': int(index)}}))
    """)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {'label': label, 'index': int(index)}, (answer, label, index)
