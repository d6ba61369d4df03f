"`bench/train.py` at tiny sizes, so that it cannot rot: both training loops, every recipe, and its retrieval scores"
import importlib.util, json, subprocess, sys
from pathlib import Path
import pytest, torch
from PIL import Image, ImageDraw

root = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location('train_bench', root/'bench'/'train.py')
train_bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(train_bench)

def test_recall_at_k_by_hand():
    "Three images and captions; two captions are the same text, so either counts for both of their images"
    images = torch.tensor([[1., 0.], [0., 1.], [0.6, 0.8]])
    texts = torch.tensor([[0., 1.], [1., 0.], [0.8, 0.6]])  # image 0 is nearest text 1, image 1 nearest text 0
    res = train_bench.recall_at_k(images, texts, ['a cat.', 'a dog.', 'a cat.'], ks=(1, 2))
    # image 0 ('a cat.'): ranks text 1 ('a dog.'), text 2 ('a cat.') -> hit at rank 2; image 1 ('a dog.'): text 0 ('a cat.'), text 2,
    # text 1 -> rank 3; image 2 ('a cat.'): text 2 (0.96) first -> rank 1
    assert res['i2t R@1'] == pytest.approx(100/3) and res['i2t R@2'] == pytest.approx(200/3), res
    # text 0 ('a cat.'): image 1, image 2 ('a cat.') -> rank 2; text 1 ('a dog.'): image 0, image 2, image 1 -> 3; text 2: image 2 first
    assert res['t2i R@1'] == pytest.approx(100/3) and res['t2i R@2'] == pytest.approx(200/3), res

def make_stamps(folder:Path, n:int=48):
    "Coloured shapes on transparent backgrounds with their captions in `.txt` files beside them, as Tux Paint lays out stamps"
    colours, shapes = ['red', 'blue', 'green', 'yellow'], ['circle', 'square', 'triangle']
    for i in range(n):
        colour, shape = colours[i % 4], shapes[(i // 4) % 3]
        im = Image.new('RGBA', (40 + i, 60), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        box = (5, 5, 35, 55)
        if shape == 'circle': d.ellipse(box, fill=colour)
        elif shape == 'square': d.rectangle(box, fill=colour)
        else: d.polygon([(5, 55), (20, 5), (35, 55)], fill=colour)
        sub = folder/shape; sub.mkdir(parents=True, exist_ok=True)
        im.save(sub/f'{colour}{i}.png')
        (sub/f'{colour}{i}.txt').write_text(f'A {colour} {shape}.\nUn {shape} ({colour}).\n', encoding='utf-8')
    (folder/'circle'/'uncaptioned.png').write_bytes((folder/'circle'/'red0.png').read_bytes())  # no .txt: left out

def test_bench_runs_both_sides(tmp_path):
    make_stamps(tmp_path/'stamps')
    out = tmp_path/'rows.json'
    result = subprocess.run([sys.executable, str(root/'bench'/'train.py'), '--stamps', str(tmp_path/'stamps'), '--cache', str(tmp_path/'cache'),
                             '--seeds', '0', '--steps', '4', '--bs', '8', '--n-valid', '8', '--size', '32', '--width', '64',
                             '--layers', '1', '--variants', *train_bench.variants, '--json', str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '48 captioned stamps (40 training, 8 validation)' in result.stdout, result.stdout
    rows = json.loads(out.read_text())
    assert [(r['side'], r['recipe']) for r in rows] == [('open_clip', '')] + [('clip_fastai', v) for v in train_bench.variants], rows
    for r in rows:
        assert r['epochs'] == 1 and r['seconds'] > 0, r  # 40 // 8 = 5 batches an epoch: round(4 / 5) = 1 epoch
        for d in ('i2t', 't2i'): assert 0 <= r[f'{d} R@1'] <= r[f'{d} R@5'] <= r[f'{d} R@10'] <= 100, r
    assert 'time vs open_clip' in result.stdout, result.stdout
    prepared = sorted((tmp_path/'cache').iterdir())
    assert len(prepared) == 48 and all(Image.open(p).mode == 'RGB' and min(Image.open(p).size) == 80 for p in prepared), prepared[:3]

def test_missing_stamps_say_what_to_install(tmp_path):
    result = subprocess.run([sys.executable, str(root/'bench'/'train.py'), '--stamps', str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and 'tuxpaint-stamps-default' in result.stderr, result.stderr
