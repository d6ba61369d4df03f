"""Tests of `clip_fastai.shards` that need several processes, damaged files or many epochs.

Run as a script, this file is also the worker that torchrun and accelerate start: `python tests/test_shards.py
SCENARIO SHARDS OUT` builds `CaptionDataLoaders.from_shards` over the shards in SHARDS and saves what it saw in
OUT/SCENARIO.rank{R}.pt. The references are computed here independently: the sample keys read with `tarfile`, and
the match ids hashed from them with `hashlib`."""
import hashlib, io, json, os, socket, subprocess, sys, tarfile, textwrap, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
environment = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore::FutureWarning'}
SHARD_SIZES = [7, 3, 12, 1, 9, 5]  # 37 training samples in uneven shards
BS = 3

# data

def make_images(folder:Path, n:int, seed:int=0) -> list:
    "`n` random 20×24 PNG files in `folder`"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = [folder/f'{i:03d}.png' for i in range(n)]
    for f in files: Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(f)
    return files

def make_shards(folder:Path, sizes=SHARD_SIZES, seed:int=0, captions_per_sample:int=2) -> str:
    "Shards of the given sizes (one `write_shards` call per shard, all listed in one sizes.json); their brace pattern"
    from clip_fastai.shards import write_shards
    files = make_images(folder/'images', sum(sizes), seed)
    start = 0
    for k, n in enumerate(sizes):
        table = pd.DataFrame({'image': files[start:start + n],
                              'captions': [[f'picture {start + i} caption {c}' for c in range(captions_per_sample)] for i in range(n)]})
        write_shards(table, folder, samples_per_shard=n, prefix=f'part{k}-', start_key=start)
        start += n
    return str(folder/f'part{{0..{len(sizes) - 1}}}-00000.tar')

def tar_keys(pattern_folder:Path, names=None) -> dict:
    "Match id → (shard name, key) of every sample in the tars of a folder, read with `tarfile` and hashed with `hashlib`"
    ids = {}
    for tar in sorted(pattern_folder.glob('*.tar')) if names is None else [pattern_folder/n for n in names]:
        with tarfile.open(tar) as t: keys = sorted({m.name.split('.')[0] for m in t.getmembers()})
        for key in keys:
            digest = hashlib.blake2b(f'{tar.name}/{key}'.encode(), digest_size=8).digest()
            ids[int.from_bytes(digest, 'little') >> 1] = (tar.name, key)
    return ids

# the worker

def worker(scenario:str, shards:str, out:str):
    "Build the DataLoaders in this process (rank from torchrun/accelerate), run `scenario`, save what it saw"
    import torch.distributed as dist
    from fastai.torch_core import rank_distrib, num_distrib
    from clip_fastai.data import CaptionDataLoaders
    from clip_fastai.distributed import unpadded_rows
    import clip_fastai.shards
    pattern = str(Path(shards)/'part{0..5}-00000.tar')
    dls = CaptionDataLoaders.from_shards(pattern, valid=pattern, image_size=16, bs=BS, num_workers=2 if scenario == 'epoch' else 0,
                                         seed=5, device='cpu',
                                         drop_last=scenario != 'epoch')
    record = {'rank': rank_distrib(), 'world': num_distrib(), 'len': [len(dls.train), len(dls.valid)]}
    if scenario == 'epoch':
        dist.init_process_group('gloo')
        for name, dl in (('train', dls.train), ('valid', dls.valid), ('train_next', dls.train)):
            record[name] = []
            for b in dl: record[name].append((b[2].tolist(), unpadded_rows(dl, len(b[2])), tuple(b[0].shape)))
        dist.destroy_process_group()
    elif scenario == 'fit':
        record.update(fit(dls))
    torch.save(record, Path(out)/f'{scenario}.rank{record["rank"]}.pt')

