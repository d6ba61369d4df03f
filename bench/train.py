"""Train the same small ViT CLIP on real pictures with clip_fastai's Learner and with open_clip's training loop.

The pictures are Tux Paint's stamps (Debian package `tuxpaint-stamps-default`, GPL-2, not committed: the
script reads them where the package puts them): 785 drawings and photographs (animals, food, vehicles, coins,
letters, ...), each with a human-written English caption (the first line of the `.txt` beside it, e.g.
"A great blue heron."). They are composited on white once and saved at a short side of 80 px in a cache folder,
so that both pipelines read the very same files; a fixed split keeps 118 aside for validation.

Both sides train the same model (sizes `--width`, `--layers`, `--patch` at `--size` px, OpenAI's
initialisation, QuickGELU) with the same recipe: batch `--bs`, `--steps` steps, AdamW (0.9, 0.98, 1e-6) at
`--lr` with weight decay 0.2, linear warm-up over `--warmup` of the steps then cosine to 0, random resized crops
of 90–100% of the image; each validates after every epoch (loss and retrieval, as each library's own loop
does). open_clip's side is its own code: `create_model_and_transforms` of a registered configuration,
`open_clip_train.data.get_csv_dataset`, main.py's weight-decay groups, `cosine_lr`, `ClipLoss`, `train_one_epoch`
and `evaluate`. Then every model is scored the same way: R@1/5/10 in both directions over the validation set,
through its own validation transform, a caption counting as a match when its text equals the image's caption
(six stamps are "A flower."); "mean R" is the mean of the six (a picture is 0.85 points of each R@k, so single
numbers move by a few points between seeds). clip_fastai's models are also scored through both validation
transforms ("centre": the short side resized and the centre square, as open_clip; "squash": fastai's
`RandomResizedCrop`, the whole picture squashed), which shows what the transform alone changes.

`--variants` trains clip_fastai once per named recipe (see `variants`), to find what made a difference:
each row of the table differs from the row above it in one thing. Seeds and sides are interleaved, so a slower
stretch of this shared machine falls on all of them.

    apt-get install tuxpaint-stamps-default     # or: apt-get download ...; dpkg -x *.deb DIR; --stamps DIR/usr/share/tuxpaint/stamps
    python bench/train.py [--seeds 0 1] [--steps 300] [--variants old schedule decay resize crop]
"""
import argparse, json, math, tempfile, time, warnings
from pathlib import Path
from types import SimpleNamespace
import numpy as np, pandas as pd, torch
from PIL import Image

STAMPS = Path('/usr/share/tuxpaint/stamps')

def read_stamps(folder) -> pd.DataFrame:
    "Every PNG stamp under `folder` that has a caption: the first line of the `.txt` file beside it"
    rows = []
    for png in sorted(Path(folder).rglob('*.png')):
        txt = png.with_suffix('.txt')
        if not txt.exists(): continue
        caption = txt.read_text(encoding='utf-8', errors='replace').splitlines()[0].strip()
        if caption: rows.append((png, caption))
    if not rows:
        raise SystemExit(f"No captioned stamps under {folder}: install Debian's tuxpaint-stamps-default, or pass --stamps")
    return pd.DataFrame(rows, columns=['source', 'caption'])

def prepare(stamps:pd.DataFrame, cache:Path, short_side:int=80, n_valid:int=118) -> pd.DataFrame:
    "The stamps composited on white at `short_side` px in `cache`, with a fixed validation split"
    cache.mkdir(parents=True, exist_ok=True)
    names = []
    for i, src in enumerate(stamps['source']):
        name = f'{i:04d}.png'
        if not (cache/name).exists():
            im = Image.open(src).convert('RGBA')  # palette and grey images with transparency too
            white = Image.new('RGBA', im.size, 'white')
            im = Image.alpha_composite(white, im).convert('RGB')
            scale = short_side / min(im.size)
            im = im.resize((max(1, round(im.width*scale)), max(1, round(im.height*scale))), Image.LANCZOS)
            im.save(cache/name)
        names.append(name)
    df = pd.DataFrame({'image': names, 'caption': stamps['caption'].values})
    df['is_valid'] = False
    df.loc[np.random.RandomState(0).permutation(len(df))[:n_valid], 'is_valid'] = True
    return df

