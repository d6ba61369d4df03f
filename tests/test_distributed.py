"""Multi-process tests of `clip_fastai.distributed`: 2 CPU processes over gloo, launched with torchrun.

The scenarios run in tests/distributed_worker.py; every test compares what the processes saved with
the same computation done here in one process on the concatenated batch."""
import os, subprocess, sys
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from distributed_worker import make_items, make_model, record_learner, retrieval_metrics, make_dls
from clip_fastai.train import clip_learner, contrastive_loss

pytestmark = pytest.mark.xdist_group('distributed')  # one pytest worker: the launches would fight over the CPU cores

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
environment = {**os.environ, 'OMP_NUM_THREADS': '1'}

def launch(out, *scenarios, nproc:int=2, worker=root/'tests'/'distributed_worker.py'):
    "Run the `worker` script's `scenarios` in `nproc` processes; they save their results in `out`"
    result = subprocess.run([str(bin_dir/'torchrun'), '--standalone', '--nproc_per_node', str(nproc), str(worker),
                             str(out), *scenarios], cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return lambda scenario: [torch.load(out/f'{scenario}.rank{rank}.pt', weights_only=False) for rank in range(nproc)]

@pytest.fixture(scope='module')
def learner_results(tmp_path_factory):
    return launch(tmp_path_factory.mktemp('learner'), 'gather', 'gradients', 'uneven', 'metrics')

@pytest.fixture(scope='module')
def optimizer_results(tmp_path_factory):
    return launch(tmp_path_factory.mktemp('optimizer'), 'sharded', 'accumulation')

def reference(items, bs, **kwargs):
    "Loss and gradients of every batch of `items` in one process, with `CLIPTrainer`"
    torch.set_num_threads(1)
    learn = record_learner(items, bs, **kwargs)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn.record_gradients.records

def assert_close_tensors(actual:dict, expected:dict, rtol=1e-5):
    "Each tensor of `actual` equals `expected`'s within `rtol`, elements near 0 judged against the tensor's largest"
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * expected[name].abs().max().item(), msg=name)

def differs(actual:dict, expected:dict, rtol=1e-3):
    return any(not torch.allclose(actual[n], expected[n], rtol=rtol, atol=rtol * expected[n].abs().max().item()) for n in expected)

