"""Compare `clip_fastai.model` with OpenAI's reference `model.py` (from the clip-anytorch wheel) and open_clip: weights,
initialisation, outputs, gradients and sizes; and `CLIP.from_state_dict` on every checkpoint form, with its errors."""
import tempfile, warnings
from pathlib import Path
import pytest, torch
import open_clip
from clip_fastai.model import *
from clip_fastai.model import infer_clip_config, load_clip_state_dict

from reference import openai_code, openai_arguments

openai = openai_code('model')

# small configs with several heads in every attention, and a ResNet whose pooling sees a 2x2 map
small_configs = {
    'vit': dict(embed_dim=48, image_size=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                context_length=20, vocab_size=500, transformer_width=128, transformer_heads=2, transformer_layers=3),
    'resnet': dict(embed_dim=48, image_size=64, vision_layers=(1, 2, 1, 2), vision_width=16, vision_patch_size=None,
                   context_length=20, vocab_size=500, transformer_width=128, transformer_heads=2, transformer_layers=2),
}

published = [name for name in clip_configs if not name.startswith('tiny-')]

def randomise(model, image, seed=0):
    "`model` (OpenAI's or open_clip's CLIP) with weights well away from the initialisation and BatchNorm statistics of `image`"
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point(): continue
            scale = tensor.std() if tensor.numel() > 1 and tensor.std() > 0 else 0.1
            tensor.add_(0.3 * scale * torch.randn(tensor.shape, generator=generator))
            if name.endswith('bn3.weight'): tensor.copy_(torch.rand(tensor.shape, generator=generator))  # not 0: use the branch
        # running statistics of one batch, so that in eval the ResNet's features still vary between images
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms: m.momentum = 1.0
        model.train().encode_image(image)
        for m in norms: m.momentum = 0.1
    return model

def openai_model(config, seed=0):
    "OpenAI's CLIP for `config`, its weights randomised well away from the initialisation (BatchNorm statistics too)"
    torch.manual_seed(seed)
    return randomise(openai.CLIP(**openai_arguments(config)), inputs(config, bs=8, seed=seed + 2)[0], seed)

def inputs(config, bs=4, seed=2):
    "Images and token ids of several lengths, each ending with the end-of-text token (the largest id)"
    generator = torch.Generator().manual_seed(seed)
    size = config['image_size']
    image = torch.randn(bs, 3, size, size, generator=generator)
    text = torch.randint(1, config['vocab_size'] - 1, (bs, config['context_length']), generator=generator)
    for i, length in enumerate(torch.randint(2, config['context_length'], (bs,), generator=generator)):
        text[i, length] = config['vocab_size'] - 1
        text[i, length + 1:] = 0
    return image, text

@pytest.mark.parametrize('kind', small_configs)
def test_same_initialisation_as_openai(kind):
    "With the same seed, our constructor draws exactly OpenAI's initial weights"
    config = small_configs[kind]
    torch.manual_seed(0); theirs = openai.CLIP(**openai_arguments(config)).state_dict()
    torch.manual_seed(0); ours = CLIP(**config).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs: assert torch.equal(ours[k], theirs[k]), k
    assert abs(ours['logit_scale'].item() - 2.6592600) < 1e-6  # ln(1/0.07)

