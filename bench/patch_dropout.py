"""Training step time of a ViT-B/16 CLIP with FLIP's patch dropout at 0.5 against none, on the CPU.

    OMP_NUM_THREADS=1 python bench/patch_dropout.py [--bs 4] [--rounds 3] [--threads 1]

One step is what `CLIPTrainer` does per batch: the forward pass of both towers, the contrastive loss, the backward
pass and an AdamW step, on random 224-pixel images and 77-token captions. The two settings (one model, its
`PatchDropout` switched) take turns, one step each per round after a warm-up step each, so that a change in the machine's load falls on both; the table
gives the median and the best step of each, and how the image tower alone compares (forward and backward of
`encode_image`)."""
import argparse, statistics, time
import torch
from clip_fastai.model import CLIP
from clip_fastai.train import contrastive_loss

def step_time(model, opt, images, texts) -> float:
    start = time.perf_counter()
    loss = contrastive_loss(*model(images, texts))
    loss.backward()
    opt.step(); opt.zero_grad()
    return time.perf_counter() - start

def image_tower_time(model, images) -> float:
    start = time.perf_counter()
    model.encode_image(images).sum().backward()
    model.zero_grad()
    return time.perf_counter() - start

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bs', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CLIP.from_config('ViT-B/16', patch_dropout=0.5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    def with_dropout(p):  # one model, so that both settings step the same weights in the same memory
        model.visual.patch_dropout.prob = p
        return model
    rates = (0., 0.5)
    images = torch.randn(args.bs, 3, 224, 224)
    texts = torch.randint(1, 49407, (args.bs, 77)); texts[:, 20] = 49407  # captions of 20 tokens, then end-of-text
    steps, towers = {p: [] for p in rates}, {p: [] for p in rates}
    for p in rates: step_time(with_dropout(p), opt, images, texts)  # warm-up
    for _ in range(args.rounds):
        for p in rates:
            steps[p].append(step_time(with_dropout(p), opt, images, texts))
            towers[p].append(image_tower_time(with_dropout(p), images))
    print(f"ViT-B/16 CLIP, batch {args.bs}, {args.rounds} interleaved rounds, {args.threads} thread(s), torch {torch.__version__}\n")
    print('| patch dropout | image tokens | step, median | step, best | image tower fwd+bwd, median | step ratio |')
    print('|---|---|---|---|---|---|')
    base = statistics.median(steps[0.])
    for p in rates:
        tokens = 1 + int(196 * (1 - p))
        print(f"| {p} | {tokens} | {statistics.median(steps[p]):.2f} s | {min(steps[p]):.2f} s | "
              f"{statistics.median(towers[p]):.2f} s | {statistics.median(steps[p]) / base:.2f} |")

if __name__ == '__main__': main()
