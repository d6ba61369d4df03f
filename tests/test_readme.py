"""The README, run as a new user runs it: every shell command as written, each block in a fresh empty folder, and
the Python blocks as one script in a fresh process; then what the README says happens (files saved, and they load)."""
import json, os, re, shlex, subprocess, sys, tempfile
from pathlib import Path
import pytest

# long, one thread: one xdist worker runs these one after another, beside the notebooks on the other
pytestmark = pytest.mark.xdist_group('readme')

root = Path(__file__).resolve().parents[1]
readme = (root/'README.md').read_text()
bin_dir = Path(sys.executable).parent
environment = {**os.environ, 'OMP_NUM_THREADS': '1', 'PATH': f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
ci_steps = ('pip install', 'pytest') # CI itself runs these (`.ci/run`), they cannot run inside pytest
saved_files = ['learner.pkl', 'model.pth', 'tokenizer.pkl']

def blocks(language):
    "The contents of README.md's fenced blocks of `language`"
    return re.findall(rf"^```{language}\n(.*?)^```", readme, re.M | re.S)

def commands(block): return [l.strip() for l in block.splitlines() if l.strip() and not l.lstrip().startswith('#')]

def is_ci_step(command): return command.startswith(ci_steps)

shell_blocks = [b for b in blocks('sh') if not all(is_ci_step(c) for c in commands(b))]
ci_commands = [c for b in blocks('sh') for c in commands(b) if is_ci_step(c)]

def short(command:str) -> str:
    "`command`, with `--epochs 1` at the end when it runs `clip-fastai-train` (the last value of an option wins)"
    return f"{command} --epochs 1" if 'clip-fastai-train' in command else command

def run(args, cwd, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result

def test_readme_has_the_blocks_it_is_tested_by():
    "Deleting the commands must not make the tests below pass vacuously"
    assert any('clip-fastai-train' in c for b in shell_blocks for c in commands(b)), shell_blocks
    assert any('accelerate launch' in c for b in shell_blocks for c in commands(b)), shell_blocks
    assert blocks('python') and ci_commands
    assert all(not is_ci_step(c) for b in shell_blocks for c in commands(b)), "mix CI steps with other commands in one block"
    # what the README says the command saves, and where
    for name in saved_files: assert f'`{name}`' in readme, name
    assert '(default `clip_model`)' in readme

def ci_run_commands():
    "The simple commands `.ci/run` runs, each as its list of words, without redirections and pip's `-q`"
    found = []
    for line in (root/'.ci'/'run').read_text().splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, '#'
        words, skip_next = [], False
        for token in [*lexer, ';']:
            if skip_next: skip_next = False
            elif token in ('>', '>>', '<', '>&', '&>'): # a redirection: its target goes, and the `2` of `2>&1`
                skip_next = True
                if words and words[-1].isdigit(): words.pop()
            elif token in ('|', '||', '&&', ';', '&', '(', ')', '{', '}'):
                if words: found.append([w for w in words if w not in ('-q', '--quiet')])
                words = []
            else: words.append(token)
    return found

def test_ci_runs_the_readme_install_and_test_commands():
    "The install and test commands cannot run inside pytest: CI runs exactly them (`-q` aside)"
    ran = ci_run_commands()
    for command in ci_commands: assert shlex.split(command) in ran, (command, ran)

check_saved = r'''
import json, pickle, sys, torch
from pathlib import Path
from fastai.learner import load_learner
from clip_fastai.model import CLIP
from clip_fastai.metrics import embed_dataloader, retrieval_ranks
from clip_fastai.cli import caption_dataloaders
out = Path(sys.argv[1])
learn, model = load_learner(out/'learner.pkl'), CLIP.from_state_dict(out/'model.pth')
tokenizer = pickle.loads((out/'tokenizer.pkl').read_bytes())
size = model.config['image_size']
# the digits the command trained on (no data argument): the same validation set, in the same order
dls = caption_dataloaders(None, tokenizer, size, 64, num_workers=0)
results = {}
for name, m in [('learner', learn.model), ('model', model)]:
    image_features, text_features, _, match_ids = embed_dataloader(m, dls.valid)
    ranks = retrieval_ranks(image_features, text_features, match_ids, candidates='ids')
    results[name] = dict(image=image_features, text=text_features, r1=(ranks <= 1).float().mean().item(),
                         r5=(ranks <= 5).float().mean().item(), median=ranks.median().item())
same = {k: torch.equal(results['learner'][k], results['model'][k]) for k in ('image', 'text')}
print(json.dumps(dict(same=same, n=len(results['model']['image']),
                      **{k: results['model'][k] for k in ('r1', 'r5', 'median')})))
'''

def final_metrics(stdout:str) -> dict:
    "The metrics of the command's summary line, `Trained N epochs in ...: name value, ...`"
    line = [l for l in stdout.splitlines() if l.startswith('Trained ')][-1]
    return {name: float(value) for name, value in re.findall(r'(\S+) (-?[\d.e+-]+)(?:,|$)', line.split(': ', 1)[1])}

def out_of(command:str) -> str:
    words = shlex.split(command)
    return words[words.index('--out') + 1] if '--out' in words else 'clip_model'

@pytest.mark.parametrize('block', shell_blocks, ids=lambda b: commands(b)[0].split()[0])
def test_shell_block(block, tmp_path):
    "Every command as written (`--epochs 1` added), in a fresh empty folder; then the saved files load and agree"
    script = '\n'.join(['set -euo pipefail', *map(short, commands(block))])
    result = run(['bash', '-c', script], cwd=tmp_path)
    for command in commands(block):
        if 'clip-fastai-train' not in command: continue
        out = tmp_path/out_of(command)
        assert sorted(p.name for p in out.iterdir()) == saved_files, (command, list(out.iterdir()))
        assert f"Saved in {out.resolve()}" in result.stdout, result.stdout[-2000:]
        # a fresh process: the learner and the model give the same features, and the run's final metrics
        checked = json.loads(run([sys.executable, '-c', check_saved, str(out)], cwd=tmp_path).stdout.strip().splitlines()[-1])
        assert checked['same'] == {'image': True, 'text': True}, checked
        reported = final_metrics(result.stdout)
        assert reported['i2t_R@1_by_id'] == pytest.approx(checked['r1'], abs=6e-4), (reported, checked)
        assert reported['i2t_R@5_by_id'] == pytest.approx(checked['r5'], abs=6e-4), (reported, checked)
        assert reported['i2t_median_rank_by_id'] == checked['median'], (reported, checked)

def test_python_blocks(tmp_path):
    "The Python blocks in order, as one script, in a fresh process and an empty folder"
    (tmp_path/'readme.py').write_text('\n\n'.join(blocks('python')))
    run([sys.executable, 'readme.py'], cwd=tmp_path)
