"""Images per second of clip_fastai's shard pipeline, open_clip's webdataset pipeline and clip_fastai's in-memory table source.

All three read the same JPEGs (256-500 px sides: smooth random colour fields, 6×6 noise upscaled bicubically plus
fine grain, saved at quality 90, so they compress and decode like photos) and apply the same training transforms: a
random resized crop to 224 px keeping 90-100% of the area, conversion to a float tensor and CLIP's normalisation,
with a random caption tokenised. open_clip's pipeline is `open_clip_train.data.get_wds_dataset` from the
open-clip-torch wheel with its own `image_transform(224, is_train=True)`; both shard pipelines read the same 8 tar
shards. Each pipeline runs 2 epochs per worker count; the table reports the second (warm page cache, open_clip's
persistent workers already started; clip_fastai starts its workers each epoch and that time is counted).

open_clip_train pins webdataset <= 0.2.86, so the benchmark runs with that version for both shard pipelines:

    pip install --target /tmp/wds086 --no-deps webdataset==0.2.86
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wds086 python bench/data.py [--images 2000] [--workers 1 2] [--bs 64]"""
import argparse, random, tempfile, time, warnings
from pathlib import Path
from types import SimpleNamespace
import numpy as np, pandas as pd, torch
from PIL import Image

warnings.simplefilter('ignore', FutureWarning)
from clip_fastai.data import CaptionDataLoaders
from clip_fastai.shards import write_shards

def make_jpegs(folder:Path, n:int, seed:int=0) -> list:
    "`n` photo-like JPEGs with sides between 256 and 500 px"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 501, 2))
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        f = folder/f'{i:05d}.jpg'
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(f, quality=90)
        files.append(f)
    return files

def captions(i:int) -> list: return [f'a photo number {i} of a colourful blur', f'picture {i}, soft colours']

def epoch_rate(make_iter, n_images:int) -> float:
    "Images per second of the second of two passes"
    for _ in range(2):
        start, n = time.perf_counter(), 0
        for b in make_iter(): n += len(b[0])
        elapsed = time.perf_counter() - start
    assert n >= n_images * 0.9, (n, n_images)
    return n / elapsed

def ours_shards(pattern, workers, bs):
    dl = CaptionDataLoaders.from_shards(pattern, image_size=224, bs=bs, num_workers=workers, device='cpu', seed=0).train
    return lambda: iter(dl)

def ours_table(files, workers, bs):
    df = pd.DataFrame({'image': [str(f) for f in files], 'caption': [captions(i)[0] for i in range(len(files))]})
    dls = CaptionDataLoaders.from_df(df, valid_pct=0.0, image_size=224, bs=bs, num_workers=workers, device='cpu', seed=0)
    return lambda: iter(dls.train)

def open_clip_shards(pattern, n_images, workers, bs):
    import webdataset
    if tuple(int(v) for v in webdataset.__version__.split('.')[:3]) > (0, 2, 86):
        raise SystemExit(f"open_clip_train.data needs webdataset <= 0.2.86 (its group_by_keys_nothrow fails on {webdataset.__version__}'s "
                         "end-of-shard markers): pip install --target /tmp/wds086 --no-deps webdataset==0.2.86 and run with "
                         "PYTHONPATH=/tmp/wds086; clip_fastai's pipeline works with both")
    from open_clip import get_tokenizer
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset
    args = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=n_images, dataset_resampled=False, seed=0,
                           batch_size=bs, world_size=1, workers=workers, train_data_upsampling_factors=None)
    data = get_wds_dataset(args, image_transform(224, is_train=True), is_train=True, floor=True, tokenizer=get_tokenizer('ViT-B-32'))
    return lambda: iter(data.dataloader)

def main(n_images=2000, workers=(1, 2), bs=64, folder=None):
    folder = Path(folder or tempfile.mkdtemp())
    files = make_jpegs(folder/'images', n_images)
    table = pd.DataFrame({'image': files, 'captions': [captions(i) for i in range(n_images)]})
    pattern = write_shards(table, folder/'shards', samples_per_shard=n_images // 8)
    rows = []
    for w in workers:
        rates = {'clip_fastai shards': epoch_rate(ours_shards(pattern, w, bs), n_images),
                 'open_clip webdataset': epoch_rate(open_clip_shards(pattern, n_images, w, bs), n_images),
                 'clip_fastai table': epoch_rate(ours_table(files, w, bs), n_images)}
        base = rates['open_clip webdataset']
        rows += [{'workers': w, 'pipeline': k, 'images/s': round(v, 1), 'images/s per worker': round(v / w, 1),
                  'vs open_clip': f'{v / base:.2f}x'} for k, v in rates.items()]
    print(f'{n_images} JPEGs (256-500 px) → 224 px crops, batch size {bs}, {torch.get_num_threads()} torch thread(s)')
    print(markdown_table(rows))

def markdown_table(rows:list) -> str:
    "`rows` (dicts with the same keys) as a markdown table"
    keys = list(rows[0])
    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '|'.join('---' for _ in keys) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(r[k]) for k in keys) + ' |' for r in rows])

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=2000)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--bs', type=int, default=64)
    parser.add_argument('--folder', default=None)
    a = parser.parse_args()
    main(a.images, a.workers, a.bs, a.folder)
