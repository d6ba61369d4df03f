"""Training step of clip_fastai's `CLIP` against open-clip-torch's, and with gradient checkpointing, on this CPU.

For ViT-B/32 and RN50 at 224px, one run compares four configurations side by side at the same batch:
clip_fastai, open-clip-torch (`open_clip.create_model('ViT-B-32')` / `('RN50')`, random weights, same sizes),
clip_fastai with gradient checkpointing (one chunk per residual block), and clip_fastai on captions
without padding.

- Captions: real ones tokenized to 77 tokens (a dozen tokens each, then padding), as in training. Our text
  tower drops the padding after the last end-of-text token (causal attention makes it irrelevant), so
  the row "77-token captions" feeds our model captions without padding: its per-token speed, like for like
  (open_clip's time does not depend on the captions: it always runs all 77 tokens).
- Step time: forward, symmetric contrastive loss, backward, `AdamW.step`, `zero_grad`. Both models of an
  architecture live in one process (the checkpointing and 77-token rows reuse ours) and all rows are timed
  in interleaved rounds after a warm-up round, so a change in the machine's load hits them alike; the table shows the fastest round of each, in wall-clock
  time and in CPU time of the process, which other programs on a shared machine disturb less (OpenMP's
  idle threads are told to sleep, `OMP_WAIT_POLICY=PASSIVE`, so that waiting is not counted as work).
- Peak activation memory: each configuration runs in a fresh process, which first holds everything a
  training step keeps between steps (weights, gradients, AdamW state: a warm-up step at batch 1 allocates
  them) and then runs forward and backward at the full batch. The peak resident set size of the process
  during that forward and backward (Linux's `VmHWM`, reset just before through `/proc/self/clear_refs`)
  minus its resident size just before is the memory of activations and backward temporaries; the
  optimizer step, the same for all, is left out. glibc's malloc is told to map every allocation over
  64 KiB separately (`MALLOC_MMAP_THRESHOLD_`), so that freed tensors leave the resident set.

Run: `python bench/model.py [--bs 8] [--threads 2] [--rounds 3]` (about 5 to 10 minutes on 2 cores)."""
import argparse, json, os, subprocess, sys, time
# idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting for a descheduled thread
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import torch
import torch.nn.functional as F

captions = ["a photo of a cat sitting on a wooden table", "two dogs running on the beach at sunset",
            "a red double-decker bus driving down a city street", "a bowl of fruit with apples and bananas",
            "a man riding a bicycle past a row of shops", "an aerial view of a river winding through a forest",
            "a plate of pasta with tomato sauce and basil", "a small boat on a calm lake under a cloudy sky",
            "children playing football in a park", "a close-up of a sunflower in a field",
            "a kitchen with white cabinets and a window", "a train crossing a bridge over a valley",
            "a woman reading a book on a bench", "a snowy mountain behind a wooden cabin",
            "a laptop and a cup of coffee on a desk", "a herd of cows grazing in a green meadow"]

def make_model(arch, library, grad_checkpointing=False):
    if library == 'open_clip':
        import open_clip
        return open_clip.create_model({'ViT-B/32': 'ViT-B-32', 'RN50': 'RN50'}[arch])
    from clip_fastai.model import CLIP
    return CLIP.from_config(arch, grad_checkpointing=grad_checkpointing)

def make_batch(bs, full_captions=False, seed=0):
    "Random images and tokenized captions; with `full_captions`, their padding replaced by words (77 tokens each)"
    import open_clip
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(bs, 3, 224, 224, generator=generator)
    text = open_clip.tokenize([captions[i % len(captions)] for i in range(bs)])  # [bs, 77], OpenAI's BPE
    if full_captions:
        text = torch.where(text == 0, torch.randint(1, 49406, text.shape, generator=generator), text)
        text[text == 49407] = 320  # an ordinary word
        text[:, -1] = 49407  # end-of-text at the last position
    return image, text