def fit(dls) -> dict:
    "Train a tiny CLIP for 2 epochs with `DistributedCLIPTrainer` and retrieval metrics; the rows of every step"
    from fastai.callback.core import Callback
    from clip_fastai.model import CLIP
    from clip_fastai.train import clip_learner
    from clip_fastai.metrics import RetrievalAtK
    from clip_fastai.distributed import DistributedCLIPTrainer, unpadded_rows
    class Rows(Callback):
        order = 95
        def before_fit(self): self.train, self.valid = [], []
        def after_batch(self):
            rows = (self.yb[0].tolist(), unpadded_rows(self.dl, len(self.yb[0])))
            (self.train if self.training else self.valid).append(rows)
    torch.manual_seed(0)
    model = CLIP.from_config('tiny-vit', image_size=16, context_length=77, vocab_size=49408, transformer_layers=1, vision_layers=1)
    rows = Rows()
    learn = clip_learner(dls, model, trainer=DistributedCLIPTrainer(), metrics=[RetrievalAtK(1)], cbs=[rows])
    with learn.distrib_ctx(cpu=True): learn.fit(2, 1e-3)
    return {'train_rows': rows.train, 'valid_rows': rows.valid, 'metrics': list(learn.recorder.values[-1])}

if __name__ == '__main__':
    warnings.simplefilter('ignore', FutureWarning)
    worker(*sys.argv[1:4])
    sys.exit(0)

# the tests

pytestmark = pytest.mark.xdist_group('distributed')  # one pytest worker: the launches would fight over the CPU cores

@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp('shards')
    return make_shards(folder), folder

def run(command, timeout=300, **kwargs):
    result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result

def real_ids(batches) -> list:
    "The match ids of the real (not padding) rows of recorded batches"
    return [i for ids, real, *_ in batches for i in ids[:real]]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def test_two_processes_two_workers_each_sample_once(shards, tmp_path):
    "2 processes × 2 workers over uneven shards: every sample exactly once per epoch, the same steps in both processes"
    pattern, folder = shards
    run([str(bin_dir/'torchrun'), '--standalone', '--nproc_per_node', '2', __file__, 'epoch', str(folder), str(tmp_path)])
    records = [torch.load(tmp_path/f'epoch.rank{r}.pt') for r in range(2)]
    expected = tar_keys(folder)
    assert len(expected) == sum(SHARD_SIZES)
    for name in ('train', 'valid', 'train_next'):
        n_batches = [len(r[name]) for r in records]
        assert n_batches == [7, 7], (name, n_batches)  # ceil(37 / (2 × 3)): the same number of steps in both processes
        assert all(shape[0] == BS for r in records for *_, shape in r[name]), name  # padded, never short, under DDP
        seen = [expected[i] for r in records for i in real_ids(r[name])]
        assert sorted(seen) == sorted(expected.values()), (name, len(seen))  # each sample exactly once
        padding = [i for r in records for ids, real, _ in r[name] for i in ids[real:]]
        assert len(padding) == 2 * 7 * BS - 37 and set(padding) <= set(expected), padding  # copies of real samples
    orders = [[i for r in records for i in real_ids(r[name])] for name in ('train', 'valid', 'train_next')]
    assert orders[0] != orders[2], "the training order changes from one epoch to the next"

def check_fit(out:Path, folder:Path):
    "Training in 2 processes over uneven shards ran the same steps, trained on distinct samples, and validated on all once"
    records = [torch.load(out/f'fit.rank{r}.pt') for r in range(2)]
    expected = tar_keys(folder)
    full = 37 // (2 * BS)  # drop_last: 6 full global batches per epoch; the 1 left over starts the next epoch
    assert [len(r['train_rows']) for r in records] == [2 * full] * 2  # 2 epochs
    epochs = [[i for r in records for i in real_ids(r['train_rows'][e * full:(e + 1) * full])] for e in range(2)]
    assert len(set(epochs[0])) == full * 2 * BS, "36 distinct samples in epoch 0"
    # epoch 1 is the sample left over by epoch 0 and the first 35 of the next pass: over both, each sample once or twice
    counts = pd.Series(epochs[0] + epochs[1]).value_counts()
    assert set(counts.index) == set(expected) and counts.sum() == 2 * full * 2 * BS and counts.max() <= 2, counts
    validated = [i for r in records for i in real_ids(r['valid_rows'][:7])]
    assert sorted(validated) == sorted(expected), "the first validation saw every sample once"
    assert records[0]['metrics'] == records[1]['metrics']

