"""`ClipTokenizer` against OpenAI's `simple_tokenizer.py` (clip-anytorch wheel) and open_clip's tokenizer,
token for token, on a seeded corpus of a few thousand varied strings."""
import functools, html, random
from pathlib import Path

import ftfy, pytest, torch
import open_clip

from clip_fastai.tokenizer import ClipTokenizer, clean_text

# ---------------------------------------------------------------------------------------------------------------
# References

from reference import openai_code

openai_module = openai_code('simple_tokenizer')
# The reference reads its own copy of the vocabulary, which also checks the file we ship
openai_tokenizer = openai_module.SimpleTokenizer()
SOT, EOT, CONTEXT = 49406, 49407, 77

@functools.lru_cache(maxsize=None)
def _openai_ids(text): return (SOT, *openai_tokenizer.encode(text), EOT)

def openai_ids(text):
    "OpenAI's ids of `text` with sot and eot, not truncated"
    return list(_openai_ids(text))

def openai_row(text, context_length=CONTEXT):
    "A padded row as OpenAI's `clip.tokenize(truncate=True)` makes it (clip/clip.py needs pkg_resources)"
    ids = openai_ids(text)
    if len(ids) > context_length: ids = ids[:context_length-1] + [EOT]
    return ids + [0] * (context_length - len(ids))

def openai_clean(text): return openai_module.whitespace_clean(openai_module.basic_clean(text)).lower()

# ---------------------------------------------------------------------------------------------------------------
# A seeded corpus

NOUNS = ['cat', 'dog', 'horse', 'bicycle', 'pizza', 'giraffe', 'laptop', 'umbrella', 'train', 'surfboard',
         'kitchen', 'teddy bear', 'traffic light', 'zebra', 'sandwich', 'skateboarder', 'airplane', 'bowl']
ADJECTIVES = ['red', 'small', 'fluffy', 'old', 'wooden', 'shiny', 'blurry', 'black and white', 'colorful', 'wet']
VERBS = ['sitting', 'standing', 'running', 'lying', 'eating', 'parked', 'flying', 'sleeping', 'jumping']
PLACES = ['on a table', 'in the grass', 'next to a window', 'on the beach', 'in a kitchen', 'under a tree',
          'near the ocean', 'at night', 'on a city street', 'in the snow']
TEMPLATES = ['a photo of a {adj} {noun}.', 'A {adj} {noun} {verb} {place}', 'There is a {noun} {verb} {place}.',
             'Two {noun}s {verb} {place}!', '{adj} {noun}, {verb} {place}...', "the {noun}'s owner is {verb} {place}",
             'Close-up of a {noun} {place} (taken in {year})', '{noun} #{year} @photographer']
ACCENTED = ['café', 'naïve', 'résumé', 'jalapeño', 'Zürich', 'São Paulo', 'smørrebrød', 'Ærø', 'façade', 'coöperate',
            'Dvořák', 'Łódź', 'İstanbul', 'straße', 'ΑΘΗΝΑ', 'Москва', 'Привет мир', 'שלום', 'مرحبا بالعالم', 'नमस्ते',
            'สวัสดี', 'Ελληνικά', 'Ångström', 'crème brûlée', 'piñata', 'Œuvre', 'Ñandú', 'ﬁancé', 'Ǆungla']
CJK = ['東京タワーの写真', '一只猫坐在沙发上', '강아지가 공원에서 뛰어요', '北京', 'ラーメン', '한국어', '日本語のテキスト', '汉字',
       '猫', 'ｶﾀｶﾅ', '富士山と桜', '我爱你', '사랑해요', 'こんにちは世界']
EMOJI = ['😀', '🐱', '🐶', '👍🏽', '👨\u200d👩\u200d👧\u200d👦', '🇯🇵', '🇺🇸', '❤️', '🎉', '✨', '🔥', '🏳️\u200d🌈',
         '👩🏿\u200d🚀', '☕', '©', '™', '∞', '→', '★', '♪']
ENTITIES = ['&amp;', '&lt;', '&gt;', '&quot;', '&#39;', '&#x27;', '&nbsp;', '&amp;amp;', '&amp;quot;', '&copy;',
            '&eacute;', '&hellip;', '&#8217;', '&#x1F600;', '&notanentity;', '&', '&#0;', '&#x85;', '&#28;',
            '&amp;#39;', '&lt;b&gt;bold&lt;/b&gt;', '&amp;amp;amp;', '&AMP;', '&#150;', '&ltfoo', '&#xD800;', '& ;']
