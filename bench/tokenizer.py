"""Captions per second of `ClipTokenizer` and of open_clip's `SimpleTokenizer` on the same 50,000 captions.

Run: python bench/tokenizer.py  (prints one table; both tokenizers start with empty caches)"""
import os, random, time
import torch
from open_clip.tokenizer import SimpleTokenizer
from clip_fastai.tokenizer import ClipTokenizer

SUBJECTS = ['man', 'woman', 'child', 'dog', 'cat', 'horse', 'group of people', 'bird', 'elephant', 'giraffe', 'bus',
            'train', 'plate of food', 'bowl of fruit', 'skateboarder', 'surfer', 'tennis player', 'pizza', 'laptop',
            'teddy bear', 'motorcycle', 'boat', 'kite', 'clock tower', 'fire hydrant', 'zebra', 'sheep', 'cow']
ADJECTIVES = ['young', 'old', 'small', 'large', 'brown', 'white', 'black', 'red', 'blue', 'happy', 'wooden', 'fluffy',
              'colorful', 'empty', 'crowded', 'tall', 'little', 'shiny', 'wet', 'striped']
ACTIONS = ['sitting', 'standing', 'walking', 'running', 'riding a bike', 'holding an umbrella', 'eating a sandwich',
           'looking at the camera', 'playing frisbee', 'lying down', 'jumping', 'waiting', 'parked', 'flying a kite']
PLACES = ['on a bench', 'in a park', 'next to a building', 'on the beach', 'in a kitchen', 'on a city street',
          'in a field', 'near the water', 'under a tree', 'in front of a store', 'on a snowy hill', 'at the airport',
          "in the living room", 'by the window', 'on top of a table', 'at sunset']
TEMPLATES = ['A {adj} {subject} {action} {place}.', 'a {subject} {action} {place}', 'The {adj} {subject} is {action} {place}.',
             'Two {subject}s {action} {place}.', 'A close up of a {adj} {subject} {place}', '{adj} {subject}, {action}',
             "A photo of a {subject} that's {action} {place}.", 'There is a {adj} {subject} {place} in {year}.']
# A few percent of web captions carry accents, emoji, CJK or HTML entities: they take the slow (ftfy) path
EXTRAS = [' café', ' ❤️', ' 🐶🐶', ' &amp; friends', ' in Zürich', ' — naïve art', ' 東京', ' &quot;wow&quot;', ' São Paulo']

def make_captions(n=50_000, seed=0):
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        text = rng.choice(TEMPLATES).format(adj=rng.choice(ADJECTIVES), subject=rng.choice(SUBJECTS),
                                            action=rng.choice(ACTIONS), place=rng.choice(PLACES), year=rng.randint(1950, 2024))
        if rng.random() < 0.05: text += rng.choice(EXTRAS)
        captions.append(text)
    return captions

def timed(f):
    "Result of `f()`, wall-clock seconds and CPU seconds of this process (less sensitive to a busy machine)"
    start, start_cpu = time.perf_counter(), time.process_time()
    result = f()
    return result, (time.perf_counter() - start, time.process_time() - start_cpu)

if __name__ == '__main__':
    captions = make_captions()
    theirs, ours = SimpleTokenizer(), ClipTokenizer()
    theirs_cold, t_theirs_cold = timed(lambda: theirs(captions, context_length=77))
    theirs_warm, t_theirs_warm = timed(lambda: theirs(captions, context_length=77))
    ours_cold, t_ours_cold = timed(lambda: ours(captions))
    ours_warm, t_ours_warm = timed(lambda: ours(captions))
    identical = all(torch.equal(a, theirs_cold) for a in (theirs_warm, ours_cold, ours_warm))
    fast = sum(c.isascii() and c.isprintable() and '&' not in c for c in captions)
    print(f"{len(captions):,} captions, {fast/len(captions):.0%} on the ASCII fast path, context_length=77, {os.cpu_count()} CPUs")
    print(f"| tokenizer | pass | wall s | CPU s | captions/s | speed-up |")
    print(f"|---|---|---:|---:|---:|---:|")
    rows = [('open_clip `SimpleTokenizer`', 'cold', t_theirs_cold, t_theirs_cold), ('open_clip `SimpleTokenizer`', 'warm', t_theirs_warm, t_theirs_warm),
            ('clip_fastai `ClipTokenizer`', 'cold', t_ours_cold, t_theirs_cold), ('clip_fastai `ClipTokenizer`', 'warm', t_ours_warm, t_theirs_warm)]
    for name, pass_, (wall, cpu), (reference_wall, _) in rows:
        print(f"| {name} | {pass_} | {wall:.2f} | {cpu:.2f} | {len(captions)/wall:,.0f} | {reference_wall/wall:.1f}x |")
    print(f"identical output: {identical}")
    assert identical
