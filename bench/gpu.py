"""Training-step speed of clip_fastai's `CLIP` against open_clip's on one GPU: samples/s, MFU and peak memory.

For ViT-B/32, ViT-B/16 and RN50 at batch 256 (224 px, 77-token captions of real lengths), bf16 autocast, AdamW:
  - ours and open_clip's (`open_clip.create_model(name, pretrained=None)`, the same sizes and activation), eager and
    `torch.compile`d, all in one process and timed in interleaved rounds, so that a change in the GPU's clocks or
    load hits every row alike; each row is its fastest round;
  - the largest batch (doubling from 256) that fits with gradient checkpointing, ours and open_clip's;
  - checks that decide defaults which only a GPU can decide: fastai's `Adam` against `torch.optim.AdamW`
    (foreach and fused) on ViT-B/16's parameters; which attention kernel `scaled_dot_product_attention` runs (the
    profiler's kernel names, and whether the flash kernel alone accepts our shapes); captions cut to the batch's
    longest against padded to 77 tokens; and whether an eager and a compiled training step synchronise host and GPU
    (`torch.cuda.set_sync_debug_mode('error')`).

A training step: forward under autocast, the symmetric contrastive loss, backward, optimizer step, `zero_grad`.
MFU: the model FLOPs of a step (three forward passes, counted by `FlopCounterMode` through
`clip_fastai.throughput.training_flops_per_sample`; recomputation not counted) times samples/s, over the datasheet's
peak (`clip_fastai.throughput.peak_flops`, or `--peak`). Peak memory: `torch.cuda.max_memory_allocated` during the
row's steps, less what the other rows hold, plus the row's own weights, gradients and optimizer state.

A failing row (out of memory, a compile error) prints its error in its place and the others go on. Results are
also written as JSON (`--json`). Without a GPU (or with `--cpu`) it runs tiny models at batch 8 in a few seconds:
that is how the test suite keeps this script from rotting.

Run: `python bench/gpu.py` (under 8 minutes on one H100), `python bench/gpu.py --quick` (ViT-B/16 only, about 2
minutes), `python bench/gpu.py --cpu`."""
import argparse, json, math, os, sys, time, traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from functools import partial
import torch
import torch.nn.functional as F

captions = ["a photo of a cat sitting on a wooden table", "two dogs running on the beach at sunset",
            "a red double-decker bus driving down a city street", "a bowl of fruit with apples and bananas",
            "a man riding a bicycle past a row of shops", "an aerial view of a river winding through a forest",
            "a plate of pasta with tomato sauce and basil", "a small boat on a calm lake under a cloudy sky",
            "children playing football in a park on a sunny afternoon while their parents watch from the benches",
            "a close-up of a sunflower in a field", "a kitchen with white cabinets and a window",
            "a train crossing a bridge over a valley", "a woman reading a book on a bench",
            "a snowy mountain behind a wooden cabin", "a laptop and a cup of coffee on a desk",
            "a herd of cows grazing in a green meadow"]

open_clip_names = {'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16', 'RN50': 'RN50'}

def tiny_sizes(arch):
    "One block a tower, for the CPU: seconds per row"
    from clip_fastai.model import clip_configs
    resnet = isinstance(clip_configs.get(arch, {}).get('vision_layers'), tuple)
    return dict(transformer_layers=1) | ({} if resnet else dict(vision_layers=1))

def our_model(arch, cpu=False):
    from clip_fastai.model import CLIP
    return CLIP.from_config(arch, activation='gelu', **(tiny_sizes(arch) if cpu else {}))

def open_clip_model(arch, config, cpu=False):
    "open_clip's model of the sizes of our `config`: `create_model` for its named configurations, else its `CLIP` class"
    import open_clip
    if arch in open_clip_names and not cpu: return open_clip.create_model(open_clip_names[arch], pretrained=None)
    resnet = isinstance(config['vision_layers'], tuple)
    vision = dict(image_size=config['image_size'], layers=config['vision_layers'], width=config['vision_width'],
                  patch_size=config['vision_patch_size'],
                  head_width=(config['vision_width'] * (32 if resnet else 1)) // config['vision_heads'])
    text = dict(context_length=config['context_length'], vocab_size=config['vocab_size'], width=config['transformer_width'],
                heads=config['transformer_heads'], layers=config['transformer_layers'])
    return open_clip.model.CLIP(config['embed_dim'], vision, text)

def contrastive_loss(image_features, text_features, logit_scale):
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

def make_batch(bs, image_size, context_length, device, seed=0):
    from clip_fastai.tokenizer import ClipTokenizer
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(bs, 3, image_size, image_size, generator=generator)
    tokenizer = ClipTokenizer(context_length=context_length)
    text = torch.stack([torch.as_tensor(tokenizer(captions[i % len(captions)])) for i in range(bs)])
    return images.to(device), text.to(device)

def synchronize(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)

def state_bytes(model, opt):
    "Bytes of the weights, gradients and optimizer state of `model`"
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)