@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('kind', small_configs)
def test_features_logits_and_gradients_match_openai(kind, mode):
    config = small_configs[kind]
    theirs = openai_model(config)
    ours = CLIP.from_state_dict(theirs.state_dict(), activation='quick_gelu')
    getattr(theirs, mode)(); getattr(ours, mode)()
    image, text = inputs(config)
    if isinstance(ours.visual, ModifiedResNet):
        # our ResNet computes in channels-last memory layout, for speed; OpenAI's in the same layout makes
        # PyTorch pick the same convolution kernels, so what is compared is the arithmetic, not the rounding
        theirs.visual.to(memory_format=torch.channels_last)
        image_theirs = theirs.encode_image(image.contiguous(memory_format=torch.channels_last))
    else: image_theirs = theirs.encode_image(image)
    image_ours = ours.encode_image(image)
    text_theirs, text_ours = theirs.encode_text(text), ours.encode_text(text)
    for features in (image_theirs, text_theirs):  # not a degenerate comparison: features differ between items
        assert features.std(dim=0).mean() > 0.01
    torch.testing.assert_close(image_ours, image_theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_ours, text_theirs, atol=1e-5, rtol=0)
    logits_per_image, logits_per_text = theirs(image, text)
    image_features, text_features, logit_scale = ours(image, text)
    logits = logit_scale * image_features @ text_features.t()
    torch.testing.assert_close(logits, logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.t(), logits_per_text, atol=1e-5, rtol=0)
    if mode == 'train':
        # the same loss gives the same gradients (and, for the ResNet, the same BatchNorm statistics)
        labels = torch.arange(len(image))
        def loss(logits): return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
        loss(logits_per_image).backward(); loss(logits).backward()
        grads_theirs = {k: p.grad for k, p in theirs.named_parameters()}
        for k, p in ours.named_parameters():  # fp32 rounding, relative to the size of each gradient
            scale = grads_theirs[k].abs().max().clamp(min=1).item()
            torch.testing.assert_close(p.grad, grads_theirs[k], atol=5e-5 * scale, rtol=0)
        buffers = dict(theirs.named_buffers())
        for k, b in ours.named_buffers(): torch.testing.assert_close(b, buffers[k], atol=1e-6, rtol=0, msg=k)

@pytest.mark.parametrize('kind', small_configs)
def test_from_state_dict_reads_openai_config_and_fp16_weights(kind):
    "OpenAI's released checkpoints are fp16 and, from TorchScript, carry three metadata entries"
    config = small_configs[kind]
    theirs = openai_model(config)
    openai.convert_weights(theirs)  # what `clip.load` gives: fp16 linear/conv/attention weights
    state_dict = dict(theirs.state_dict(), input_resolution=torch.tensor(config['image_size']),
                      context_length=torch.tensor(config['context_length']), vocab_size=torch.tensor(config['vocab_size']))
    reference = openai.build_model(dict(state_dict))  # OpenAI's own inference of the configuration
    inferred = infer_clip_config(state_dict)
    assert inferred == {**config, 'transformer_heads': config['transformer_width'] // 64,
                        'vision_heads': openai_vision_heads(reference)}
    ours = CLIP.from_state_dict(state_dict, activation='quick_gelu')
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    for k, v in reference.state_dict().items(): assert torch.equal(ours.state_dict()[k], v.float()), k
    assert ours.transformer.heads == reference.transformer.resblocks[0].attn.num_heads
    assert CLIP.from_state_dict(state_dict, transformer_heads=4, activation='quick_gelu').transformer.heads == 4

def openai_vision_heads(model):
    "Heads of OpenAI's image tower: of the ViT's blocks, or of the ResNet's attention pool"
    visual = model.visual
    return visual.attnpool.num_heads if hasattr(visual, 'attnpool') else visual.transformer.resblocks[0].attn.num_heads

def test_load_error_names_the_keys():
    ours = CLIP(**small_configs['vit'])
    state_dict = ours.state_dict()
    state_dict.pop('ln_final.bias')
    state_dict['visual.extra'] = torch.zeros(1)
    state_dict['text_projection'] = torch.zeros(128, 32)
    with pytest.raises(RuntimeError) as error:
        load_clip_state_dict(CLIP(**small_configs['vit']), state_dict)
    message = str(error.value)
    for expected in ['missing keys (1): ln_final.bias', 'unexpected keys (1): visual.extra', 'text_projection (checkpoint (128, 32), model (128, 48))']:
        assert expected in message, message
    with pytest.raises(RuntimeError, match='mis-shaped'):  # a ViT checkpoint into a model with another patch size
        load_clip_state_dict(CLIP(**dict(small_configs['vit'], vision_patch_size=16)), CLIP(**small_configs['vit']).state_dict())