class TrainingStep:
    "One contrastive training step of `model` with AdamW"
    def __init__(self, model):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def forward_backward(self, image, text):
        image_features, text_features, logit_scale = self.model(image, text)
        logits = logit_scale * image_features @ text_features.t()
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        return loss.item()

    def update(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as state kept between steps

    def __call__(self, image, text):
        loss = self.forward_backward(image, text)
        self.update()
        return loss

configurations = {  # name: (library, checkpointing, captions without padding)
    'clip_fastai': ('clip_fastai', False, False),
    'open_clip': ('open_clip', False, False),
    'clip_fastai + checkpointing': ('clip_fastai', True, False),
    'clip_fastai, 77-token captions': ('clip_fastai', False, True),
}

def memory_status(field):
    "`VmRSS` (resident now) or `VmHWM` (peak resident since the last reset) of this process, in bytes"
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))

def reset_peak_memory():
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # Linux: peak resident size := current

def measure_memory(arch, name, bs, threads):
    "Run in a fresh process: peak memory increase of a full-batch forward and backward over the state kept between steps"
    torch.set_num_threads(threads)
    library, checkpoint, full_captions = configurations[name]
    torch.manual_seed(0)
    step = TrainingStep(make_model(arch, library, checkpoint))
    step(*make_batch(1, full_captions))  # allocates gradients and AdamW state; initialises the kernels
    image, text = make_batch(bs, full_captions)
    reset_peak_memory()
    before = memory_status('VmRSS')
    step.forward_backward(image, text)
    return memory_status('VmHWM') - before

def memory_in_fresh_process(arch, name, bs, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')
    out = subprocess.run([sys.executable, __file__, '--memory', arch, name, '--bs', str(bs), '--threads', str(threads)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])['bytes']

def time_steps(arch, bs, threads, rounds):
    "Fastest of `rounds` interleaved training steps of every configuration: wall-clock and process CPU seconds"
    torch.set_num_threads(threads)
    models = {library: make_model(arch, library) for library in ('clip_fastai', 'open_clip')}
    steps = {library: TrainingStep(model) for library, model in models.items()}
    batches = {full: make_batch(bs, full) for full in (False, True)}
    times = {name: [] for name in configurations}
    for round in range(rounds + 1):  # round 0 is the warm-up
        for name, (library, checkpoint, full_captions) in configurations.items():
            models[library].set_grad_checkpointing(checkpoint)  # the same clip_fastai model, switched
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[library](*batches[full_captions])
            if round: times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
            print(f"{arch} {name} round {round}: {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)
    return {name: (min(w for w, c in t), min(c for w, c in t)) for name, t in times.items()}

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--bs', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--arch', nargs='+', default=['ViT-B/32', 'RN50'])
    parser.add_argument('--memory', nargs=2, metavar=('ARCH', 'CONFIGURATION'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(dict(bytes=measure_memory(*args.memory, args.bs, args.threads))))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.bs} at 224px, "
          f"fastest of {args.rounds} interleaved steps; memory: peak RSS increase during forward+backward, fresh process each")
    rows = []
    for arch in args.arch:
        seconds = time_steps(arch, args.bs, args.threads, args.rounds)
        memory = {name: memory_in_fresh_process(arch, name, args.bs, args.threads) for name in configurations}
        rows += [(arch, name, *seconds[name], memory[name] / 2**20) for name in configurations]
    print("| model | configuration | step (s) | vs open_clip | vs plain | CPU time (s) | vs open_clip | vs plain "
          "| activation memory (MiB) | vs open_clip | vs plain |")
    print('|' + '---|' * 11)
    for arch, name, *values in rows:
        reference = {n: v for a, n, *v in rows if a == arch}
        cells = [f"{arch} | {name}"]
        for i, unit in enumerate(('.2f', '.2f', '.0f')):
            cells.append(f"{values[i]:{unit}} | {values[i] / reference['open_clip'][i]:.2f}x | "
                         f"{values[i] / reference['clip_fastai'][i]:.2f}x")
        print('| ' + ' | '.join(cells) + ' |')

if __name__ == '__main__': main()