def recall_at_k(image_features, text_features, captions, ks=(1, 5, 10)) -> dict:
    "R@k of image→text and text→image retrieval, by brute force: a hit is a caption equal to the query's"
    sims = image_features.float() @ text_features.float().T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    res = {}
    for direction, s, m in (('i2t', sims, same), ('t2i', sims.T, same.T)):
        order = s.argsort(dim=1, descending=True)
        first_hit = m.gather(1, order).float().argmax(dim=1)  # rank of the best-ranked matching candidate
        for k in ks: res[f'{direction} R@{k}'] = 100 * (first_hit < k).float().mean().item()
    res['mean R'] = sum(res.values()) / len(res)  # one number, less noisy than each (a picture is 0.85 points of R@k)
    return res

def model_sizes(a) -> dict:
    return dict(embed_dim=a.width, image_size=a.size, vision_layers=a.layers, vision_width=a.width, vision_patch_size=a.patch,
                transformer_width=a.width, transformer_heads=max(1, a.width//64), transformer_layers=a.layers,
                context_length=77, vocab_size=49408, activation='quick_gelu')

# clip_fastai recipes, each differing from the one before it in one thing; 'default' is the library's own
variants = {
    'old':      dict(fit='one_cycle', exempt_embeddings=True, resample='bilinear', valid='squash'),  # before this benchmark
    'schedule': dict(fit='warmup_cosine', exempt_embeddings=True, resample='bilinear', valid='squash'),  # open_clip's schedule, fixed betas
    'decay':    dict(fit='warmup_cosine', exempt_embeddings=False, resample='bilinear', valid='squash'),  # embeddings decayed, as the paper says
    'resize':   dict(fit='warmup_cosine', exempt_embeddings=False, resample='bicubic', valid='squash'),  # bicubic, as open_clip resizes
    'crop':     dict(fit='warmup_cosine', exempt_embeddings=False, resample='bicubic', valid='centre'),  # validation: the centre square
    'default':  {},  # `CaptionDataLoaders.from_df`, `clip_learner` and `fit_warmup_cosine`, each with its defaults
}

def recipe_item_tfms(recipe:dict, size:int):
    "The item transforms of `recipe`: its resampling, and fastai's validation (whole image squashed) or the centre square"
    from fastai.vision.all import RandomResizedCrop
    from clip_fastai.data import clip_image_tfms
    if not recipe: return None
    resample = getattr(Image, recipe['resample'].upper())
    if recipe['valid'] == 'centre': return clip_image_tfms(size, 0.9, resample)[0]
    return [RandomResizedCrop(size, min_scale=0.9, resamples=(resample, Image.NEAREST))]  # fastai's: val_xtra=0.14, squashed

def clip_fastai_learner(df, folder, a, seed, recipe):
    from fastai.vision.all import Callback, set_seed
    from clip_fastai.all import CaptionDataLoaders, CLIP, clip_learner, RetrievalAtK
    r = variants[recipe]
    set_seed(seed)
    dls = CaptionDataLoaders.from_df(df, path=folder, valid_col='is_valid', image_size=a.size, bs=a.bs, num_workers=0,
                                     item_tfms=recipe_item_tfms(r, a.size))
    class ExemptEmbeddings(Callback):  # the weight-decay set of clip_fastai before this benchmark
        order = 1
        def before_fit(self):
            for name, p in self.model.named_parameters():
                if 'embedding' in name: self.opt.state[p]['do_wd'] = False
    metrics = [RetrievalAtK(k, d) for d in ('i2t', 't2i') for k in (1, 5, 10)]  # as open_clip's `evaluate` reports
    return clip_learner(dls, CLIP(**model_sizes(a)), metrics=metrics, cbs=[ExemptEmbeddings()] if r.get('exempt_embeddings') else None)

def train_clip_fastai(df, folder, a, seed, recipe):
    from clip_fastai.data import CaptionDataLoaders
    learn = clip_fastai_learner(df, folder, a, seed, recipe)
    epochs = round(a.steps / len(learn.dls.train))
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        if variants[recipe].get('fit') == 'one_cycle': learn.fit_one_cycle(epochs, a.lr, pct_start=a.warmup)
        else: learn.fit_warmup_cosine(epochs, a.lr, warmup=a.warmup)
    seconds = time.perf_counter() - start
    res = retrieval(learn.model, learn.dls.valid)
    # the same model through both validation transforms: what the picture shown changes, without training again
    for valid in ('centre', 'squash'):
        other = dict(variants[recipe] or variants['crop'], valid=valid)  # the recipe's resampling
        dls = CaptionDataLoaders.from_df(df, path=folder, valid_col='is_valid', image_size=a.size, bs=a.bs, num_workers=0,
                                         item_tfms=recipe_item_tfms(other, a.size))
        res[f'mean R, {valid}'] = retrieval(learn.model, dls.valid)['mean R']
    return seconds, epochs, res

def retrieval(model, dl) -> dict:
    "`recall_at_k` of `model` over the validation `DataLoader` `dl`"
    model, feats = model.eval(), ([], [])
    with torch.no_grad():
        for images, tokens, *_ in dl:
            feats[0].append(model.encode_image(images).as_subclass(torch.Tensor))
            feats[1].append(model.encode_text(tokens).as_subclass(torch.Tensor))
    captions = [c[0] for c in dl.dataset.items['captions']]
    return recall_at_k(*(torch.nn.functional.normalize(torch.cat(f), dim=-1) for f in feats), captions)

def train_open_clip(df, folder, a, seed, workdir:Path):
    import logging, random, open_clip
    from open_clip_train.data import get_csv_dataset
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch, evaluate
    logging.getLogger().setLevel(logging.WARNING)
    cfg = dict(embed_dim=a.width, quick_gelu=True,
               vision_cfg=dict(image_size=a.size, layers=a.layers, width=a.width, patch_size=a.patch),
               text_cfg=dict(context_length=77, vocab_size=49408, width=a.width, heads=max(1, a.width//64), layers=a.layers))
    (workdir/'bench-vit.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(workdir/'bench-vit.json')
    for split, rows in (('train', df[~df.is_valid]), ('val', df[df.is_valid])):
        pd.DataFrame({'filepath': [str(Path(folder)/f) for f in rows.image], 'title': rows.caption}).to_csv(
            workdir/f'{split}.csv', sep='\t', index=False)
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)  # as main.py's `random_seed`
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms('bench-vit', pretrained=None, output_dict=True)
    tokenizer = open_clip.get_tokenizer('bench-vit')
    args = SimpleNamespace(train_data=str(workdir/'train.csv'), val_data=str(workdir/'val.csv'), csv_img_key='filepath',
        csv_caption_key='title', csv_separator='\t', batch_size=a.bs, workers=0, distributed=False, horovod=False,
        device='cpu', precision='fp32', accum_freq=1, distill=False, skip_scheduler=False, grad_clip_norm=None,
        log_every_n_steps=10**9, world_size=1, rank=0, local_rank=0, wandb=False, save_logs=False, val_frequency=1,
        zeroshot_frequency=0, model='bench-vit')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # pin_memory without a GPU
        data = {'train': get_csv_dataset(args, preprocess_train, True, tokenizer=tokenizer),
                'val': get_csv_dataset(args, preprocess_val, False, tokenizer=tokenizer)}
    args.epochs = epochs = round(a.steps / data['train'].dataloader.num_batches)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # main.py's
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.},
                                   {'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': a.wd}],
                                  lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    total = data['train'].dataloader.num_batches * epochs
    scheduler = cosine_lr(optimizer, a.lr, round(a.warmup * total), total)
    loss = open_clip.ClipLoss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for epoch in range(epochs):
            train_one_epoch(model, data, loss, epoch, optimizer, None, scheduler, None, args)
            evaluate(model, data, epoch + 1, args, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    model.eval()
    val = df[df.is_valid]
    with torch.no_grad():
        images = torch.stack([preprocess_val(Image.open(Path(folder)/f)) for f in val.image])
        feats = model.encode_image(images, normalize=True), model.encode_text(tokenizer(list(val.caption)), normalize=True)
    return seconds, epochs, recall_at_k(*feats, list(val.caption))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--stamps', type=Path, default=STAMPS, help="Tux Paint's stamps folder")
    p.add_argument('--cache', type=Path, default=Path(tempfile.gettempdir())/'clip_fastai_stamps', help='where the prepared pictures go')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--wd', type=float, default=0.2)
    p.add_argument('--warmup', type=float, default=0.1, help='share of the steps spent warming up')
    p.add_argument('--size', type=int, default=64, help='image side')
    p.add_argument('--width', type=int, default=192, help='token width of both towers and of the joint space')
    p.add_argument('--layers', type=int, default=4, help='blocks of each tower')
    p.add_argument('--patch', type=int, default=8)
    p.add_argument('--n-valid', type=int, default=118)
    p.add_argument('--variants', nargs='*', default=['default'], choices=list(variants), help='clip_fastai recipes to train')
    p.add_argument('--no-open-clip', action='store_true', help='train clip_fastai only')
    p.add_argument('--json', type=Path, help='also write the rows here')
    a = p.parse_args(argv)
    df = prepare(read_stamps(a.stamps), a.cache, n_valid=a.n_valid)
    params = sum(p.numel() for p in __import__('clip_fastai.model', fromlist=['CLIP']).CLIP(**model_sizes(a)).parameters())
    print(f"{len(df)} captioned stamps ({(~df.is_valid).sum()} training, {df.is_valid.sum()} validation); ViT CLIP of "
          f"{params/1e6:.1f}M parameters at {a.size} px, batch {a.bs}, {a.steps} steps, lr {a.lr}, {torch.get_num_threads()} threads")
    rows = []
    for seed in a.seeds:
        runs = [] if a.no_open_clip else [('open_clip', None)]
        runs += [('clip_fastai', v) for v in a.variants]
        for side, recipe in (runs if seed % 2 == 0 else runs[::-1]):  # alternate the order from seed to seed
            with tempfile.TemporaryDirectory() as d:
                seconds, epochs, res = (train_open_clip(df, a.cache, a, seed, Path(d)) if side == 'open_clip' else
                                        train_clip_fastai(df, a.cache, a, seed, recipe))
            rows.append(dict(side=side, recipe=recipe or '', seed=seed, epochs=epochs, seconds=seconds, **res))
            print(f"  seed {seed} {side} {recipe or ''}: {seconds:.0f} s, " + ', '.join(f'{k} {v:.1f}' for k, v in res.items()), flush=True)
    table = pd.DataFrame(rows)
    mean = table.groupby(['side', 'recipe'], sort=False).mean(numeric_only=True).drop(columns=['seed', 'epochs'])
    if not a.no_open_clip: mean.insert(1, 'time vs open_clip', mean.seconds / mean.loc[('open_clip', ''), 'seconds'])
    print(f"\nMean of seeds {a.seeds}:")
    print(mean.round(2).to_string())
    if a.json: a.json.write_text(table.to_json(orient='records', indent=1))
    return table

if __name__ == '__main__': main()
