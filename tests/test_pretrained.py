"""`CLIP.from_pretrained` and `CLIP.save_pretrained` against the reference libraries: OpenAI's `model.py` (clip-anytorch),
open_clip and transformers. Every model has random weights, moved away from its initialisation (nothing is downloaded):
features must equal the source library's own forward pass within 1e-5 (fp32, eval), and what we write must load in the
other library with the same features."""
import json, warnings
import pytest, torch
import open_clip, transformers
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file
from clip_fastai.model import CLIP
from clip_fastai.pretrained import clip_to_hf_state_dict, hf_config
from clip_fastai.tokenizer import ClipTokenizer
from test_model_reference import openai, openai_model, randomise, inputs, features, small_configs

def assert_same_features(ours, reference, image, text):
    "`ours` (a CLIP) gives `reference`'s image and text features, and these are not degenerate"
    for mine, theirs in zip(features(ours, image, text), reference):
        assert theirs.std(dim=0).mean() > 0.01  # features differ between items
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)

def no_warnings(f):
    "`f()`, failing on any `UserWarning` (ours; not PyTorch's deprecation notices)"
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        return f()

# ---- OpenAI: state dict files, TorchScript archives, and writing OpenAI's layout for its build_model

@pytest.mark.parametrize('kind', small_configs)
def test_openai_files_load_and_save_back(kind, tmp_path, monkeypatch):
    config = small_configs[kind]
    theirs = openai_model(config).eval()
    image, text = inputs(config)
    reference = features(theirs, image, text)
    torch.save(theirs.state_dict(), tmp_path/'weights.pt')
    ours = CLIP.from_pretrained(tmp_path/'weights.pt', activation='quick_gelu')
    assert_same_features(ours, reference, image, text)
    if kind == 'vit':  # OpenAI's released files are TorchScript: the activation is read off them
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            torch.jit.save(torch.jit.trace(theirs, (image, text)), tmp_path/'ViT-small.pt')
        assert_same_features(no_warnings(lambda: CLIP.from_pretrained(tmp_path/'ViT-small.pt')), reference, image, text)
    # back to OpenAI's layout; its build_model infers the configuration (converting to fp16, left out here to compare in fp32)
    written = ours.save_pretrained(tmp_path/'openai', 'openai')
    monkeypatch.setattr(openai, 'convert_weights', lambda model: None)
    rebuilt = openai.build_model(torch.load(written[0], weights_only=True))
    assert_same_features(ours, features(rebuilt, image, text), image, text)
    assert_same_features(CLIP.from_pretrained(tmp_path/'openai', activation='quick_gelu'), reference, image, text)

# ---- open_clip: its hub/local-dir folders (open_clip_config.json and weights), written by open_clip's own code

open_clip_configs = {  # heads of 32 channels (ViT) and a 4-head attention pool (ResNet): not OpenAI's rule
    'vit': dict(embed_dim=48, vision_cfg=dict(image_size=32, layers=2, width=128, head_width=32, patch_size=8),
                text_cfg=dict(context_length=20, vocab_size=500, width=64, heads=2, layers=2)),
    'resnet': dict(embed_dim=48, vision_cfg=dict(image_size=64, layers=[1, 2, 1, 2], width=16, head_width=128, patch_size=None),
                   text_cfg=dict(context_length=20, vocab_size=500, width=64, heads=2, layers=2))}

def open_clip_model(tmp_path, kind, quick_gelu, custom_text=False):
    "open_clip's model of one of `open_clip_configs` from `open_clip.create_model`, its weights randomised, and its config"
    name = f"cf-{kind}{'-quickgelu' if quick_gelu else ''}{'-custom-text' if custom_text else ''}"
    model_cfg = dict(open_clip_configs[kind], quick_gelu=quick_gelu, custom_text=custom_text)
    (tmp_path/f'{name}.json').write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path/f'{name}.json')
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    config = dict(image_size=model_cfg['vision_cfg']['image_size'], context_length=20, vocab_size=500)
    return randomise(model, inputs(config, bs=8, seed=3)[0]).eval(), model_cfg, config