@pytest.mark.parametrize('name', published)
def test_published_configs_match_openai(name):
    "Every published config has OpenAI's parameter names, shapes and count (built on the meta device: no memory)"
    config = clip_config(name)
    with torch.device('meta'):
        theirs, ours = openai.CLIP(**openai_arguments(config)), CLIP(**config)
    shapes_theirs = {k: v.shape for k, v in theirs.state_dict().items()}
    shapes_ours = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes_ours == shapes_theirs
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    # heads follow the 64-per-head rule in all of them, and `config` records them
    assert infer_clip_config(theirs.state_dict()) == {**config, 'vision_heads': openai_vision_heads(theirs)}
    assert ours.config == {**config, 'vision_heads': openai_vision_heads(theirs), 'activation': 'quick_gelu'}

def test_published_sizes():
    "Facts from the model card / released checkpoints, independent of any code"
    expected = {'RN50': (1024, 224, 64, 512), 'RN101': (512, 224, 64, 512), 'RN50x4': (640, 288, 80, 640),
                'RN50x16': (768, 384, 96, 768), 'RN50x64': (1024, 448, 128, 1024), 'ViT-B/32': (512, 224, 768, 512),
                'ViT-B/16': (512, 224, 768, 512), 'ViT-L/14': (768, 224, 1024, 768), 'ViT-L/14@336px': (768, 336, 1024, 768)}
    for name, (embed, resolution, vision_width, text_width) in expected.items():
        config = clip_config(name)
        assert (config['embed_dim'], config['image_size'], config['vision_width'], config['transformer_width']) == \
               (embed, resolution, vision_width, text_width), name
    with torch.device('meta'): model = CLIP.from_config('ViT-B/32')
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 151.3  # ViT-B/32 has 151.3M parameters

def mlp_activations(model):
    "The types of the activation of every residual block's MLP in `model`"
    return {type(m) for name, m in model.named_modules() if name.endswith('mlp.gelu')}

def features(model, image, text):
    "Image and text features of `model` in eval mode; a ResNet image tower computes in channels-last layout, as ours does"
    model.eval()
    if hasattr(model.visual, 'attnpool'):
        model.visual.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(): return model.encode_image(image), model.encode_text(text)

@pytest.mark.parametrize('name', ['ViT-B-32', 'RN50'])
def test_open_clip_exact_gelu_configs(name):
    "open_clip's configs without `-quickgelu` use the exact GELU: with activation='gelu' we compute their features"
    torch.manual_seed(0)
    theirs = open_clip.create_model(name, pretrained=None)
    assert mlp_activations(theirs) == {torch.nn.GELU}
    config = dict(image_size=224, context_length=77, vocab_size=49408)
    randomise(theirs, inputs(config, bs=4, seed=3)[0])
    image, text = inputs(config, bs=2)
    image_theirs, text_theirs = features(theirs, image, text)
    for f in (image_theirs, text_theirs): assert f.std(dim=0).mean() > 0.01  # not degenerate
    ours = CLIP.from_state_dict(theirs.state_dict(), activation='gelu')
    assert mlp_activations(ours) == {torch.nn.GELU} and ours.config['activation'] == 'gelu'
    image_ours, text_ours = features(ours, image, text)
    torch.testing.assert_close(image_ours, image_theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_ours, text_theirs, atol=1e-5, rtol=0)
    del ours
    # the same weights under QuickGELU give other features (the ResNet's image tower has no residual attention block)
    with pytest.warns(UserWarning, match="assuming QuickGELU"):
        quick = CLIP.from_state_dict(theirs.state_dict())
    image_quick, text_quick = features(quick, image, text)
    assert (text_quick - text_theirs).abs().max() > 1e-3
    if name == 'ViT-B-32': assert (image_quick - image_theirs).abs().max() > 1e-3
    else: torch.testing.assert_close(image_quick, image_theirs, atol=1e-5, rtol=0)

