"""Multi-process CLIP training on CPU: step time at the same global batch for 1 vs 2 processes, the share of the
step spent gathering features, and what the gathered loss does to convergence on the digits.

    python bench/distributed.py [--global-bs 128] [--steps 20] [--repeats 3] [--epochs 12] [--lr 3e-3] [--seeds 3] [--parts speed,digits]

Part 1 ('speed') trains the tiny ViT on random images and captions for `--steps` steps with a global batch
of `--global-bs` rows: one process with 2 and with 1 thread, then 2 processes (torchrun, gloo) with 1 thread
each, with `CLIPTrainer` under plain DDP (each process contrasts its own rows), `DistributedCLIPTrainer` and
`DistributedCLIPTrainer(local_loss=True)`. The gather's time is measured by timing its collectives.
Part 2 ('digits') trains on the digits in 2 processes of 32 rows with `CLIPTrainer` (plain DDP) and
`DistributedCLIPTrainer`, from `--seeds` seeds, and evaluates every model in one process on the validation
set (loss at batch 64, R@1 both ways). Every number comes from this one
run; other load on the machine shows up in the times."""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

here = Path(__file__).resolve()
bin_dir = Path(sys.executable).parent

# ---- runs inside each process ----

def timed(function, totals, key):
    "`function`, adding its wall time to `totals[key]`"
    def run(*args, **kwargs):
        start = time.perf_counter()
        try: return function(*args, **kwargs)
        finally: totals[key] = totals.get(key, 0.) + time.perf_counter() - start
    return run

def speed_worker(trainer_name, global_bs, steps, threads, out):
    import torch
    from fastai.callback.core import Callback, CancelValidException
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.torch_core import num_distrib, rank_distrib
    import fastai.distributed
    from clip_fastai.model import CLIP
    from clip_fastai.data import TensorMatchId
    from clip_fastai.train import clip_learner
    import clip_fastai.distributed as distributed
    processes = max(1, num_distrib())
    torch.set_num_threads(threads)
    # what the gathered loss spends in communication: the row counts, the features, and the gradients' all-reduce
    totals = {}
    distributed.gather_sizes = timed(distributed.gather_sizes, totals, 'gather')
    for name in ('forward', 'backward'):
        setattr(distributed.GatherWithGrad, name, staticmethod(timed(getattr(distributed.GatherWithGrad, name), totals, 'gather')))
    class StepTimes(Callback):
        order = 99
        def before_fit(self): self.times = []
        def before_batch(self): self.start = time.perf_counter()
        def after_step(self): self.times.append(time.perf_counter() - self.start)
        def before_validate(self): raise CancelValidException()
    bs = global_bs // processes
    g = torch.Generator().manual_seed(0)
    n = bs * processes * (steps + 3)
    tokens = torch.randint(1, 999, (n, 32), generator=g); tokens[:, 20:] = 0; tokens[:, 19] = 999
    items = [(torch.randn(3, 32, 32, generator=g), tokens[i], TensorMatchId(torch.tensor(i))) for i in range(n)]
    dls = DataLoaders(TfmdDL(items, bs=bs, shuffle=True, drop_last=True), TfmdDL(items[:bs], bs=bs), device='cpu')
    torch.manual_seed(0)
    learn = clip_learner(dls, CLIP.from_config('tiny-vit', image_size=32, context_length=32, vocab_size=1000), cbs=[StepTimes()])
    if trainer_name != 'CLIPTrainer':
        learn.remove_cb(learn.clip_trainer).add_cb(distributed.DistributedCLIPTrainer(local_loss=trainer_name.endswith('local')))
    with learn.no_bar(), learn.no_logging():
        if processes > 1:
            with learn.distrib_ctx(cpu=True): learn.fit(1, 1e-3)
        else: learn.fit(1, 1e-3)
    times = learn.step_times.times[3:]  # the first steps warm up
    if rank_distrib() == 0:
        Path(out).write_text(json.dumps({'step': float(np.median(times)), 'mean_step': float(np.mean(times)),
                                         'gather': totals.get('gather', 0.) / len(learn.step_times.times)}))