class Row:
    "One configuration: a model, its optimizer and a batch, and its training step"
    def __init__(self, name, library, arch, bs, args, compiled=False, checkpointing=False, trim=None):
        self.name, self.library, self.arch, self.bs, self.args = name, library, arch, bs, args
        self.compiled, self.checkpointing, self.trim = compiled, checkpointing, trim
        self.rates, self.error, self.result = [], None, {}

    def build(self):
        args, device = self.args, self.args.device
        torch.manual_seed(0)
        ours = our_model(self.arch, args.cpu)
        model = ours if self.library == 'clip_fastai' else open_clip_model(self.arch, ours.config, args.cpu)
        self.config = ours.config
        if self.library != 'clip_fastai': del ours
        if self.trim is not None: model.trim_captions = self.trim
        if self.checkpointing: model.set_grad_checkpointing(True)
        self.model = model.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                                     **({'fused': True} if device.type == 'cuda' else {}))
        self.images, self.text = make_batch(self.bs, self.config['image_size'], self.config['context_length'], device)
        from clip_fastai.throughput import training_flops_per_sample
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            self.flops_per_sample = training_flops_per_sample(self.model, (self.images[:64], self.text[:64]))
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self):
        with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            image_features, text_features, logit_scale = self.forward(self.images, self.text)[:3]
            loss = contrastive_loss(image_features, text_features, logit_scale)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def warm_up(self, steps=None):
        "Build, then run the first steps (compilation, autotuning): their time is `first_steps_s`"
        self.build()
        device = self.args.device
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps or self.args.warmup): self.step()
        synchronize(device)
        self.result['first_steps_s'] = time.perf_counter() - start

    def timed_round(self, steps=None):
        device, steps = self.args.device, steps or self.args.steps
        if device.type == 'cuda':
            synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps): self.step()
        synchronize(device)
        self.rates.append(self.bs * steps / (time.perf_counter() - start))
        if device.type == 'cuda':
            own = state_bytes(self.model, self.opt)
            self.result['peak_gib'] = (torch.cuda.max_memory_allocated(device) - baseline + own) / 2**30

    def free(self):
        for name in ('model', 'opt', 'forward', 'images', 'text'): self.__dict__.pop(name, None)
        if self.args.device.type == 'cuda': torch.cuda.empty_cache()

    def summary(self):
        out = dict(name=self.name, library=self.library, arch=self.arch, bs=self.bs, compiled=self.compiled,
                   checkpointing=self.checkpointing, **self.result)
        if self.error: return out | dict(error=self.error)
        rate = max(self.rates) if self.rates else float('nan')
        flops = rate * self.flops_per_sample
        peak = self.args.peak
        return out | dict(params_m=self.params / 1e6, samples_per_s=rate, tflop_per_s=flops / 1e12,
                          mfu=flops / peak if peak else None, gflop_per_sample=self.flops_per_sample / 1e9)

def error_text(e):
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:160]

def guarded(row, f):
    "Run `f()` for `row`; on an error, record it in the row and free its memory"
    if row.error: return
    try: f()
    except Exception as e:
        row.error = error_text(e)
        if row.args.verbose: traceback.print_exc()
        row.free()

def out_of_time(args): return time.perf_counter() - args.start > args.budget

def largest_batch(library, arch, args):
    "The largest batch, doubling from `args.bs`, at which a checkpointed training step fits; its row"
    best, bs = None, args.bs
    while bs <= args.max_bs and not out_of_time(args):
        row = Row(f'{library} checkpointed', library, arch, bs, args, checkpointing=True)
        guarded(row, partial(row.warm_up, steps=1))
        guarded(row, partial(row.timed_round, steps=min(args.steps, 3)))
        row.free()
        if row.error: break
        best, bs = row, bs * 2
    if best is None:
        best = Row(f'{library} checkpointed', library, arch, args.bs, args, checkpointing=True)
        best.error = row.error if row.error else 'not run: out of time'
    elif row is not best: best.result['next_batch'] = f"{row.bs}: {row.error or 'not run'}"
    return best