@pytest.mark.parametrize('kind', small_configs)
def test_every_checkpoint_form_loads(kind, tmp_path):
    "Our saved form, a file of it, a plain state dict (file), open_clip's training checkpoint, modules and TorchScript"
    config = small_configs[kind]
    theirs = openai_model(config).eval()
    image, text = inputs(config)
    expected = features(theirs, image, text)
    def check(model):
        "`model` gives OpenAI's features"
        for ours, reference in zip(features(model, image, text), expected): torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        return model
    def load(source, warns=False, **kwargs):
        "`CLIP.from_state_dict(source)`, with exactly one activation warning if `warns`, else none"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            model = CLIP.from_state_dict(source, **kwargs)
        ours = [w for w in caught if issubclass(w.category, UserWarning) and 'activation' in str(w.message)]
        assert len(ours) == (1 if warns else 0), [str(w.message) for w in ours]
        return check(model)
    # (a) a plain state dict, in memory and in a file: the activation is assumed, with a warning
    plain = theirs.state_dict()
    model = load(plain, warns=True)
    torch.save(plain, tmp_path/'plain.pt')
    load(tmp_path/'plain.pt', warns=True); load(str(tmp_path/'plain.pt'), activation='quick_gelu')
    # (b, c) our form, exactly as other modules save it; nothing inferred, no warning; overrides apply
    torch.save({'config': model.config, 'state_dict': model.state_dict()}, tmp_path/'ours.pth')
    loaded = load(tmp_path/'ours.pth')
    assert loaded.config == model.config
    assert load(tmp_path/'ours.pth', grad_checkpointing=True).transformer.grad_checkpointing
    # open_clip's training checkpoint, saved from DDP (`module.`) and torch.compile (`_orig_mod.`), with its mask buffer
    wrapped = {f'module._orig_mod.{k}': v for k, v in plain.items()} | {'module.attn_mask': torch.zeros(3, 3)}
    torch.save({'epoch': 2, 'name': 'run', 'state_dict': wrapped, 'optimizer': {'state': {}}}, tmp_path/'epoch_2.pt')
    load(tmp_path/'epoch_2.pt', activation='quick_gelu')
    # (e) modules: ours (its config), OpenAI's (its QuickGELU read off the modules)
    load(model); load(theirs)
    # (d) TorchScript, as OpenAI released their weights: the traced module and its archive file
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(theirs, (image, text))
    torch.jit.save(traced, tmp_path/'openai.pt')
    load(traced); load(tmp_path/'openai.pt')
    load(tmp_path/'openai.pt', activation='quick_gelu')

def test_what_cannot_be_read_is_named(tmp_path):
    model = CLIP(**small_configs['vit'])
    for source in (3, [model.state_dict()], b'weights'):
        with pytest.raises(TypeError, match=rf"cannot read a builtins\.{type(source).__name__}: it accepts a state dict"):
            CLIP.from_state_dict(source)
    with pytest.raises(TypeError, match="Entry 'model_state' of the state dict is a dict, not a tensor"):
        CLIP.from_state_dict({'model_state': dict(model.state_dict())})
    with pytest.raises(FileNotFoundError, match='No checkpoint file at'): CLIP.from_state_dict(tmp_path/'absent.pt')
    torch.save({'state_dict': model.state_dict(), 'criterion': torch.nn.CrossEntropyLoss()}, tmp_path/'pickled.pt')
    with pytest.raises(ValueError, match=r'torch\.load\(weights_only=True\) refuses'): CLIP.from_state_dict(tmp_path/'pickled.pt')
    with pytest.raises(ValueError, match="activation must be one of 'quick_gelu', 'gelu', not 'relu'"):
        CLIP(**small_configs['vit'], activation='relu')
    with pytest.raises(ValueError, match="not 'GELU'"): CLIP.from_state_dict(model.state_dict(), activation='GELU')

