"`from clip_fastai.all import *` gives the public API: no internals, and nothing that shadows `fastai.vision.all`"
import subprocess, sys, json

def star_names(module):
    code = f"import json; ns = {{}}; exec('from {module} import *', ns); print(json.dumps(sorted(n for n in ns if not n.startswith('__'))))"
    return json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])

def test_public_api_only():
    ours = set(star_names('clip_fastai.all'))
    internals = {'split_heads', 'merge_heads', 'LayerNorm', 'Transformer', 'VisionTransformer', 'rng_states', 'set_rng_states',
                 'unpadded_rows', 'process_group_size', 'process_group_rank', 'GatherWithGrad', 'match_ids_of', 'match_targets',
                 'tokenizer_for', 'check_captions', 'to_match_id', 'infer_clip_config'}
    assert not ours & internals, sorted(ours & internals)
    assert {'CLIP', 'CLIPLearner', 'clip_learner', 'CaptionDataLoaders', 'ClipTokenizer', 'RetrievalAtK', 'finetune_learner'} <= ours

def test_nothing_shadows_fastai():
    code = ("import json; a, b = {}, {}; exec('from fastai.vision.all import *', a); exec('from clip_fastai.all import *', b); "
            "print(json.dumps(sorted(n for n in b if n in a and a[n] is not b[n] and not n.startswith('__'))))")
    shadowed = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert shadowed == [], shadowed