SPECIAL_LITERALS = ['<|startoftext|>', '<|endoftext|>', '<|ENDOFTEXT|>', '<start_of_text>', '<end_of_text>']
CONTRACTIONS = ["don't", "DON'T", "it's", "It'S", "they're", "we've", "I'm", "you'll", "he'd", "rock 'n' roll",
                "o'clock", "cat’s", "''s", "'s'", "ain't", "y'all'd've", "'LL", "the dogs' bowls"]
PUNCTUATION = ['!!!', '?!?!', '...', '---', '***', '((()))', '#hashtag', '@user', 'http://example.com/a?x=1&y=2',
               '</w>', 'a</w>b', '-_-', ':-)', '¯\\_(ツ)_/¯', '«quoted»', '“curly”', '„low“', '—', '…', '§§', '$100',
               '€5', '£3.50', '¥', '%', '^^', '~~~', '|', '\\', '`code`', '{json: 1}', '<b>bold</b>', '<br/>']
NUMBERS = ['0', '42', '3.14159', '1,000,000', '2024-05-01', '+1 (555) 123-4567', '10%', '1st', '2nd', '3rd',
           '1234567890', '007', '½', '²', 'Ⅻ', '٣٤٥', '①②', '१२३', '１２３', '0x1F', '1e-9', '-273.15°C']
WHITESPACE = ['\t', '\n', '\r\n', '\r', '\xa0', '\u3000', '\u2028', '\u2029', '\u200b', '\x0b', '\x0c', '\x1c',
              '\x1f', '\x85', '\x00', '\x7f', '\x1b[31m', '\u1680', '\u202f', '\ufeff', '  ', '\t \n']
ODD = ['ﬁ', 'ﬂ', 'ＬＯＵＤ　ＮＯＩＳＥＳ', 'e\u0301', 'İ', 'ß', '\u0345', 'Ǆ', 'ﬀ', 'ﬃ', '\u00ad', 'Ⓐ', '𝔘𝔫𝔦𝔠𝔬𝔡𝔢',
       '𝐁𝐨𝐥𝐝', 'Ａ', 'ａ', '\u0130stanbul', 'ΣΊΣΥΦΟΣ', 'ǈ', 'ꭰ', 'ᏸ', '\u1e9e', 'ﬅ', '\u2126', 'K', 'Å']
MOJIBAKE = ['Ã©', 'â€™', 'Ã¼ber', 'â€œquotedâ€\x9d', 'cafÃ©', 'Ã¢â‚¬â„¢', 'ð\x9f\x98\x80', 'â€¦', 'Ã\xa0 la']
RANGES = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x6ff), (0x900, 0x97f),
          (0x3040, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0x1f300, 0x1faff), (0x2000, 0x206f), (0xfe00, 0xfe0f),
          (0xff00, 0xffef), (0x0, 0x1f), (0x80, 0x9f), (0x1d400, 0x1d7ff), (0x10000, 0x1007f)]

def caption(rng):
    return rng.choice(TEMPLATES).format(adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS), verb=rng.choice(VERBS),
                                        place=rng.choice(PLACES), year=rng.randint(1900, 2030))

def vary_case(rng, text):
    return rng.choice([str.lower, str.upper, str.title, str.capitalize, lambda s: s])(text)

def mix(rng, pools, n_parts):
    "Parts drawn from `pools` joined by varied separators"
    parts = [rng.choice(rng.choice(pools)) for _ in range(n_parts)]
    text = ''
    for part in parts: text += part + rng.choice([' ', ' ', ' ', '', ', ', '  ', '\t', '\n', '-', '.'])
    return text

def mojibake(rng, text):
    "`text`'s UTF-8 bytes read as Windows-1252 or Latin-1, the way broken pipelines do"
    encoding = rng.choice(['cp1252', 'latin-1'])
    return text.encode('utf-8').decode(encoding, errors='replace')

def random_unicode(rng, n):
    chars = []
    while len(chars) < n:
        low, high = rng.choice(RANGES)
        c = rng.randint(low, high)
        if not 0xd800 <= c <= 0xdfff: chars.append(chr(c))
    return ''.join(chars)