def convergence_worker(trainer_name, epochs, lr, seed, out):
    import torch
    from fastai.torch_core import num_distrib, rank_distrib, set_seed
    import fastai.distributed
    from fastai.callback.schedule import fit_one_cycle
    from clip_fastai.tokenizer import ClipTokenizer
    from clip_fastai.model import CLIP
    from clip_fastai.data import CaptionDataLoaders, make_digits_folder, digit_descriptions
    from clip_fastai.train import clip_learner, unwrap_model
    from clip_fastai.distributed import DistributedCLIPTrainer
    processes = max(1, num_distrib())
    torch.set_num_threads(1)
    folder = Path(tempfile.gettempdir())/'clip_fastai_bench_digits'
    tok = ClipTokenizer(context_length=16)
    dls = CaptionDataLoaders.from_folder(folder, digit_descriptions(), tokenizer=tok, image_size=32, bs=64 // processes, num_workers=0)
    set_seed(seed)
    learn = clip_learner(dls, CLIP.from_config('tiny-vit', image_size=32, context_length=tok.context_length, vocab_size=tok.vocab_size))
    if trainer_name != 'CLIPTrainer': learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer())
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        if processes > 1:
            with learn.distrib_ctx(cpu=True): learn.fit_one_cycle(epochs, lr)
        else: learn.fit_one_cycle(epochs, lr)
    if rank_distrib() == 0:
        torch.save(unwrap_model(learn.model).state_dict(), out)
        Path(str(out) + '.json').write_text(json.dumps({'seconds': time.perf_counter() - start, 'steps': len(learn.recorder.losses)}))

def evaluate(state_dict_path):
    "Validation loss at batch 64 and R@1 of a saved model, in one process"
    import torch
    from clip_fastai.tokenizer import ClipTokenizer
    from clip_fastai.model import CLIP
    from clip_fastai.data import CaptionDataLoaders, digit_descriptions
    from clip_fastai.train import clip_learner
    from clip_fastai.metrics import RetrievalAtK
    import fastai.callback.progress  # `Learner.no_bar`
    tok = ClipTokenizer(context_length=16)
    folder = Path(tempfile.gettempdir())/'clip_fastai_bench_digits'
    dls = CaptionDataLoaders.from_folder(folder, digit_descriptions(), tokenizer=tok, image_size=32, bs=64, num_workers=0)
    learn = clip_learner(dls, CLIP.from_state_dict(torch.load(state_dict_path)), metrics=[RetrievalAtK(1), RetrievalAtK(1, direction='t2i')])
    with learn.no_bar(), learn.no_logging(): loss, image_to_text, text_to_image = learn.validate()
    return {'valid_loss': loss, 'i2t': image_to_text, 't2i': text_to_image}

# ---- the orchestrator ----

def run(processes, threads, *worker_args):
    command = [sys.executable, str(here), '--worker', *map(str, worker_args)]
    if processes > 1: command = [str(bin_dir/'torchrun'), '--standalone', '--nproc_per_node', str(processes), *command[1:]]
    result = subprocess.run(command, env={**os.environ, 'OMP_NUM_THREADS': str(threads)}, capture_output=True, text=True)
    if result.returncode != 0: raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--global-bs', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--parts', default='speed,digits', help="which tables: 'speed', 'digits' or both")
    parser.add_argument('--worker', nargs='+')
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == 'speed': speed_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        else: convergence_worker(rest[0], int(rest[1]), float(rest[2]), int(rest[3]), rest[4])
        return
    tmp = Path(tempfile.mkdtemp())
    if 'speed' in args.parts: speed_table(args, tmp)
    if 'digits' in args.parts: digits_table(args, tmp)

