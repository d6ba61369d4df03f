"""Peak memory of the distributed sigmoid loss in 1 to 4 CPU processes: clip_fastai's ring against open_clip's `SigLipLoss`.

    python bench/siglip_memory.py [--rows 1024] [--dim 512] [--max-world 4]

For each number of processes W it starts W processes with torchrun (gloo, one thread each). Every process holds
`rows` rows of L2-normalised image and text features (the same per-process batch whatever W) and runs the loss's
forward and backward: `clip_fastai.siglip.ring_sigmoid_loss` and open_clip's `SigLipLoss(rank, world_size)` (its
default 'bidir' exchange, and 'shift'). Memory is what the torch profiler (`profile_memory=True`) records as
allocated by torch's CPU allocator during the call, above what was allocated when it started: its peak over the
call, the largest over the processes. Times are the median of 5 calls of process 0."""
import argparse, json, os, subprocess, sys, statistics, tempfile, time
from pathlib import Path
import torch, torch.nn.functional as F

def peak_bytes(fn) -> int:
    "Peak of torch's CPU allocations while `fn()` runs, above what was allocated when it started (torch profiler)"
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f'{folder}/trace.json')
        memory = [e['args'] for e in json.loads(Path(f'{folder}/trace.json').read_text())['traceEvents'] if e.get('name') == '[memory]']
    if not memory: return 0
    start = memory[0]['Total Allocated'] - max(memory[0]['Bytes'], 0)
    return max(m['Total Allocated'] for m in memory) - start

def worker(rows:int, dim:int, out:Path):
    import torch.distributed as dist
    from open_clip.loss import SigLipLoss
    from clip_fastai.siglip import ring_sigmoid_loss
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    image, text = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    losses = {'clip_fastai ring': ring_sigmoid_loss, 'open_clip bidir': SigLipLoss(rank=rank, world_size=world),
              'open_clip shift': SigLipLoss(rank=rank, world_size=world, dist_impl='shift')}
    result = {}
    for name, loss_fn in losses.items():
        def step():
            i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            scale, bias = torch.tensor(10.).requires_grad_(), torch.tensor(-10.).requires_grad_()
            loss_fn(F.normalize(i, dim=-1), F.normalize(t, dim=-1), scale, bias).backward()
        step()  # warm up
        peak = torch.tensor([peak_bytes(step)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        times = []
        for _ in range(5):
            dist.barrier(); start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
        result[name] = {'peak': peak.item(), 'time': statistics.median(times)}
    if rank == 0: (out/f'world{world}.json').write_text(json.dumps(result))
    dist.destroy_process_group()

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=1024, help='rows per process')
    parser.add_argument('--dim', type=int, default=512, help='embedding width')
    parser.add_argument('--max-world', type=int, default=4)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    torchrun = Path(sys.executable).parent/'torchrun'
    for world in range(1, args.max_world + 1):
        subprocess.run([str(torchrun), '--standalone', '--nproc_per_node', str(world), __file__, '--worker', str(args.rows),
                        str(args.dim), str(out)], check=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    block = args.rows * args.rows * 4 / 2**20
    results = {w: json.loads((out/f'world{w}.json').read_text()) for w in range(1, args.max_world + 1)}
    names = list(results[1])
    print(f"{args.rows} rows per process, embed_dim {args.dim}, fp32; one {args.rows} x {args.rows} block of logits = {block:.1f} MiB")
    print(f"torch {torch.__version__}, open_clip {__import__('open_clip').__version__}; peak of the loss's forward and backward, "
          "the largest over the processes (torch profiler)\n")
    print('| processes | global batch | ' + ' | '.join(f'{n} peak' for n in names) + ' | ' + ' | '.join(f'{n} time' for n in names) + ' |')
    print('|---' * (2 + 2 * len(names)) + '|')
    for world, result in results.items():
        peaks = ' | '.join(f"{result[n]['peak'] / 2**20:.1f} MiB ({result[n]['peak'] / 2**20 / block:.1f} blocks)" for n in names)
        times = ' | '.join(f"{result[n]['time'] * 1000:.0f} ms" for n in names)
        print(f'| {world} | {world * args.rows} | {peaks} | {times} |')

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--worker': worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else: main()