def make_corpus(seed=0):
    "About 3,000 varied strings, the same on every run"
    rng = random.Random(seed)
    corpus = [caption(rng) for _ in range(400)]
    corpus += [vary_case(rng, caption(rng)) + rng.choice(['', '!!', ' :)', ' #tbt', '?', ' ...']) for _ in range(200)]
    corpus += [''.join(rng.choice('abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?\'"-()[]{}<>/\\|@#$%^*_+=~`')
                       for _ in range(rng.randint(1, 60))) for _ in range(250)]
    corpus += [mix(rng, [ACCENTED, NOUNS], rng.randint(1, 8)) for _ in range(200)]
    corpus += [vary_case(rng, mix(rng, [ACCENTED], rng.randint(1, 4))) for _ in range(100)]
    corpus += [mix(rng, [CJK, NOUNS, NUMBERS], rng.randint(1, 6)) for _ in range(150)]
    corpus += [mix(rng, [EMOJI, NOUNS, ADJECTIVES], rng.randint(1, 8)) for _ in range(150)]
    corpus += [mix(rng, [ENTITIES, NOUNS, PUNCTUATION], rng.randint(1, 6)) for _ in range(200)]
    corpus += [mojibake(rng, mix(rng, [ACCENTED, CJK, EMOJI, ['’', '“', '”', '–', '…']], rng.randint(1, 4)))
               for _ in range(120)] + MOJIBAKE
    corpus += [mix(rng, [NUMBERS, NOUNS], rng.randint(1, 6)) for _ in range(100)]
    corpus += [mix(rng, [CONTRACTIONS, PUNCTUATION, NOUNS], rng.randint(1, 6)) for _ in range(150)]
    corpus += [mix(rng, [WHITESPACE, NOUNS, ODD], rng.randint(1, 6)) for _ in range(120)]
    corpus += [mix(rng, [ODD, ACCENTED, NOUNS], rng.randint(1, 5)) for _ in range(100)]
    corpus += [random_unicode(rng, rng.randint(1, 30)) for _ in range(200)]
    corpus += [rng.choice(SPECIAL_LITERALS) + ' ' + caption(rng) + rng.choice(SPECIAL_LITERALS + ['']) for _ in range(20)]
    # Long texts: the truncation path
    corpus += [' '.join(caption(rng) for _ in range(rng.randint(8, 30))) for _ in range(80)]
    corpus += [mix(rng, [ACCENTED, CJK, EMOJI, NOUNS, ENTITIES], rng.randint(40, 120)) for _ in range(40)]
    corpus += [''.join(rng.choice(CJK) for _ in range(rng.randint(20, 60))) for _ in range(15)]
    corpus += [rng.choice(['1234567890', '🔥', 'ha', '!?', 'a ']) * rng.randint(40, 200) for _ in range(15)]
    corpus += ['a' * 500, 'supercalifragilisticexpialidocious' * 20, ' '.join(['word'] * 76), ' '.join(['word'] * 75)]
    # Empty and whitespace only
    corpus += ['', ' ', '   ', '\t\n', '\r\n', '\u3000', '\xa0\xa0', '&nbsp;', '\x00', '\u200b', ' \x0b \x0c ', '&#32;']
    corpus += SPECIAL_LITERALS + ENTITIES + CONTRACTIONS + PUNCTUATION + NUMBERS + WHITESPACE + ODD + EMOJI + CJK + ACCENTED
    return corpus

corpus = make_corpus()
# open_clip names its special tokens <start_of_text>/<end_of_text>: where a text spells either set out, the two
# references disagree, and we follow OpenAI.
has_special_literal = [any(s in openai_clean(t) for s in ('<|startoftext|>', '<|endoftext|>', '<start_of_text>', '<end_of_text>'))
                       for t in corpus]

@pytest.fixture(scope='module')
def tok(): return ClipTokenizer()

@pytest.fixture(scope='module')
def ids(tok): return tok(corpus)

# ---------------------------------------------------------------------------------------------------------------
# Tests