def speed_table(args, tmp):
    print(f"Step time of the tiny ViT at a global batch of {args.global_bs} on {os.cpu_count()} CPU cores: median of {args.steps - 3} steps,\n"
          f"best of {args.repeats} interleaved runs (other load on the machine only ever adds time); ratio to the first row;\n"
          "time per step inside the gather (its collectives, waiting for the other process included)\n")
    setups = [(1, 2, 'CLIPTrainer'), (1, 1, 'CLIPTrainer'), (2, 1, 'CLIPTrainer'),
              (2, 1, 'DistributedCLIPTrainer'), (2, 1, 'DistributedCLIPTrainer-local')]
    runs = {setup: [] for setup in setups}
    for repeat in range(args.repeats):
        for processes, threads, trainer in setups:
            out = tmp/f'speed-{processes}-{threads}-{trainer}-{repeat}.json'
            run(processes, threads, 'speed', trainer, args.global_bs, args.steps, threads, out)
            runs[processes, threads, trainer].append(json.loads(out.read_text()))
    print(f"{'setup':<66}{'step ms':>9}{'ratio':>8}{'gather ms':>11}{'gather share':>14}")
    base = None
    for (processes, threads, trainer), results in runs.items():
        r = min(results, key=lambda r: r['step'])
        base = base or r['step']
        label = (f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}, "
                 f"{trainer.replace('-local', '(local_loss=True)')}")
        print(f"{label:<66}{r['step']*1000:>9.1f}{r['step']/base:>7.2f}x{r['gather']*1000:>11.1f}{r['gather']/r['step']:>13.1%}")

def digits_table(args, tmp):
    print(f"\nDigits, 2 processes of 32 rows, {args.epochs} epochs of fit_one_cycle(lr={args.lr}), seeds 0-{args.seeds - 1}; every model\n"
          "evaluated in one process: validation loss at batch 64, and R@1 with the validation captions 'a handwritten digit <name>',\n"
          "any image or caption of the right class counting as correct (for images, a zero-shot classifier's accuracy)\n")
    from clip_fastai.data import make_digits_folder
    make_digits_folder(Path(tempfile.gettempdir())/'clip_fastai_bench_digits')
    print(f"{'trainer':<50}{'seed':>5}{'seconds':>9}{'valid loss':>12}{'i2t R@1':>9}{'t2i R@1':>9}")
    results = {}
    for seed in range(args.seeds):
        for trainer in ('CLIPTrainer', 'DistributedCLIPTrainer'):
            out = tmp/f'digits-{trainer}-{seed}.pth'
            run(2, 1, 'convergence', trainer, args.epochs, args.lr, seed, out)
            timing, quality = json.loads(Path(str(out) + '.json').read_text()), evaluate(out)
            results.setdefault(trainer, []).append([timing['seconds'], quality['valid_loss'], quality['i2t'], quality['t2i']])
            label = trainer + (' (contrasts 32 rows)' if trainer == 'CLIPTrainer' else ' (contrasts 64 rows)')
            print(f"{label:<50}{seed:>5}{timing['seconds']:>9.1f}{quality['valid_loss']:>12.3f}{quality['i2t']:>9.3f}{quality['t2i']:>9.3f}")
    print()
    for trainer, rows in results.items():
        mean = np.mean(rows, axis=0)
        print(f"{trainer + ', mean':<50}{'':>5}{mean[0]:>9.1f}{mean[1]:>12.3f}{mean[2]:>9.3f}{mean[3]:>9.3f}")
    ratio = np.mean(results['DistributedCLIPTrainer'], axis=0) / np.mean(results['CLIPTrainer'], axis=0)
    print(f"{'DistributedCLIPTrainer / CLIPTrainer':<50}{'':>5}{ratio[0]:>8.2f}x{ratio[1]:>11.2f}x{ratio[2]:>8.2f}x{ratio[3]:>8.2f}x")

if __name__ == '__main__': main()
