"""OpenAI's reference code from the `clip-anytorch` wheel, for the tests and the notebooks' checks: one home.

The wheel's `clip/__init__.py` needs `pkg_resources`, so its files are imported one by one."""
import importlib.util
from pathlib import Path

def openai_code(name:str): # 'model' or 'simple_tokenizer'
    "OpenAI's `clip/{name}.py`, imported as a file"
    package = Path(importlib.util.find_spec('clip').submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(f'openai_clip_{name}', package/f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

openai_argument_names = ('embed_dim', 'image_resolution', 'vision_layers', 'vision_width', 'vision_patch_size',
                         'context_length', 'vocab_size', 'transformer_width', 'transformer_heads', 'transformer_layers')

def openai_arguments(config:dict): # Our `CLIP` arguments
    "OpenAI's `CLIP` arguments for one of our configurations (OpenAI calls the image side `image_resolution`)"
    config = dict(config, image_resolution=config['image_size'])
    return {k: config[k] for k in openai_argument_names}