@pytest.mark.parametrize('quick_gelu', [False, True], ids=['gelu', 'quickgelu'])
@pytest.mark.parametrize('kind', list(open_clip_configs))
def test_open_clip_folders_load_and_save_back(kind, quick_gelu, tmp_path):
    theirs, model_cfg, config = open_clip_model(tmp_path, kind, quick_gelu)
    folder = tmp_path/'hub'; folder.mkdir()
    save_config_for_hf(theirs, folder/'open_clip_config.json', model_cfg)
    if quick_gelu: save_file(theirs.state_dict(), folder/'open_clip_model.safetensors')
    else: torch.save(theirs.state_dict(), folder/'open_clip_pytorch_model.bin')
    image, text = inputs(config)
    reference = features(theirs, image, text)  # (for a ResNet, in channels-last layout from here on, as ours computes)
    ours = no_warnings(lambda: CLIP.from_pretrained(folder))  # heads and activation from the model config
    assert ours.config['activation'] == ('quick_gelu' if quick_gelu else 'gelu')
    assert ours.config['vision_heads'] == 4
    assert_same_features(ours, reference, image, text)
    # back: open_clip reads our folder itself, with its weights unchanged
    ours.save_pretrained(tmp_path/'ours', 'open_clip')
    rebuilt = open_clip.create_model(f"local-dir:{tmp_path/'ours'}")
    assert type(rebuilt) is type(theirs)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in theirs.state_dict().items())
    assert_same_features(ours, features(rebuilt, image, text), image, text)

def test_open_clip_custom_text_folder(tmp_path):
    "open_clip's `custom_text` models keep the text tower under `text.`"
    theirs, model_cfg, config = open_clip_model(tmp_path, 'vit', quick_gelu=False, custom_text=True)
    assert type(theirs).__name__ == 'CustomTextCLIP'
    image, text = inputs(config)
    save_config_for_hf(theirs, tmp_path/'open_clip_config.json', model_cfg)
    save_file(theirs.state_dict(), tmp_path/'open_clip_model.safetensors')
    assert_same_features(CLIP.from_pretrained(tmp_path), features(theirs, image, text), image, text)

# ---- Hugging Face: CLIPModel folders written by transformers, and ours read by transformers

def hf_model(hidden_act, eos_token_id, seed=0):
    "A small `transformers.CLIPModel`: towers of different widths, heads of 32 channels, weights moved off their initialisation"
    config = transformers.CLIPConfig(projection_dim=48,
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, hidden_act=hidden_act, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                           patch_size=8, hidden_act=hidden_act))
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std().clamp(min=0.05) if p.numel() > 1 else 0.1  # norms' weights are all ones: still move them
            p.add_(0.3 * scale * torch.randn(p.shape, generator=generator))
    return model.eval()

def hf_features(model, image, text):
    "Hugging Face's projected image and text features (transformers 5 wraps them in an output object)"
    with torch.no_grad():
        out = model.get_image_features(pixel_values=image), model.get_text_features(input_ids=text)
    return [o if isinstance(o, torch.Tensor) else o.pooler_output for o in out]

captions = ['a photo of a cat', 'a diagram of a suspension bridge at night', 'two dogs', 'an astronaut riding a horse on the moon']

def hf_inputs():
    "Images, and ClipTokenizer's ids of captions of several lengths (end-of-text 49407 then zeros)"
    image = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return image, ClipTokenizer()(captions)

@pytest.mark.parametrize('hidden_act,eos_token_id,weights', [('quick_gelu', 2, 'bin'), ('gelu', 49407, 'safetensors'),
                                                              ('quick_gelu', 49407, 'safetensors')])
def test_hf_folders_load_and_save_back(hidden_act, eos_token_id, weights, tmp_path):
    theirs = hf_model(hidden_act, eos_token_id)
    image, text = hf_inputs()
    reference = hf_features(theirs, image, text)
    if weights == 'bin':  # as older transformers wrote it: pytorch_model.bin, with the position_ids buffers
        theirs.config.save_pretrained(tmp_path/'hf')
        torch.save({**theirs.state_dict(), 'text_model.embeddings.position_ids': torch.arange(77)[None],
                    'vision_model.embeddings.position_ids': torch.arange(17)[None]}, tmp_path/'hf'/'pytorch_model.bin')
    else: theirs.save_pretrained(tmp_path/'hf')
    ours = no_warnings(lambda: CLIP.from_pretrained(tmp_path/'hf'))
    assert (ours.config['vision_heads'], ours.config['transformer_heads'], ours.config['activation']) == (3, 2, hidden_act)
    assert ours.logit_scale.item() == theirs.logit_scale.item()
    assert_same_features(ours, reference, image, text)
    # back: transformers reads our folder, every key used, and computes the same features
    ours.save_pretrained(tmp_path/'ours', 'hf')
    rebuilt, info = transformers.CLIPModel.from_pretrained(tmp_path/'ours', output_loading_info=True)
    assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in theirs.state_dict().items())
    assert_same_features(ours, hf_features(rebuilt.eval(), image, text), image, text)
    config = transformers.CLIPConfig.from_pretrained(tmp_path/'ours')
    assert (config.vision_config.num_attention_heads, config.text_config.hidden_act, config.projection_dim) == (3, hidden_act, 48)