def optimizer_check(args):
    "Milliseconds of one optimizer step on ViT-B/16's (or the tiny model's) parameters: fastai's Adam, torch's AdamW"
    from clip_fastai.train import clip_optimizer
    model = our_model('tiny-vit' if args.cpu else 'ViT-B/16', args.cpu).to(args.device)
    params = list(model.parameters())
    for p in params: p.grad = torch.randn_like(p) * 1e-3
    hyper = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    optimizers = {'fastai Adam': lambda: clip_optimizer(params, lr=1e-4),
                  'torch AdamW foreach': lambda: torch.optim.AdamW(params, foreach=True, **hyper),
                  'torch AdamW fused': lambda: torch.optim.AdamW(params, fused=True, **hyper)}
    results = {}
    for name, make in optimizers.items():
        try:
            opt = make()
            for _ in range(2): opt.step()
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps): opt.step()
            synchronize(args.device)
            results[name] = 1e3 * (time.perf_counter() - start) / args.steps
        except Exception as e: results[name] = error_text(e)
        opt = None
    return results

def attention_check(args):
    "Which kernel `scaled_dot_product_attention` runs in our training step, and whether the flash kernel alone accepts it"
    from torch.profiler import profile, ProfilerActivity
    from torch.nn.attention import sdpa_kernel, SDPBackend
    row = Row('attention', 'clip_fastai', args.archs[0], min(args.bs, 32), args)
    row.build()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        row.step()
        synchronize(args.device)
    names = {e.key for e in prof.key_averages()}
    words = ('flash', 'fmha', 'efficient_attention', 'cudnn_attention', 'scaled_dot_product', 'attention')
    kernels = sorted(n for n in names if any(w in n.lower() for w in words))
    results = {'kernels': kernels[:12]}
    for backend in ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION', 'MATH'):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)): row.step()
            synchronize(args.device)
            results[backend] = 'runs'
        except Exception as e: results[backend] = error_text(e)
    row.free()
    return results

def sync_check(args):
    "Whether a training step makes the host wait for the GPU: `set_sync_debug_mode('error')` names the first wait"
    if args.device.type != 'cuda': return 'no GPU: not checked'
    results = {}
    for name, kwargs in {'eager': {}, 'eager, padded captions': dict(trim=False), 'compiled': dict(compiled=True)}.items():
        row = Row(name, 'clip_fastai', args.archs[0], min(args.bs, 32), args, **kwargs)
        try:
            row.warm_up()
            torch.cuda.set_sync_debug_mode('error')
            try: row.step(); results[name] = 'no synchronisation'
            finally: torch.cuda.set_sync_debug_mode(0)
        except Exception as e: results[name] = error_text(e)
        row.free()
    return results

def format_table(rows):
    columns = [('name', 27, '{}'), ('arch', 11, '{}'), ('bs', 6, '{}'), ('samples_per_s', 10, '{:.1f}'),
               ('mfu', 6, '{:.1%}'), ('tflop_per_s', 8, '{:.1f}'), ('peak_gib', 8, '{:.2f}'), ('first_steps_s', 8, '{:.1f}'),
               ('params_m', 8, '{:.1f}')]
    titles = {'samples_per_s': 'samples/s', 'tflop_per_s': 'TFLOP/s', 'peak_gib': 'peak GiB', 'first_steps_s': 'warm-up s',
              'params_m': 'params M'}
    lines = [' '.join(f"{titles.get(c, c):>{w}}" if i else f"{titles.get(c, c):<{w}}" for i, (c, w, _) in enumerate(columns))]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['name']:<27} {r['arch']:>11} {r['bs']:>6} error: {r['error']}")
            continue
        cells = []
        for i, (c, w, fmt) in enumerate(columns):
            v = r.get(c)
            text = '-' if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
            cells.append(f"{text:<{w}}" if i == 0 else f"{text:>{w}}")
        lines.append(' '.join(cells))
    return '\n'.join(lines)

