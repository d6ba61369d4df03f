"""Worker of tests/test_distributed.py: `torchrun --nproc_per_node 2 tests/distributed_worker.py OUT SCENARIO...`.

Each scenario trains a tiny CLIP with fastai's `distrib_ctx` on CPU (gloo) and saves what the tests compare
(losses, gradients, weights, metric values) in OUT/SCENARIO.rank{R}.pt. The same helpers build the
single-process references in the test, so both sides start from identical weights and data."""
import atexit, sys, math
from functools import partial
from pathlib import Path
import torch, torch.distributed as dist
from fastai.learner import Learner
from fastai.data.core import DataLoaders, TfmdDL
from fastai.callback.core import Callback, CancelStepException
from fastai.optimizer import OptimWrapper
from fastai.torch_core import rank_distrib
from accelerate import PartialState
import fastai.distributed  # `Learner.distrib_ctx`
from clip_fastai.model import CLIP
from clip_fastai.data import TensorMatchId
from clip_fastai.metrics import RetrievalAtK
from clip_fastai.train import clip_learner, unwrap_model, no_weight_decay_params
from clip_fastai.distributed import DistributedCLIPTrainer, ContrastiveAccumulation, sharded_clip_optimizer, gather_with_grad

VOCAB, CONTEXT = 1000, 16

