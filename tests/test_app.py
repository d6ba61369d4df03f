"`clip-fastai-app` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium"
import os, pickle, re, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest, torch
from clip_fastai.model import CLIP
from clip_fastai.tokenizer import ClipTokenizer
from clip_fastai.data import make_digits_folder
from clip_fastai.app import load_trained, classify_image, ImageIndex

root = Path(__file__).resolve().parents[1]
artifacts = root/'tests'/'artifacts' # screenshots, ignored by git
command = Path(sys.executable).parent/'clip-fastai-app'
pytestmark = pytest.mark.xdist_group('app') # one server and one browser at a time

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def stderr_lines(result):
    "`result`'s stderr lines, without the warning fastai's import gives with recent PyTorch"
    return [l for l in result.stderr.splitlines() if 'torch.jit.script' not in l and l.strip() != 'warnings.warn(']

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    "A random tiny ViT saved as `clip-fastai-train` saves it, the validation digits 0 to 2, a text file and an empty folder"
    folder = tmp_path_factory.mktemp('app')
    torch.manual_seed(0)
    model = CLIP.from_config('tiny-vit', image_size=32, context_length=16)
    (folder/'clip_model').mkdir()
    torch.save({'config': model.config, 'state_dict': model.state_dict()}, folder/'clip_model'/'model.pth')
    (folder/'clip_model'/'tokenizer.pkl').write_bytes(pickle.dumps(ClipTokenizer(context_length=16)))
    make_digits_folder(folder/'digits', digits=range(3))
    (folder/'notes.txt').write_text('not an image')
    (folder/'empty').mkdir()
    return folder

@pytest.fixture(scope='module')
def server(workdir):
    "The app serving the model and the digits on a free localhost port, from the shell as a user starts it"
    port = free_port()
    env = {**os.environ, 'XDG_CACHE_HOME': str(workdir/'cache'), 'GRADIO_ANALYTICS_ENABLED': 'False', 'no_proxy': '127.0.0.1,localhost'}
    log = open(workdir/'server.log', 'w')
    process = subprocess.Popen([str(command), 'clip_model', '--images', 'digits/valid', '--port', str(port)],
                               cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    url, start = f'http://127.0.0.1:{port}/', time.time()
    while True:
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200: break
        except OSError: pass
        assert process.poll() is None, (workdir/'server.log').read_text()[-3000:]
        assert time.time() - start < 150, ('not serving after 150 s', (workdir/'server.log').read_text()[-3000:])
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(30)
    log.close()

@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,1400'): options.add_argument(argument)
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver_path = shutil.which('chromedriver')
    assert chromium and driver_path, "headless Chromium is missing: apt-get install chromium chromium-driver"
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()

def wait_for(browser, condition, what:str, seconds:float=60):
    "Wait until `condition(browser)` is truthy and return it; fail with `what` and the page's text"
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import TimeoutException
    try: return WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda b: condition(b))
    except TimeoutException: raise AssertionError(f"{what} did not appear; the page shows:\n{browser.find_element('tag name', 'body').text}")

def toasts(browser) -> str:
    "The text of the messages (`gr.Error`) the page shows"
    return ' | '.join(t.text for t in browser.find_elements('css selector', '.toast-body'))

def upload(browser, path, box:str='image-file'):
    "Put `path` into the file box with id `box`, clearing what it held"
    for clear in browser.find_elements('css selector', f'#{box} button[aria-label=Clear]'): clear.click()
    wait_for(browser, lambda b: b.find_elements('css selector', f'#{box} input[type=file]'), 'the file upload')[0].send_keys(str(path))
    wait_for(browser, lambda b: Path(path).stem in b.find_element('id', box).text, f'the uploaded {Path(path).name}')

def retype(box, text:str):
    "Replace the text of `box` as a person does (Selenium's `clear` sends no input event, so Gradio would keep the old text)"
    from selenium.webdriver.common.keys import Keys
    box.send_keys(Keys.CONTROL, 'a'); box.send_keys(Keys.BACKSPACE)
    if text: box.send_keys(text)

def classify(browser, labels:str):
    retype(browser.find_element('css selector', '#labels textarea'), labels)
    browser.find_element('id', 'classify').click()