def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='ViT-B/16 only, fewer steps: about 2 minutes on one GPU')
    parser.add_argument('--cpu', action='store_true', help='tiny models at batch 8 on the CPU (the default without a GPU)')
    parser.add_argument('--archs', nargs='+', help='configurations of clip_configs (default ViT-B/32 ViT-B/16 RN50)')
    parser.add_argument('--bs', type=int, help='batch size (default 256; 8 on the CPU)')
    parser.add_argument('--steps', type=int, help='steps per timed round (default 10; 5 quick; 2 on the CPU)')
    parser.add_argument('--rounds', type=int, help='interleaved timed rounds (default 3; 2 quick; 1 on the CPU)')
    parser.add_argument('--max-bs', type=int, default=8192, help='largest batch tried with gradient checkpointing')
    parser.add_argument('--peak', type=float, help='peak FLOP/s of the device (default from the datasheet table)')
    parser.add_argument('--no-compile', action='store_true', help='leave out the torch.compile rows')
    parser.add_argument('--budget', type=float, help='seconds after which no new row starts (default 420; 90 quick; 60 CPU)')
    parser.add_argument('--json', default='gpu_results.json', help='file for the results (default gpu_results.json)')
    parser.add_argument('--verbose', action='store_true', help="print each failing row's traceback")
    args = parser.parse_args(argv)
    args.cpu = args.cpu or not torch.cuda.is_available()
    args.device = torch.device('cpu' if args.cpu else 'cuda')
    cpu, quick = args.cpu, args.quick and not args.cpu
    args.archs = args.archs or (['tiny-vit', 'tiny-resnet'] if cpu else ['ViT-B/16'] if quick else ['ViT-B/32', 'ViT-B/16', 'RN50'])
    args.bs = args.bs or (8 if cpu else 256)
    args.steps = args.steps or (2 if cpu else 5 if quick else 10)
    args.rounds = args.rounds or (1 if cpu else 2 if quick else 3)
    args.warmup = 1 if cpu else 3
    args.budget = args.budget or (60 if cpu else 90 if quick else 420)
    args.max_bs = args.bs if cpu else min(args.max_bs, 2 * args.bs) if quick else args.max_bs  # CPU: one checkpointed try
    args.bf16 = not cpu  # bf16 autocast on the CPU is slower than float32, and the CPU run only checks the script
    from clip_fastai.throughput import peak_flops
    args.peak = args.peak or peak_flops(args.device, 'bf16' if args.bf16 else 'fp32')
    args.compile = not args.no_compile and not cpu  # CPU inductor takes minutes per model: tests/test_compile.py covers it
    return args

def main(argv=None):
    args = parse(argv)
    args.start = time.perf_counter()
    device_name = torch.cuda.get_device_name() if args.device.type == 'cuda' else 'CPU'
    print(f"{device_name}, torch {torch.__version__}, bs {args.bs}, {args.rounds} rounds of {args.steps} steps, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, peak {args.peak / 1e12 if args.peak else float('nan'):.1f} TFLOP/s",
          flush=True)
    rows = []  # eager rows first, then the compiled ones (a minute of compilation each), as time allows
    for arch in args.archs:
        rows += [Row('clip_fastai', 'clip_fastai', arch, args.bs, args), Row('open_clip', 'open_clip', arch, args.bs, args),
                 Row('clip_fastai padded captions', 'clip_fastai', arch, args.bs, args, trim=False)]
    for arch in args.archs * args.compile:
        rows.append(Row('clip_fastai compiled', 'clip_fastai', arch, args.bs, args, compiled=True))
        if not args.quick: rows.append(Row('open_clip compiled', 'open_clip', arch, args.bs, args, compiled=True))
    # every row keeps its model on the GPU, so the rounds interleave; a row out of memory is freed and reported
    for row in rows:
        if out_of_time(args): row.error = row.error or 'not run: out of time'
        guarded(row, row.warm_up)
    for _ in range(args.rounds):
        for row in rows:
            if not out_of_time(args) or not row.rates: guarded(row, row.timed_round)
    for row in rows: row.free()
    results = [row.summary() for row in rows]
    for arch in args.archs:
        for library in ('clip_fastai', 'open_clip'):
            if out_of_time(args): break
            results.append(largest_batch(library, arch, args).summary())
    checks = {}
    for name, check in (('optimizer_step_ms', optimizer_check), ('attention', attention_check), ('host_syncs', sync_check)):
        try: checks[name] = check(args)
        except Exception as e: checks[name] = error_text(e)
    print(format_table(results))
    for name, value in checks.items(): print(f"{name}: {json.dumps(value, indent=1) if isinstance(value, dict) else value}")
    seconds = time.perf_counter() - args.start
    print(f"{seconds:.0f} s")
    report = dict(device=device_name, date=datetime.now(timezone.utc).isoformat(timespec='seconds'), torch=torch.__version__,
                  seconds=seconds, settings={k: v for k, v in vars(args).items() if k not in ('device', 'start')},
                  rows=results, checks=checks)
    with open(args.json, 'w') as f: json.dump(report, f, indent=1, default=str)
    return report

if __name__ == '__main__': main()
