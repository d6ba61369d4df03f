"""Exact resume after a SIGKILL: `SaveProgress` in tests/resume_worker.py, in one process and in two (gloo), from
in-memory class folders and from webdataset shards.

Each test kills a training process right after a step, resumes in a new process, and compares the final weights
and every batch trained on with an uninterrupted run's, bit for bit."""
import signal, subprocess, sys
import pytest, torch
from resume_worker import train, write_digit_shards
from test_distributed import root, bin_dir, environment

def run_worker(out, every, kill_after=0, num_workers=0, resume=False, processes=1, reference=False, shards=False):
    "Run tests/resume_worker.py in `processes` processes; the finished run's results, one per process"
    out.mkdir(exist_ok=True)
    prefix = [sys.executable] if processes == 1 else [str(bin_dir/'torchrun'), '--standalone', '--nproc_per_node', str(processes)]
    args = [str(root/'tests'/'resume_worker.py'), str(out), *map(str, (every, kill_after, num_workers))]
    args += ['resume'] * resume + ['reference'] * reference + ['shards'] * shards
    result = subprocess.run(prefix + args, cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    if kill_after:
        expected = -signal.SIGKILL if processes == 1 else 1  # torchrun reports its killed workers with status 1
        assert result.returncode == expected, result.stdout[-3000:] + result.stderr[-5000:]
        assert processes == 1 or 'SIGKILL' in result.stderr or 'exitcode  : -9' in result.stderr, result.stderr[-3000:]
        return None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = [torch.load(out/f'result.rank{rank}.pt', weights_only=False) for rank in range(processes)]
    if not reference: return results
    return results, [torch.load(out/f'reference.rank{rank}.pt', weights_only=False) for rank in range(processes)]

def saved_position(out, rank=0) -> tuple:
    "(epoch, batches of the epoch, step) of the progress file of process `rank`"
    s = torch.load(out/(f'progress.rank{rank}.pth' if rank else 'progress.pth'), weights_only=False)['schedule']
    return s['epoch'], s['batches'], s['train_iter']

def assert_same_run(resumed, reference, saved_step):
    "Every weight equal, and the resumed run trained on exactly the reference's batches after `saved_step`"
    differing = [k for k, v in reference['weights'].items() if not torch.equal(v, resumed['weights'][k])]
    assert differing == [], differing
    assert resumed['batches'] == [b for b in reference['batches'] if b[0] >= saved_step]
    assert resumed['values'] == reference['values']

def test_killed_run_resumes_exactly(tmp_path):
    "Killed 2 steps after its save at step 4 (of 9 in the first epoch), with 2 DataLoader workers: resumed, the same run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the uninterrupted run, in this process, on one thread as the workers
    try: reference = train(tmp_path/'reference', num_workers=2)  # `every` beyond the run: it never saves
    finally: torch.set_num_threads(threads)
    assert len(reference['batches']) == 18
    run_worker(tmp_path, every=4, kill_after=6, num_workers=2)
    assert saved_position(tmp_path) == (0, 4, 4)
    (resumed,) = run_worker(tmp_path, every=4, num_workers=2, resume=True)
    assert_same_run(resumed, reference, 4)

def test_killed_distributed_run_resumes_exactly(tmp_path):
    "2 processes (gloo) killed after step 4 of 4 + 4, saved at step 3: each process resumes its own run exactly"
    run_worker(tmp_path, every=3, kill_after=4, processes=2)
    assert [saved_position(tmp_path, rank) for rank in range(2)] == [(0, 3, 3)] * 2
    resumed, reference = run_worker(tmp_path, every=3, resume=True, processes=2, reference=True)
    assert len(reference[0]['batches']) == 8  # 2 epochs of 4 batches of 32 of each process's 145 rows
    assert reference[0]['batches'] != reference[1]['batches']  # each process trains on its own half of every batch
    for rank in range(2): assert_same_run(resumed[rank], reference[rank], 3)

def test_killed_shard_run_resumes_exactly(tmp_path):
    "The same digits streamed from webdataset shards (`from_shards`): the source's own `state_dict` is the data position"
    shards = write_digit_shards(tmp_path/'shards')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try: reference = train(tmp_path/'reference', shards=shards)
    finally: torch.set_num_threads(threads)
    assert len(reference['batches']) == 18
    run_worker(tmp_path/'run', every=4, kill_after=6, shards=True)
    assert saved_position(tmp_path/'run') == (0, 4, 4)
    (resumed,) = run_worker(tmp_path/'run', every=4, resume=True, shards=True)
    assert_same_run(resumed, reference, 4)