def test_heads_that_the_weights_cannot_tell():
    "A text tower of width 96 with 3 heads: a plain state dict asks for them; given or recorded, the features are OpenAI's"
    config = dict(small_configs['vit'], transformer_width=96, transformer_heads=3)
    theirs = openai_model(config).eval()
    image, text = inputs(config)
    _, text_theirs = features(theirs, image, text)
    with pytest.raises(ValueError, match=r'text tower has width 96, not a multiple of 64.*pass transformer_heads='):
        CLIP.from_state_dict(theirs.state_dict(), activation='quick_gelu')
    given = CLIP.from_state_dict(theirs.state_dict(), transformer_heads=3, activation='quick_gelu')
    torch.testing.assert_close(features(given, image, text)[1], text_theirs, atol=1e-5, rtol=0)
    recorded = CLIP.from_state_dict({'config': given.config, 'state_dict': given.state_dict()})
    assert recorded.transformer.heads == 3
    torch.testing.assert_close(features(recorded, image, text)[1], features(given, image, text)[1], atol=0, rtol=0)
    # OpenAI's rule would have built 1 head, silently computing other features
    one_head = CLIP.from_state_dict(theirs.state_dict(), transformer_heads=1, activation='quick_gelu')
    assert (features(one_head, image, text)[1] - text_theirs).abs().max() > 1e-3
    # the same for the image tower: a ViT of width 96, and a ResNet whose pool has 2 heads is read as 4 unless told
    vit96 = CLIP(**dict(small_configs['vit'], vision_width=96), vision_heads=3)
    with pytest.raises(ValueError, match=r'ViT has width 96, not a multiple of 64.*pass vision_heads='):
        CLIP.from_state_dict(vit96.state_dict(), activation='quick_gelu')
    assert CLIP.from_state_dict(vit96.state_dict(), vision_heads=3, activation='quick_gelu').config == vit96.config

def without(state_dict, *keys): return {k: v for k, v in state_dict.items() if k not in keys}

@pytest.mark.parametrize('kind', small_configs)
def test_inference_errors_name_the_key_and_tower(kind):
    state_dict = CLIP(**small_configs[kind]).state_dict()
    tower = {'vit': 'ViT', 'resnet': 'ResNet'}[kind]
    position = 'visual.positional_embedding' if kind == 'vit' else 'visual.attnpool.positional_embedding'
    def fails(sd, error, match):
        with pytest.raises(error, match=match): CLIP.from_state_dict(sd, activation='quick_gelu')
    fails(without(state_dict, position, 'text_projection'), ValueError, rf'This {tower} state dict lacks {position}, text_projection')
    fails({**state_dict, 'ln_final.weight': torch.zeros(0)}, ValueError, rf'ln_final.weight of this {tower} state dict has shape \(0,\)')
    fails({**state_dict, 'ln_final.weight': torch.zeros(128, 1)}, ValueError, r'has shape \(128, 1\): expected 1 non-zero sizes')
    fails({**state_dict, position: state_dict[position][:-1]}, ValueError, 'not a square grid of positions plus one')
    fails({k: v for k, v in state_dict.items() if not k.startswith('visual.')}, ValueError, 'Cannot tell the image tower.*no visual')
    # a key not needed for the configuration is named by the load
    fails(without(state_dict, 'visual.proj' if kind == 'vit' else 'visual.attnpool.c_proj.weight'), RuntimeError, 'missing keys \\(1\\)')

def test_vit_without_proj_is_still_a_vit():
    "Before: a ViT state dict without `visual.proj` was taken for a ResNet and failed with KeyError: 'visual.layer1.0.conv1.weight'"
    state_dict = without(CLIP(**small_configs['vit']).state_dict(), 'visual.proj')
    with pytest.raises(RuntimeError, match=r'missing keys \(1\): visual\.proj$'):
        CLIP.from_state_dict(state_dict, activation='quick_gelu')
    found = {k: v for k, v in state_dict.items() if not k.startswith('visual.transformer.')}
    with pytest.raises(ValueError, match='this state dict has visual.class_embedding, visual.conv1, visual.ln_post, visual.ln_pre'):
        CLIP.from_state_dict(found, activation='quick_gelu')

def test_public_names():
    import clip_fastai.model as model
    internals = {'split_heads', 'merge_heads', 'LayerNorm', 'QuickGELU', 'MultiheadAttention', 'ResidualAttentionBlock',
                 'chunk_blocks', 'batchnorm_statistics_kept', 'run_blocks', 'GradCheckpointing', 'Transformer',
                 'VisionTransformer', 'Bottleneck', 'AttentionPool2d', 'infer_clip_config', 'load_clip_state_dict'}
    assert not internals & set(model.__all__), internals & set(model.__all__)
    assert {'CLIP', 'ModifiedResNet', 'clip_config', 'clip_configs'} <= set(model.__all__)
    assert all(hasattr(model, name) for name in internals)  # still importable by name
