"""Multi-process tests of `clip_fastai.siglip`: the ring sigmoid loss in 2 and 3 CPU processes over gloo.

This file is also the worker: `launch` (of tests/test_distributed.py) runs it under torchrun, and each scenario
saves what its process computed in OUT/SCENARIO.rank{R}.pt. Every test compares that with the same loss computed
here in one process on the global batch (or with open_clip's `SigLipLoss`)."""
import importlib.util, sys, json, tempfile
from pathlib import Path
import pytest, torch
import torch.nn.functional as F, torch.distributed as dist
from distributed_worker import make_items, make_dls, RecordGradients, fit_distributed, VOCAB, CONTEXT
from clip_fastai.model import CLIP
from clip_fastai.train import clip_learner
from clip_fastai.distributed import DistributedCLIPTrainer
from clip_fastai.siglip import sigmoid_loss, ring_sigmoid_loss, siglip_init, SigLIPLoss, RingSigLIPLoss

pytestmark = pytest.mark.xdist_group('distributed')  # one pytest worker: the launches would fight over the CPU cores

# rows per process of the global batches the ring scenario splits; 0 rows: a process whose batch is all padding
SPLITS = {2: [[3, 5], [4, 4], [0, 3]], 3: [[4, 0, 3], [2, 5, 1], [4, 4, 4]]}

def global_batch(n:int, seed:int=0):
    "Random image and text features, match ids with repeats, a log-temperature and a bias, of a global batch of `n` rows"
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    return image, text, torch.randint(0, max(1, n // 2), (n,), generator=g), torch.tensor(2.5), torch.tensor(-3.)

def loss_and_grads(loss_fn, image, text, log_scale, bias, *args):
    "`loss_fn` of normalised features, and the gradients of the raw features, log-temperature and bias"
    image, text, log_scale, bias = (t.clone().requires_grad_() for t in (image, text, log_scale, bias))
    loss = loss_fn(F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp(), bias, *args)
    loss.backward()
    return {'loss': loss.detach(), 'image': image.grad, 'text': text.grad, 'log_scale': log_scale.grad, 'bias': bias.grad}

def siglip_model(seed:int=0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP.from_config('tiny-vit', image_size=32, context_length=CONTEXT, vocab_size=VOCAB, **siglip_init)

def siglip_learner(items, bs:int):
    "A `clip_learner` with the sigmoid loss on `items`, recording every batch's loss and gradients"
    return clip_learner(make_dls(items, bs), siglip_model(), loss_func='siglip', cbs=[RecordGradients()])

# the training scenario: items, batch size per process, and the global batches (item indices) they give
TRAINING = {2: (11, 4, [[0, 1, 2, 3, 6, 7, 8, 9], [4, 5, 10]]),  # rank 1's last batch: item 10 and a repeat of item 0
            3: (10, 2, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]])}  # rank 2: items 8 and 9, then a batch of padding only

# one home for the measurement: the memory benchmark's, so that test and table measure the same way
_spec = importlib.util.spec_from_file_location('siglip_memory', Path(__file__).parents[1]/'bench'/'siglip_memory.py')
siglip_memory = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(siglip_memory)
peak_bytes = siglip_memory.peak_bytes

# scenarios, run in every process

def scenario_ring():
    "`ring_sigmoid_loss` on this process's rows of each global batch of SPLITS, with and without match ids; open_clip's at equal sizes"
    from open_clip.loss import SigLipLoss
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {}
    for sizes in SPLITS[world]:
        image, text, ids, log_scale, bias = global_batch(sum(sizes))
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        for with_ids in (False, True):
            res[tuple(sizes), with_ids] = loss_and_grads(ring_sigmoid_loss, image[rows], text[rows], log_scale, bias,
                                                         ids[rows] if with_ids else None)
        if len(set(sizes)) == 1:
            for impl in ('bidir', 'shift'):
                res['open_clip', impl] = loss_and_grads(SigLipLoss(rank=rank, world_size=world, dist_impl=impl), image[rows], text[rows], log_scale, bias)
    # peak memory of the loss's forward and backward at 256 rows per process
    image, text, _, log_scale, bias = global_batch(256 * world)
    mine = slice(256 * rank, 256 * (rank + 1))
    for name, fn in [('ours', ring_sigmoid_loss), ('open_clip', SigLipLoss(rank=rank, world_size=world))]:
        res['peak', name] = peak_bytes(lambda: loss_and_grads(fn, image[mine], text[mine], log_scale, bias))
    return res

def scenario_training():
    "Training batches through `clip_learner(loss_func='siglip')` and `DistributedCLIPTrainer(loss_func='siglip')`, uneven and padded"
    n, bs, _ = TRAINING[dist.get_world_size()]
    learn = siglip_learner(make_items(n, seed=1), bs)
    learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer(loss_func='siglip'))
    assert type(learn.distributed_clip_trainer.loss_func) is RingSigLIPLoss
    return fit_distributed(learn).record_gradients.records

# the tests, in the pytest process

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    from test_distributed import launch
    return {world: launch(tmp_path_factory.mktemp(f'siglip{world}'), 'ring', 'training', nproc=world, worker=Path(__file__))
            for world in (2, 3)}