def make_items(n:int, seed:int=0) -> list:
    "`n` (image, token ids, match id) items; random tokens end with the end-of-text id (the largest), some ids repeat"
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, VOCAB - 1, (n, CONTEXT), generator=g)
    ends = torch.randint(3, CONTEXT, (n,), generator=g)
    for i, end in enumerate(ends): tokens[i, end], tokens[i, end + 1:] = VOCAB - 1, 0
    ids = torch.randint(0, max(1, n * 2 // 3), (n,), generator=g)
    return [(images[i], tokens[i], TensorMatchId(ids[i])) for i in range(n)]

def make_model(seed:int=0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP.from_config('tiny-vit', image_size=32, context_length=CONTEXT, vocab_size=VOCAB)

def make_dls(items, bs:int, valid_items=None) -> DataLoaders:
    return DataLoaders(TfmdDL(items, bs=bs, shuffle=False, drop_last=False),
                       TfmdDL(items if valid_items is None else valid_items, bs=bs, shuffle=False, drop_last=False), device='cpu')

class RecordGradients(Callback):
    "Keep every training batch's loss and gradients; cancel the steps so that all batches see the same weights"
    order = 90
    def before_fit(self): self.records = []
    def after_backward(self):
        self.records.append({'loss': self.learn.loss.detach().clone(), 'rows': len(self.learn.yb[0]),
                             'grads': {n: p.grad.detach().clone() for n, p in unwrap_model(self.model).named_parameters()}})
    def before_step(self): raise CancelStepException()

def record_learner(items, bs, trainer=None, cbs=(), **kwargs):
    "A `clip_learner` on `items` that records gradients, with `trainer` in place of `CLIPTrainer`"
    learn = clip_learner(make_dls(items, bs), make_model(), cbs=[RecordGradients(), *cbs], **kwargs)
    if trainer is not None: learn.remove_cb(learn.clip_trainer).add_cb(trainer)
    return learn

def fit_distributed(learn, epochs=1, lr=1e-3):
    with learn.distrib_ctx(cpu=True): learn.fit(epochs, lr)
    return learn

# scenarios: each returns what rank_distrib() saves

def scenario_gradients():
    "One step on a global batch of 8 rows (4 per process), with each trainer"
    items = make_items(8)
    res = {}
    for name, trainer in [('full', DistributedCLIPTrainer()), ('local', DistributedCLIPTrainer(local_loss=True)), ('ddp_only', None)]:
        learn = fit_distributed(record_learner(items, 4, trainer))
        res[name] = learn.record_gradients.records
    return res

def scenario_uneven():
    "11 rows, 4 per process and batch: `DistributedDL` pads rank 1's last batch with a repeat of row 0"
    items = make_items(11, seed=1)
    res = {}
    for name, trainer in [('full', DistributedCLIPTrainer()), ('local', DistributedCLIPTrainer(local_loss=True))]:
        learn = fit_distributed(record_learner(items, 4, trainer))
        res[name] = learn.record_gradients.records
    return res

def scenario_gather():
    "`gather_with_grad` with 3 rows on rank 0 and 5 on rank 1, and torch's `all_gather` with equal sizes"
    rank = dist.get_rank() if dist.is_initialized() else rank_distrib()
    torch.manual_seed(0)
    image, text = torch.randn(8, 6), torch.randn(8, 6)
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    res = {}
    for local_loss in (False, True):
        trainer = DistributedCLIPTrainer(local_loss=local_loss)
        mine_image, mine_text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        scale = torch.tensor(10.).requires_grad_()
        loss = trainer.loss_func((torch.nn.functional.normalize(mine_image, dim=-1), torch.nn.functional.normalize(mine_text, dim=-1), scale))
        loss.backward()
        res['local' if local_loss else 'full'] = {'loss': loss.detach(), 'image_grad': mine_image.grad, 'text_grad': mine_text.grad,
                                                  'scale_grad': scale.grad}
    # torch.distributed.nn.functional.all_gather (equal sizes) against ours
    from torch.distributed.nn.functional import all_gather
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    weights = torch.randn(8, 6, generator=torch.Generator().manual_seed(99))
    for name, gather in [('torch_all_gather', lambda t: torch.cat(all_gather(t))), ('ours', gather_with_grad)]:
        x.grad = None
        (gather(x) * weights).square().sum().backward()
        res[name] = x.grad.clone()
    return res

def unsharded_adamw(params, no_decay=(), **kwargs):
    "Reference for `ShardedOptimizer`: torch's AdamW, every parameter group split into one with and one without weight decay"
    no_decay = {id(p) for p in no_decay}
    groups = [{'params': [p for p in g if (id(p) in no_decay) == exempt], **({'weight_decay': 0.} if exempt else {})}
              for g in params for exempt in (False, True)]
    return OptimWrapper(opt=torch.optim.AdamW([g for g in groups if g['params']], **kwargs))

def scenario_sharded():
    "The paper's AdamW with sharded state, against fastai's `clip_optimizer` (one step) and torch's unsharded AdamW (three steps)"
    res = {}
    for name, n_items, opt_func in [('fastai_adam', 8, None), ('sharded_1', 8, sharded_clip_optimizer),
                                    ('sharded_3', 24, sharded_clip_optimizer), ('unsharded_3', 24, 'adamw')]:
        model = make_model()
        if opt_func == 'adamw': opt_func = partial(unsharded_adamw, no_decay=no_weight_decay_params(model), betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
        elif opt_func is not None: opt_func = opt_func(model)
        learn = clip_learner(make_dls(make_items(n_items, seed=2), 4), model, **({} if opt_func is None else {'opt_func': opt_func}))
        learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer())
        fit_distributed(learn, lr=1e-2)
        names = {id(p): n for n, p in model.named_parameters()}
        res[name] = {'weights': {n: p.detach().clone() for n, p in model.named_parameters()}}
        if name.startswith('sharded'):
            res[name]['optimizer'] = type(learn.opt.opt).__name__
            res[name]['state_params'] = sorted(names[id(p)] for p in learn.opt.local_state)
            learn.opt.consolidate_state_dict(to=0)  # every process takes part; process 0 can then save all of it
            if rank_distrib() == 0: res[name]['saved_states'] = len(learn.opt.state_dict()['state'])
    return res

def scenario_accumulation():
    "`ContrastiveAccumulation(micro_bs=3)` with `DistributedCLIPTrainer`, on 8 rows per process"
    items = make_items(16, seed=3)
    res = {}
    for local_loss in (False, True):
        learn = fit_distributed(record_learner(items, 8, DistributedCLIPTrainer(local_loss=local_loss), cbs=[ContrastiveAccumulation(3)]))
        res['local' if local_loss else 'full'] = learn.record_gradients.records
    return res

def retrieval_metrics():
    return [RetrievalAtK(1), RetrievalAtK(5), RetrievalAtK('mean'), RetrievalAtK('median', direction='t2i'), RetrievalAtK(1, candidates='ids')]

def scenario_metrics():
    "`RetrievalAtK` on 37 validation rows, 8 per process and batch (rank 1's last batch is padded)"
    learn = clip_learner(make_dls(make_items(8), 8, valid_items=make_items(37, seed=4)), make_model(), metrics=retrieval_metrics())
    learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer())
    with learn.distrib_ctx(cpu=True): values = learn.validate()
    return {'values': values[1:], 'names': [m.name for m in learn.metrics]}

def scenario_resnet_defaults():
    "A ResNet CLIP under `CLIPLearner.distrib_ctx()` with no arguments: on CPU, no `SyncBatchNorm` (DDP needs a GPU for it)"
    torch.manual_seed(0)
    learn = clip_learner(make_dls(make_items(16, seed=5), 4), CLIP.from_config('tiny-resnet', image_size=32, context_length=CONTEXT, vocab_size=VOCAB))
    learn.remove_cb(learn.clip_trainer).add_cb(DistributedCLIPTrainer())
    with learn.distrib_ctx(): learn.fit(1, 1e-3)
    return {'state': {k: v.detach().clone() for k, v in unwrap_model(learn.model).state_dict().items()},
            'batchnorm': type(unwrap_model(learn.model).visual.bn1).__name__}

if __name__ == '__main__':
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    PartialState(cpu=True)  # the gloo process group, as `distrib_ctx(cpu=True)` makes it
    # registered before `distrib_ctx` registers its clean-up, so it runs after it (last in, first out): the group is gone
    atexit.register(lambda rank=rank_distrib(): (out/f'exit.rank{rank}.txt').write_text(str(dist.is_initialized())))
    for scenario in scenarios:
        result = globals()[f'scenario_{scenario}']()
        torch.save(result, out/f'{scenario}.rank{rank_distrib()}.pt')