def test_unreadable_samples_and_shards(tmp_path):
    "A corrupt image and a truncated shard are skipped, counted and warned about; batches keep their size; too many stop the run"
    from clip_fastai.data import CaptionDataLoaders
    import clip_fastai.shards
    pattern = make_shards(tmp_path, sizes=[6, 6, 6])
    with tarfile.open(tmp_path/'part0-00000.tar') as t: members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tmp_path/'part0-00000.tar', 'w') as t:  # the image of sample 2 becomes bytes no decoder reads
        for m, data in members:
            if m.name == '000000002.png': data, m.size = b'not a png' * 10, 90
            t.addfile(m, io.BytesIO(data))
    whole = (tmp_path/'part2-00000.tar').read_bytes()
    (tmp_path/'part2-00000.tar').write_bytes(whole[:len(whole) // 2])  # sizes.json still says 6 samples
    dls = CaptionDataLoaders.from_shards(pattern, image_size=16, bs=4, num_workers=2, seed=0, device='cpu', max_bad_share=0.5)
    with pytest.warns(UserWarning) as caught: batches = list(dls.train)
    assert len(batches) == 4 and all(len(b[0]) == 4 for b in batches)
    messages = [str(w.message) for w in caught]
    # the main process repeats what the workers warned (a worker's own warnings may be lost): the sample and the shard
    assert any('Skipped sample 000000002 of ' in m and 'part0-00000.tar' in m for m in messages), messages
    assert any('part2-00000.tar could not be read past sample' in m for m in messages), messages
    read, bad = (int(v) for v in dls.train.counts.sum(0))
    assert read == 16 and 1 + 2 <= bad <= 1 + 6, (read, bad)  # 1 corrupt image, 3-6 samples lost with the damaged half
    assert any(f'{bad} of ' in m and 'samples read so far in epoch 0' in m for m in messages), messages  # the running count
    ids = torch.cat([b[2] for b in batches]).tolist()
    assert set(ids) <= set(tar_keys(tmp_path, ['part0-00000.tar', 'part1-00000.tar', 'part2-00000.tar'])) 
    strict = dls.train.new(max_bad_share=0.05)
    with pytest.raises(RuntimeError, match='unreadable, more than max_bad_share=5.0%'):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            list(strict)

def test_shard_lists_and_pipes(shards, tmp_path):
    "A brace pattern, a list of `pipe:cat` commands and a .txt file of paths give the same batches"
    from clip_fastai.data import CaptionDataLoaders
    import clip_fastai.shards
    pattern, folder = shards
    from braceexpand import braceexpand
    paths = list(braceexpand(pattern))
    (tmp_path/'shards.txt').write_text('# the training shards\n' + '\n'.join(paths) + '\n\n')
    def first_epoch(shard_spec, **kwargs):
        dls = CaptionDataLoaders.from_shards(shard_spec, image_size=16, bs=4, num_workers=1, seed=3, device='cpu', **kwargs)
        return [b[2].tolist() for b in dls.train]
    reference = first_epoch(pattern)
    assert len(reference) == 37 // 4
    assert first_epoch([f'pipe:cat {p}' for p in paths]) == reference  # counted through the pipes: no sizes.json for them
    assert first_epoch(str(tmp_path/'shards.txt')) == reference
    with pytest.raises(FileNotFoundError, match='1 of 6 shard files not found'):
        first_epoch(paths[:5] + [str(folder/'missing.tar')])

def test_state_dict_round_trip(shards):
    "After `load_state_dict` a new DataLoader yields exactly the batches an uninterrupted pass yields after that point"
    from clip_fastai.data import CaptionDataLoaders
    import clip_fastai.shards
    pattern, folder = shards
    dl = CaptionDataLoaders.from_shards(pattern, image_size=16, bs=2, num_workers=2, seed=11, shuffle_buffer=5, device='cpu').train
    list(dl)  # epoch 0
    state = dl.state_dict()
    assert state['epoch'] == 1 and state['batches_done'] == 0
    uninterrupted = list(dl)  # epoch 1
    assert len(uninterrupted) == 37 // 2
    for stop in (0, 1, 4, 17):
        first = dl.new()
        first.load_state_dict(state)
        iterator = iter(first)
        head = [next(iterator) for _ in range(stop)]
        saved = first.state_dict()
        del iterator  # the run is killed here
        resumed = dl.new(seed=0)  # another seed, replaced by the saved one
        resumed.load_state_dict(saved)
        tail = list(resumed)
        assert len(head) + len(tail) == len(uninterrupted), (stop, len(tail))
        for k, (a, b) in enumerate(zip(head + tail, uninterrupted)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (stop, k)
        assert resumed.state_dict()['epoch'] == 2
    finished = dl.new()
    finished.load_state_dict(state)
    assert len(list(finished)) == 18 and finished.state_dict()['epoch'] == 2  # saved after the last batch: the next epoch
    with pytest.raises(ValueError, match='bs 2 \\(now 4\\)'): dl.new(bs=4).load_state_dict(state)

def test_resampled(shards):
    "Resampled epochs: the given number of samples, shards drawn with replacement, reproducible from the seed"
    from clip_fastai.data import CaptionDataLoaders
    import clip_fastai.shards
    pattern, folder = shards
    def epochs(seed, n=2):
        dl = CaptionDataLoaders.from_shards(pattern, image_size=16, bs=5, num_workers=2, seed=seed, resampled=True,
                                            samples_per_epoch=50, device='cpu').train
        return [[i for b in dl for i in b[2].tolist()] for _ in range(n)]
    a, b = epochs(1), epochs(1)
    assert a == b and len(a[0]) == 50 and a[0] != a[1]
    expected = tar_keys(folder)
    assert set(a[0]) <= set(expected) and len(set(a[0])) < 50  # drawn with replacement: 37 samples cannot fill 50 once each
    assert epochs(2, 1)[0] != a[0]

def test_torchrun_two_nodes(shards, tmp_path):
    "Two torchrun launches, one per 'node', meet at a c10d rendezvous and train as one job of 2 processes over uneven shards"
    pattern, folder = shards
    port = free_port()
    command = [str(bin_dir/'torchrun'), '--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d',
               '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', 'shards-test', __file__, 'fit', str(folder), str(tmp_path)]
    nodes = [subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
    check_fit(tmp_path, folder)

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 2
num_processes: 2
machine_rank: {rank}
main_process_ip: 127.0.0.1
main_process_port: {port}
rdzv_backend: static
same_network: true
use_cpu: false
mixed_precision: 'no'
"""

def test_accelerate_two_machines(shards, tmp_path):
    """`accelerate launch` with a 2-machine config file per 'machine' (machine_rank 0 and 1, main process 127.0.0.1).

    On machines without GPU the config says MULTI_GPU: accelerate then starts its processes with torchrun and
    `distrib_ctx` trains over gloo; `--cpu` (MULTI_CPU) would need MPI to start more than one process."""
    pattern, folder = shards
    port = free_port()
    for rank in range(2): (tmp_path/f'machine{rank}.yaml').write_text(ACCELERATE_CONFIG.format(rank=rank, port=port))
    machines = [subprocess.Popen([str(bin_dir/'accelerate'), 'launch', '--config_file', str(tmp_path/f'machine{rank}.yaml'),
                                  '--num_cpu_threads_per_process', '1', __file__, 'fit', str(folder), str(tmp_path)],
                                 cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
    check_fit(tmp_path, folder)

def test_cli_shards(shards, tmp_path):
    "`clip-fastai-train PATTERN --valid PATTERN --samples-per-epoch N` trains on shards; a missing shard is one error line"
    pattern, folder = shards
    from braceexpand import braceexpand
    valid = str(folder/'part{4..5}-00000.tar')
    result = run([str(bin_dir/'clip-fastai-train'), str(folder/'part{0..3}-00000.tar'), '--valid', valid, '--samples-per-epoch', '16',
                  '--epochs', '1', '--bs', '4', '--num-workers', '0', '--context-length', '16', '--out', str(tmp_path/'run')])
    assert 'Training 1 epoch of 4 batches of 4' in result.stdout, result.stdout[-2000:]  # 16 samples, 4 batches of 4
    assert (tmp_path/'run'/'model.pth').is_file() and (tmp_path/'run'/'learner.pkl').is_file()
    missing = subprocess.run([str(bin_dir/'clip-fastai-train'), str(folder/'part{0..9}-00000.tar'), '--epochs', '1'],
                             cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith('error: data ') \
        and '4 of 10 shard files not found' in missing.stderr, missing.stderr[-2000:]
