"Compare `clip_fastai.model` with OpenAI's reference `model.py` (from the clip-anytorch wheel): weights, initialisation, outputs, gradients and sizes."
import importlib.util, sysconfig
from pathlib import Path
import pytest, torch
from clip_fastai.model import *

def _load_openai_model():
    "OpenAI's `clip/model.py`, imported as a file (its package `__init__` needs pkg_resources)"
    path = Path(sysconfig.get_paths()['purelib'])/'clip'/'model.py'
    spec = importlib.util.spec_from_file_location('openai_clip_model', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

openai = _load_openai_model()

# small configs with several heads in every attention, and a ResNet whose pooling sees a 2x2 map
small_configs = {
    'vit': dict(embed_dim=48, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                context_length=20, vocab_size=500, transformer_width=128, transformer_heads=2, transformer_layers=3),
    'resnet': dict(embed_dim=48, image_resolution=64, vision_layers=(1, 2, 1, 2), vision_width=16, vision_patch_size=None,
                   context_length=20, vocab_size=500, transformer_width=128, transformer_heads=2, transformer_layers=2),
}

published = {'RN50': rn50_config, 'RN101': rn101_config, 'RN50x4': rn50x4_config, 'RN50x16': rn50x16_config,
             'RN50x64': rn50x64_config, 'ViT-B/32': vitb32_config, 'ViT-B/16': vitb16_config,
             'ViT-L/14': vitl14_config, 'ViT-L/14@336px': vitl14_336_config}

def openai_model(config, seed=0):
    "OpenAI's CLIP for `config`, its weights randomised well away from the initialisation (BatchNorm statistics too)"
    torch.manual_seed(seed)
    model = openai.CLIP(**config)
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
        model.encode_image(inputs(config, bs=8, seed=seed + 2)[0])
        for m in norms: m.momentum = 0.1
    return model

def inputs(config, bs=4, seed=2):
    "Images and token ids of several lengths, each ending with the end-of-text token (the largest id)"
    generator = torch.Generator().manual_seed(seed)
    size = config['image_resolution']
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
    torch.manual_seed(0); theirs = openai.CLIP(**config).state_dict()
    torch.manual_seed(0); ours = CLIP(**config).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs: assert torch.equal(ours[k], theirs[k]), k
    assert abs(ours['logit_scale'].item() - 2.6592600) < 1e-6  # ln(1/0.07)

@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('kind', small_configs)
def test_features_logits_and_gradients_match_openai(kind, mode):
    config = small_configs[kind]
    theirs = openai_model(config)
    ours = CLIP.from_state_dict(theirs.state_dict())
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
    state_dict = dict(theirs.state_dict(), input_resolution=torch.tensor(config['image_resolution']),
                      context_length=torch.tensor(config['context_length']), vocab_size=torch.tensor(config['vocab_size']))
    reference = openai.build_model(dict(state_dict))  # OpenAI's own inference of the configuration
    inferred = infer_clip_config(state_dict)
    assert inferred == {**config, 'transformer_heads': config['transformer_width'] // 64}
    ours = CLIP.from_state_dict(state_dict)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    for k, v in reference.state_dict().items(): assert torch.equal(ours.state_dict()[k], v.float()), k
    assert ours.transformer.heads == reference.transformer.resblocks[0].attn.num_heads
    assert CLIP.from_state_dict(state_dict, transformer_heads=4).transformer.heads == 4

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
    config = published[name]()
    with torch.device('meta'):
        theirs, ours = openai.CLIP(**config), CLIP(**config)
    shapes_theirs = {k: v.shape for k, v in theirs.state_dict().items()}
    shapes_ours = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes_ours == shapes_theirs
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert infer_clip_config(theirs.state_dict()) == config  # heads follow the 64-per-head rule in all of them

def test_published_sizes():
    "Facts from the model card / released checkpoints, independent of any code"
    expected = {'RN50': (1024, 224, 64, 512), 'RN101': (512, 224, 64, 512), 'RN50x4': (640, 288, 80, 640),
                'RN50x16': (768, 384, 96, 768), 'RN50x64': (1024, 448, 128, 1024), 'ViT-B/32': (512, 224, 768, 512),
                'ViT-B/16': (512, 224, 768, 512), 'ViT-L/14': (768, 224, 1024, 768), 'ViT-L/14@336px': (768, 336, 1024, 768)}
    for name, (embed, resolution, vision_width, text_width) in expected.items():
        config = published[name]()
        assert (config['embed_dim'], config['image_resolution'], config['vision_width'], config['transformer_width']) == \
               (embed, resolution, vision_width, text_width), name
    with torch.device('meta'): model = CLIP(**vitb32_config())
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 151.3  # ViT-B/32 has 151.3M parameters