def test_page(server, browser, workdir):
    from selenium.webdriver.common.by import By
    artifacts.mkdir(exist_ok=True)
    browser.get(server)
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, '#image-file input[type=file]'), 'the Classify tab')

    # a file that is not an image: a message that names it, no stack trace
    upload(browser, workdir/'notes.txt')
    classify(browser, 'a cat, a dog')
    message = wait_for(browser, lambda b: 'is not an image' in toasts(b) and toasts(b), 'the message for notes.txt')
    assert 'notes.txt is not an image that can be read' in message and 'Traceback' not in browser.page_source, message
    # an image without labels
    image_file = sorted((workdir/'digits'/'valid'/'1').glob('*.png'))[0]
    upload(browser, image_file)
    classify(browser, ' , ')
    message = wait_for(browser, lambda b: 'No labels' in toasts(b) and toasts(b), 'the message for no labels')
    assert 'type the labels to choose among, separated by commas' in message, message

    # then a good request: the server still serves, and shows the library's probabilities
    labels = ['a cat', 'a dog', 'a red bus']
    classify(browser, ', '.join(labels))
    meters = wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, '#probabilities meter'), 'the probability bars')
    model, tokenizer = load_trained(workdir/'clip_model')
    expected = classify_image(model, tokenizer, image_file, labels)
    shown = {m.get_attribute('aria-label'): float(m.get_attribute('value')) for m in meters}
    assert list(shown) == list(expected), (shown, expected) # the same labels, best first
    assert all(abs(shown[l] - p) < 1e-6 for l, p in expected.items()), (shown, expected)
    assert abs(sum(shown.values()) - 1) < 1e-5, shown
    table = wait_for(browser, lambda b: 'a red bus' in b.find_element(By.ID, 'probability-table').text and
                     b.find_element(By.ID, 'probability-table').text, 'the probability table')
    rows = re.findall(r'^(a [a-z ]+)\n([0-9.]+)$', table, re.M)
    assert rows == [(l, f'{p:.4f}') for l, p in expected.items()], (table, expected)
    percentages = browser.find_element(By.ID, 'probabilities').text
    assert all(f'{round(p * 100)}%' in percentages for p in expected.values()), (percentages, expected)
    assert browser.find_elements(By.CSS_SELECTOR, '#preview img'), 'the uploaded image is not shown'
    browser.save_screenshot(str(artifacts/'app_classify.png'))

    # the Search tab: a gallery of the best-matching images, captioned with their similarities
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Search']").click()
    query = wait_for(browser, lambda b: [e for e in b.find_elements(By.CSS_SELECTOR, '#query textarea') if e.is_displayed()], 'the query box')[0]
    query.send_keys('a handwritten digit two')
    browser.find_element(By.ID, 'search').click()
    images = wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, '#gallery img')) >= 8 and
                      b.find_elements(By.CSS_SELECTOR, '#gallery img'), 'the gallery')
    assert len(images) == 8, len(images) # --k's default
    wait_for(browser, lambda b: all(b.execute_script('return arguments[0].complete && arguments[0].naturalWidth', i) == 32 for i in images),
             'the gallery images (32 pixels wide)')
    captions = re.findall(r'^(\d+\.png) · ([0-9.]+)$', browser.find_element(By.ID, 'gallery').text, re.M)
    index = ImageIndex.from_folder(model, tokenizer, workdir/'digits'/'valid', show_progress=False)
    scores = {f.name: s for f, s in index.search('a handwritten digit two', k=len(index))}
    best = sorted(scores.values(), reverse=True)
    assert len(captions) == 8 and [float(s) for _, s in captions] == sorted((float(s) for _, s in captions), reverse=True), captions
    # each shown image has the library's similarity, and is among the library's 8 best (up to float rounding)
    assert all(abs(scores[name] - float(s)) < 1e-3 and scores[name] >= best[7] - 1e-5 for name, s in captions), (captions, best[:9])
    browser.save_screenshot(str(artifacts/'app_search.png'))

    # search by an image of the folder: it finds itself first, at similarity 1
    retype(query, '')
    upload(browser, image_file, 'query-image')
    browser.find_element(By.ID, 'search').click()
    first = f'{image_file.name} · 1.000'
    wait_for(browser, lambda b: first in b.find_element(By.ID, 'gallery').text.splitlines()[1:2], f'{first} first in the gallery')

def run_app(*arguments, cwd):
    start = time.time()
    result = subprocess.run([str(command), *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'XDG_CACHE_HOME': str(cwd/'cache')})
    return result, time.time() - start

@pytest.mark.parametrize('arguments,message', [(['notes.txt'], 'error: MODEL notes.txt cannot be read as a CLIP model'),
                                               (['clip_model', '--images', 'empty'], 'error: --images empty holds no image files')])
def test_bad_command_line(workdir, arguments, message):
    "A MODEL that is not a CLIP model, an empty folder: one `error:` line and exit status 2, no server (the notebook checks the other arguments)"
    result, seconds = run_app(*arguments, cwd=workdir)
    lines = stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (result.returncode, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr and 'Running on' not in result.stdout and seconds < 90, (result.stdout[-1000:], seconds)