def test_corpus_is_varied():
    lengths = [len(openai_ids(t)) for t in corpus]
    assert len(corpus) >= 2000 and len(corpus) == len(make_corpus())
    assert sum(not t.isascii() for t in corpus) >= 800
    assert sum('&' in t for t in corpus) >= 150
    assert sum(n > CONTEXT for n in lengths) >= 120, "truncation path"
    assert sum(n == 2 for n in lengths) >= 15, "empty after cleaning"
    assert sum(has_special_literal) >= 20
    assert sum(openai_clean(t) != t.lower().strip() for t in corpus) >= 500, "cleaning changes many texts"

def test_vocabulary(tok):
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, SOT, EOT)
    assert tok.vocab == [openai_tokenizer.decoder[i] for i in range(49408)]

def test_clean_text_matches_openai():
    for text in corpus: assert clean_text(text) == openai_clean(text), repr(text)

def test_ascii_fast_path_is_exact():
    "Printable ASCII without '&' is what ftfy and HTML unescaping return unchanged, on the corpus and on random ASCII"
    rng = random.Random(1)
    printable = [chr(c) for c in range(0x20, 0x7f)]
    without_ampersand = [c for c in printable if c != '&']
    fuzz = [''.join(rng.choice(without_ampersand) for _ in range(rng.randint(0, 80))) for _ in range(10_000)]
    fuzz += [''.join(rng.choice(printable + ['&', '&amp;', '&#39;', '\t', '\n', '\x0b', '\x1b'])
                     for _ in range(rng.randint(0, 40))) for _ in range(2_000)]
    fast = 0
    for text in corpus + fuzz:
        if text.isascii() and text.isprintable() and '&' not in text:
            fast += 1
            assert ftfy.fix_text(text) == text and html.unescape(text) == text, repr(text)
        assert clean_text(text) == openai_clean(text), repr(text)
    assert fast >= 10_000

def test_matches_openai_untruncated():
    longest = max(len(openai_ids(t)) for t in corpus)
    wide = ClipTokenizer(context_length=longest)(corpus)
    for text, row in zip(corpus, wide.tolist()):
        assert row == openai_ids(text) + [0] * (longest - len(openai_ids(text))), repr(text)

def test_matches_openai_truncated(ids):
    assert ids.shape == (len(corpus), CONTEXT) and ids.dtype == torch.int64
    for text, row in zip(corpus, ids.tolist()): assert row == openai_row(text), repr(text)

def test_matches_open_clip(ids):
    "open_clip.tokenize truncates keeping eot last, like us"
    keep = [i for i, special in enumerate(has_special_literal) if not special]
    expected = open_clip.tokenize([corpus[i] for i in keep])
    assert len(keep) >= 2000
    assert torch.equal(ids[keep], expected)

def test_special_token_spellings_follow_openai(tok):
    "OpenAI's tokenizer turns a spelled-out <|endoftext|> into the eot id; so do we (open_clip does not)"
    row = tok('a <|endoftext|> b').tolist()
    assert row == openai_row('a <|endoftext|> b')
    assert row[:3] == [SOT, 320, EOT] and row[4] == EOT
    assert tok('<|startoftext|>')[:3].tolist() == [SOT, SOT, EOT]

def test_single_text_equals_batch_row(tok, ids):
    for i in range(0, len(corpus), 7): assert torch.equal(tok(corpus[i]), ids[i]), repr(corpus[i])

def test_small_cache_changes_nothing(ids):
    "A cache that keeps emptying itself gives the same ids"
    assert torch.equal(ClipTokenizer(cache_size=5)(corpus), ids)

def test_decode_matches_openai(tok, ids):
    texts = tok.decode(ids)
    assert isinstance(texts, list) and len(texts) == len(corpus)
    for text, row in zip(texts, ids.tolist()):
        end = row.index(EOT, 1)
        assert text == openai_tokenizer.decode(row[1:end]).strip(), repr(text)
    keep = [i for i, special in enumerate(has_special_literal) if not special]
    open_clip_tokenizer = open_clip.tokenizer.SimpleTokenizer()
    for i in keep[::5]:
        row = ids[i].tolist()
        assert tok.decode(ids[i]) == open_clip_tokenizer.decode(row[1:row.index(EOT, 1)]).strip()

def test_decode_of_plain_ascii_is_the_cleaned_text(tok):
    "Captions of words and spaces come back exactly as cleaned"
    for text in corpus[:400]:
        if all(c.isalnum() or c == ' ' for c in text): assert tok.decode(tok(text)) == clean_text(text)