def test_gather_with_grad(learner_results):
    "3 rows on rank 0, 5 on rank 1: each rank's gradient (averaged like DDP does) is the global loss's"
    results = learner_results('gather')
    torch.manual_seed(0)
    image, text = torch.randn(8, 6).requires_grad_(), torch.randn(8, 6).requires_grad_()
    scale = torch.tensor(10.).requires_grad_()
    loss = contrastive_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    loss.backward()
    for mode in ('full', 'local'):
        rank0, rank1 = results[0][mode], results[1][mode]
        if mode == 'full': torch.testing.assert_close(rank0['loss'], loss.detach()); torch.testing.assert_close(rank1['loss'], loss.detach())
        else: torch.testing.assert_close((rank0['loss'] + rank1['loss']) / 2, loss.detach())
        # DDP would average the two processes' gradients: divide by 2
        torch.testing.assert_close(torch.cat([rank0['image_grad'], rank1['image_grad']]) / 2, image.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.cat([rank0['text_grad'], rank1['text_grad']]) / 2, text.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close((rank0['scale_grad'] + rank1['scale_grad']) / 2, scale.grad, rtol=1e-5, atol=1e-7)

def test_torch_all_gather_backward_agrees(learner_results):
    "`torch.distributed.nn.functional.all_gather`'s backward sums the processes' gradients too, as ours does"
    for result in learner_results('gather'): torch.testing.assert_close(result['ours'], result['torch_all_gather'])

def test_one_step_equals_global_batch(learner_results):
    "Loss and every gradient after one step on 4 + 4 rows equal one process's on the 8 rows"
    results, (expected,) = learner_results('gradients'), reference(make_items(8), 8)
    for rank in range(2):
        full, local = results[rank]['full'], results[rank]['local']
        assert len(full) == len(local) == 1
        torch.testing.assert_close(full[0]['loss'], expected['loss'], rtol=1e-5, atol=0)
        assert_close_tensors(full[0]['grads'], expected['grads'])
        assert_close_tensors(local[0]['grads'], expected['grads'])
        # plain DDP with `CLIPTrainer` contrasts each process's 4 rows only: another gradient
        assert differs(results[rank]['ddp_only'][0]['grads'], expected['grads'])
    # with `local_loss` each process reports the loss of its rows; their mean is the global loss
    torch.testing.assert_close((results[0]['local'][0]['loss'] + results[1]['local'][0]['loss']) / 2, expected['loss'], rtol=1e-5, atol=0)

def test_uneven_last_batch(learner_results):
    "11 rows, 4 per process and batch: the last global batch is rows 4, 5 and 10; `DistributedDL`'s repeat of row 0 is left out"
    results, items = learner_results('uneven'), make_items(11, seed=1)
    expected = reference([items[i] for i in [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10]], 8)
    with_padding = reference([items[i] for i in [4, 5, 10, 0]], 4)  # what counting the padding would give
    for rank in range(2):
        for mode in ('full', 'local'):
            records = results[rank][mode]
            assert [r['rows'] for r in records] == [4, 2]  # rank 1's last batch holds row 10 and the padding
            for record, batch in zip(records, expected): assert_close_tensors(record['grads'], batch['grads'])
            assert differs(records[1]['grads'], with_padding[0]['grads'])
        for record, batch in zip(results[rank]['full'], expected): torch.testing.assert_close(record['loss'], batch['loss'], rtol=1e-5, atol=0)

def test_retrieval_metrics(learner_results):
    "`RetrievalAtK` gathered from 2 processes (37 rows, the last batch padded) equals one process's values"
    results = learner_results('metrics')
    learn = clip_learner(make_dls(make_items(8), 8, valid_items=make_items(37, seed=4)), make_model(), metrics=retrieval_metrics())
    with learn.no_bar(), learn.no_logging(): expected = learn.validate()[1:]
    for result in results:
        assert result['names'] == [m.name for m in learn.metrics]
        for value, want in zip(result['values'], expected): assert value == pytest.approx(want, rel=1e-6)

def test_sharded_optimizer(optimizer_results):
    "Each process holds the AdamW state of part of the parameters; the weights equal the unsharded run's"
    results = optimizer_results('sharded')
    names = [n for n, _ in make_model().named_parameters()]
    held = [set(result['sharded_3']['state_params']) for result in results]
    assert all(result['sharded_3']['optimizer'] == 'ZeroRedundancyOptimizer' for result in results)
    assert held[0] and held[1] and not held[0] & held[1] and held[0] | held[1] == set(names)
    assert results[0]['sharded_3']['saved_states'] == len(names)  # consolidated on process 0 for saving
    for result in results:
        # three steps: exactly torch's AdamW with one parameter group with and one without weight decay
        assert_close_tensors(result['sharded_3']['weights'], result['unsharded_3']['weights'])
        # one step: fastai's `clip_optimizer` (after more steps, Adam turns the rounding noise in gradients that are
        # exactly 0 in theory, such as the attention key biases', into different updates in the two implementations)
        assert_close_tensors(result['sharded_1']['weights'], result['fastai_adam']['weights'])
        assert differs(result['sharded_1']['weights'], {n: p.detach() for n, p in make_model().named_parameters()})

def test_contrastive_accumulation_distributed(optimizer_results):
    "`ContrastiveAccumulation(3)` on 8 rows per process gives the gradient of one process on all 16 rows"
    results, (expected,) = optimizer_results('accumulation'), reference(make_items(16, seed=3), 16)
    for result in results:
        for mode in ('full', 'local'): assert_close_tensors(result[mode][0]['grads'], expected['grads'])
        torch.testing.assert_close(result['full'][0]['loss'], expected['loss'], rtol=1e-5, atol=0)

def test_resnet_distrib_ctx_defaults(tmp_path):
    "On CPU, `learn.distrib_ctx()` with no arguments trains a ResNet in 2 processes, which end with the same weights"
    results = launch(tmp_path, 'resnet_defaults')('resnet_defaults')
    assert [r['batchnorm'] for r in results] == ['BatchNorm2d', 'BatchNorm2d']
    # `distrib_ctx` destroyed the process group as the processes exited (gloo aborts a process that keeps it to the end)
    assert [(tmp_path/f'exit.rank{rank}.txt').read_text() for rank in range(2)] == ['False', 'False']
    state0, state1 = results[0]['state'], results[1]['state']
    # parameters are synchronised by DDP; BatchNorm running statistics are each process's own
    for name in state0:
        if 'running' in name or 'num_batches' in name: continue
        torch.testing.assert_close(state0[name], state1[name], rtol=0, atol=0, msg=name)
    assert all(torch.isfinite(v.float()).all() for v in state0.values())
    torch.manual_seed(0)
    from clip_fastai.model import CLIP
    initial = CLIP.from_config('tiny-resnet', image_size=32, context_length=16, vocab_size=1000).state_dict()
    assert not torch.equal(initial['text_projection'], state0['text_projection'])

# the training command, as a user runs it on a machine without GPU

def check_trained(out:Path):
    assert sorted(p.name for p in out.iterdir()) == ['learner.pkl', 'model.pth', 'tokenizer.pkl']
    from clip_fastai.model import CLIP
    model = CLIP.from_state_dict(torch.load(out/'model.pth'))
    assert model.positional_embedding.shape[0] == 16

@pytest.mark.parametrize('launcher', ['torchrun', 'accelerate'])
def test_cli_two_processes(launcher, tmp_path):
    "`clip-fastai-train` trains the digits in 2 processes (11 batches of 2 × 64 rows per epoch) and saves the model"
    command = [str(bin_dir/'clip-fastai-train'), '--epochs', '1', '--num-workers', '0', '--context-length', '16', '--out', str(tmp_path/'run')]
    launch_prefix = ([str(bin_dir/'torchrun'), '--standalone', '--nproc_per_node', '2', '--no-python'] if launcher == 'torchrun' else
                     [str(bin_dir/'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                      '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0'])
    result = subprocess.run(launch_prefix + command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert 'Training 1 epoch of 11 batches of 64 in each of 2 processes' in result.stdout, result.stdout[-2000:]  # not one process's 22
    check_trained(tmp_path/'run')