def assert_close(actual, expected, rtol=1e-5, msg=''):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(), msg=msg)

@pytest.mark.parametrize('world', [2, 3])
def test_ring_equals_global_batch(results, world):
    "Every process reports the global loss; DDP's average of the processes' gradients is the global loss's gradient"
    ranks = results[world]('ring')
    for sizes in SPLITS[world]:
        image, text, ids, log_scale, bias = global_batch(sum(sizes))
        for with_ids in (False, True):
            expected = loss_and_grads(sigmoid_loss, image, text, log_scale, bias, ids if with_ids else None)
            got = [r[tuple(sizes), with_ids] for r in ranks]
            for g in got: assert_close(g['loss'], expected['loss'], msg=f'{sizes} {with_ids}')
            assert_close(torch.cat([g['image'] for g in got]) / world, expected['image'])
            assert_close(torch.cat([g['text'] for g in got]) / world, expected['text'])
            for name in ('log_scale', 'bias'): assert_close(sum(g[name] for g in got) / world, expected[name])
    # the ids matter: the loss with them is another loss
    assert not torch.allclose(ranks[0][tuple(SPLITS[world][0]), True]['loss'], ranks[0][tuple(SPLITS[world][0]), False]['loss'])

@pytest.mark.parametrize('world', [2, 3])
def test_open_clip_agrees(results, world):
    "At equal sizes each process's gradient is that of open_clip's `SigLipLoss` (which normalises by the local batch)"
    for rank, result in enumerate(results[world]('ring')):
        ours = result[next(tuple(s) for s in SPLITS[world] if len(set(s)) == 1), False]
        for impl in ('bidir', 'shift'):
            theirs = result['open_clip', impl]
            for name in ('image', 'text', 'log_scale', 'bias'): assert_close(ours[name], theirs[name], msg=f'{impl} {name} rank {rank}')

def test_one_process_equals_open_clip():
    "In one process `sigmoid_loss` is open_clip's `SigLipLoss`, value and gradients"
    from open_clip.loss import SigLipLoss
    image, text, _, log_scale, bias = global_batch(12, seed=3)
    ours, theirs = (loss_and_grads(fn, image, text, log_scale, bias) for fn in (sigmoid_loss, SigLipLoss()))
    for name in ours: assert_close(ours[name], theirs[name], msg=name)

def test_open_clip_reads_a_siglip_model(tmp_path):
    "Saved in open_clip's format, a model with a `logit_bias` is an open_clip model with the same four outputs; read back, ours again"
    import open_clip
    model = siglip_model().eval()
    model.save_pretrained(tmp_path, format='open_clip')
    theirs = open_clip.create_model(f'local-dir:{tmp_path}').eval()
    images, tokens = torch.randn(3, 3, 32, 32), torch.stack([item[1] for item in make_items(3)])
    with torch.no_grad(): ours_out, their_out = model(images, tokens), theirs(images, tokens)
    assert len(ours_out) == len(their_out) == 4
    for a, b in zip(ours_out, their_out): assert_close(a, b)
    assert CLIP.from_pretrained(tmp_path).config == model.config

def test_memory_flat_in_world_size(results):
    "Peak loss memory per process at 256 rows: flat from 2 to 3 processes for the ring; open_clip's grows by about a block"
    peaks = {world: [r['peak', name] for name in ('ours', 'open_clip') for r in [results[world]('ring')[0]]] for world in (2, 3)}
    block = 256 * 256 * 4  # one block of fp32 logits
    (ours2, theirs2), (ours3, theirs3) = peaks[2], peaks[3]
    assert ours2 > 0 and abs(ours3 - ours2) < 0.25 * block, peaks
    assert theirs3 - theirs2 > 0.75 * block, peaks

@pytest.mark.parametrize('world', [2, 3])
def test_training_through_distributed_trainer(results, world):
    "`DistributedCLIPTrainer(loss_func='siglip')`: each batch's loss and every gradient equal one process's on the global batch"
    n, _, batches = TRAINING[world]
    items = make_items(n, seed=1)
    torch.set_num_threads(1)
    expected = []
    for batch in batches:
        learn = siglip_learner([items[i] for i in batch], len(batch))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        expected += learn.record_gradients.records
    for rank, records in enumerate(results[world]('training')):
        assert len(records) == len(expected)
        for record, want in zip(records, expected):
            assert_close(record['loss'], want['loss'], msg=f'rank {rank}')
            assert record['grads'].keys() == want['grads'].keys() and 'logit_bias' in want['grads']
            for name in want['grads']: assert_close(record['grads'][name], want['grads'][name], msg=f'rank {rank} {name}')

if __name__ == '__main__':
    from fastai.torch_core import rank_distrib
    from accelerate import PartialState
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    PartialState(cpu=True)  # the gloo process group, as `distrib_ctx(cpu=True)` makes it
    for scenario in scenarios: torch.save(globals()[f'scenario_{scenario}'](), out/f'{scenario}.rank{rank_distrib()}.pt')