def test_hf_text_feature_at_the_end_of_text_token():
    "With eos_token_id 49407 Hugging Face reads the first end-of-text token; CLIP the highest id: the same for our ids"
    theirs = hf_model('quick_gelu', 49407)
    ours = CLIP.from_pretrained(theirs)
    image, text = hf_inputs()
    padded_with_eot = text.clone()
    padded_with_eot[padded_with_eot == 0] = 49407  # as Hugging Face's CLIP tokenizer pads
    for ids in (text, padded_with_eot):
        torch.testing.assert_close(features(ours, image, ids)[1], hf_features(theirs, image, ids)[1], atol=1e-5, rtol=0)

def test_openai_weights_to_hf():
    "OpenAI's ViT, read by CLIP and written for Hugging Face, gives OpenAI's features in transformers"
    config = dict(small_configs['vit'], vocab_size=49408, context_length=77)
    theirs = openai_model(config).eval()
    image, text = inputs(config)
    ours = CLIP.from_pretrained(theirs)
    rebuilt = transformers.CLIPModel(transformers.CLIPConfig(**hf_config(ours.config))).eval()
    rebuilt.load_state_dict(clip_to_hf_state_dict(ours.state_dict()), strict=True)
    assert_same_features(ours, hf_features(rebuilt, image, text), image, text)
    torch.testing.assert_close(hf_features(rebuilt, image, text)[0], features(theirs, image, text)[0], atol=1e-5, rtol=0)

def test_realistic_size_open_clip_vit_b_32_to_hf(tmp_path):
    "open_clip's ViT-B-32 (exact GELU), read by CLIP and written for Hugging Face: open_clip's features in transformers"
    torch.manual_seed(0)
    theirs = open_clip.create_model('ViT-B-32', pretrained=None)
    config = dict(image_size=224, context_length=77, vocab_size=49408)
    randomise(theirs, inputs(config, bs=2, seed=3)[0]).eval()
    image, text = inputs(config, bs=2)
    reference = features(theirs, image, text)
    ours = no_warnings(lambda: CLIP.from_pretrained(theirs))  # the module's exact GELU is read off it
    assert_same_features(ours, reference, image, text)
    ours.save_pretrained(tmp_path, 'hf')
    del ours
    rebuilt = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    for mine, expected in zip(hf_features(rebuilt, image, text), reference):
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0)

# every open_clip configuration with OpenAI's architecture, in both activations, reads as our table's configuration
open_clip_names = {'RN50': 'RN50', 'RN101': 'RN101', 'RN50x4': 'RN50x4', 'RN50x16': 'RN50x16', 'RN50x64': 'RN50x64',
                   'ViT-B-32': 'ViT-B/32', 'ViT-B-16': 'ViT-B/16', 'ViT-L-14': 'ViT-L/14', 'ViT-L-14-336': 'ViT-L/14@336px'}

@pytest.mark.parametrize('suffix,activation', [('', 'gelu'), ('-quickgelu', 'quick_gelu')])
@pytest.mark.parametrize('open_clip_name', list(open_clip_names))
def test_every_open_clip_config(open_clip_name, suffix, activation):
    import open_clip
    from clip_fastai.model import clip_config
    from clip_fastai.pretrained import clip_config_from_open_clip
    config = clip_config_from_open_clip(open_clip.get_model_config(open_clip_name + suffix))
    expected = clip_config(open_clip_names[open_clip_name])
    assert {k: config[k] for k in expected} == expected, (config, expected)
    width = expected['vision_width']
    openai_heads = width // 64 if isinstance(expected['vision_layers'], int) else width * 32 // 64
    assert (config['activation'], config['vision_heads']) == (activation, openai_heads), config
